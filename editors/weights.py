"""The parameters a method edits: unedited snapshot, per-edit rollback, accumulated change, NaN/Inf guard.

Every parameter-update method (FT, MEND, KE) changes the model through a `WeightTracker`, so
single editing (`reset`), sequential editing (repeated edits), the norm the collapse probes
read and the rollback of an edit that leaves non-finite weights are implemented once. Only
the touched parameters are copied, never the whole model.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from pydantic import BaseModel
from torch import nn

from editors.adapter import LVLM, SpanLogits
from editors.editor import EditOutcome, Editor, HasWeightDelta, tensor_norms
from editors.inputs import Query
from editors.state import EditorState

log = logging.getLogger(__name__)


class StateMismatchError(ValueError):
    """A saved state does not fit the model it is loaded onto."""


class WeightTracker:
    """Tracks named parameters of one model against their unedited values."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        if not params:
            raise ValueError("a weight tracker needs at least one parameter")
        self.params = params
        self._unedited = {name: p.detach().clone() for name, p in params.items()}

    def edit(self, change: Callable[[], None]) -> EditOutcome:
        """Run `change` (which updates the parameters in place) as one guarded edit.

        If any tracked parameter is NaN/Inf afterwards, or the change's norm overflows, this
        edit alone is rolled back and the outcome says so (`applied=False`); earlier edits stay.
        `changed` holds the Frobenius norm of this edit's change per parameter.
        """
        before = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            change()
        except BaseException:
            self._copy_in(before)
            raise
        bad = [name for name, p in self.params.items() if not torch.isfinite(p).all()]
        changed = {} if bad else tensor_norms({name: p.detach() - before[name] for name, p in self.params.items()})
        # A change too large for the dtype is as broken as a NaN: the next forward overflows.
        huge = [name for name, norm in changed.items() if not math.isfinite(norm)]
        if bad or huge:
            self._copy_in(before)
            what = f"non-finite weights in {', '.join(bad)}" if bad else f"a change overflowing in {', '.join(huge)}"
            message = f"edit left {what}; rolled back"
            log.warning(message)
            return EditOutcome(applied=False, message=message)
        return EditOutcome(applied=True, changed=changed)

    def reset(self) -> None:
        """Restore every tracked parameter to its unedited value, bit for bit."""
        self._copy_in(self._unedited)

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """Inside the block the tracked parameters hold their unedited values; the edits return after."""
        edited = self.edited()
        self.reset()
        try:
            yield
        finally:
            self._copy_in(edited)

    def weight_change(self) -> float:
        """Frobenius norm of (current - unedited) over all tracked parameters."""
        total = sum(float((p.detach().double() - self._unedited[n].double()).pow(2).sum()) for n, p in self.params.items())
        return math.sqrt(total)

    def edited(self) -> dict[str, torch.Tensor]:
        """Current values of the tracked parameters that differ from the unedited model (for a state)."""
        return {n: p.detach().clone() for n, p in self.params.items() if not torch.equal(p, self._unedited[n])}

    def load(self, values: dict[str, torch.Tensor]) -> None:
        """Reset, then set parameters to saved values from `edited()`; unknown names or shapes are refused."""
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            raise StateMismatchError(f"the state edits parameters this editor does not track: {', '.join(unknown)}")
        for name, value in values.items():
            if value.shape != self.params[name].shape:
                raise StateMismatchError(
                    f"parameter {name} has shape {tuple(self.params[name].shape)}, the state holds {tuple(value.shape)}"
                )
        self.reset()
        self._copy_in(values)

    @torch.no_grad()
    def _copy_in(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.params[name].copy_(value)


class ParameterEditor(Editor, HasWeightDelta):
    """Base of the methods that change weights in place: state, reset and weight change live here.

    A subclass names the parameters it edits (`_parameters`) and may keep trained parts in the
    state (`_trained_state` / `_load_trained`). A state holds the config it was made with; loading
    it adopts that config, so a saved editor resumes with the settings that produced it.
    """

    def __init__(self, lvlm: LVLM, config: BaseModel | dict[str, Any] | None = None) -> None:
        super().__init__(lvlm, config)
        self._configure()

    @abstractmethod
    def _parameters(self) -> dict[str, nn.Parameter]:
        """The named parameters this editor changes (from `LVLM.parameter_group`)."""

    def _configure(self) -> None:
        """Build what depends on the config (subclasses extend this)."""
        self.tracker = WeightTracker(self._parameters())

    def _trained_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Metadata and tensors of trained parts (none for methods that do not learn)."""
        return {}, {}

    def _load_trained(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore trained parts from `_trained_state`'s output."""

    def weight_change(self) -> float:
        """Frobenius norm of the accumulated change to the edited parameters."""
        return self.tracker.weight_change()

    def reset(self) -> None:
        """Restore the unedited weights (trained parts are kept)."""
        self.tracker.reset()

    def unedited(self) -> ContextManager[None]:
        """Swap the unedited values of the edited parameters in for the block (no state round trip)."""
        return self.tracker.unedited()

    def state(self) -> EditorState:
        """Config, trained parts and the edited values of changed parameters."""
        meta, trained = self._trained_state()
        tensors = {f"{_TRAINED}{k}": v for k, v in trained.items()}
        tensors |= {f"{_WEIGHTS}{k}": v for k, v in self.tracker.edited().items()}
        return self._new_state(meta, tensors)

    def load_state(self, state: EditorState) -> None:
        """Adopt the state's config, restore its trained parts and put its edited weights on the model."""
        self._check_state(state)
        config = self.Config.model_validate(state.meta["config"])
        self.tracker.reset()
        if config != self.config:
            self.config = config
            self._configure()
        self._load_trained(state.meta, _prefixed(state.tensors, _TRAINED))
        self.tracker.load(_prefixed(state.tensors, _WEIGHTS))


_TRAINED = "trained."
_WEIGHTS = "weights."


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


@contextmanager
def trainable_only(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Let gradients reach only `params` inside the block (saves the activations of frozen parts)."""
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Scorer(nn.Module):
    """Holds the LVLM's model as a submodule so `functional_call` can swap its parameters."""

    def __init__(self, lvlm: LVLM) -> None:
        super().__init__()
        self.model = lvlm.model
        self._span_logits = lvlm.span_logits

    def forward(self, queries: Sequence[Query]) -> SpanLogits:
        return self._span_logits(queries)


def span_logits_with(lvlm: LVLM, queries: Sequence[Query], weights: dict[str, torch.Tensor]) -> SpanLogits:
    """Answer-span logits with named parameters replaced by (differentiable) tensors, model untouched."""
    overrides = {f"model.{name}": value for name, value in weights.items()}
    return torch.func.functional_call(_Scorer(lvlm), overrides, (queries,))
