"""`ike`: in-context knowledge editing — retrieved edits prefixed to every query.

After IKE (Zheng et al., EMNLP 2023, "Can We Edit Factual Knowledge by In-Context Learning?"):
no weights change; each query is prefixed with the k stored edits nearest to it, as
demonstrations. The prefix goes on *every* query, in scope or not — which is why VLKEB finds IKE
hurts locality; we keep that faithful. Retrieval is by the same multimodal key as SERAC
(`editors.edit_memory`), so the nearest edit is judged on the question and the image.
"""

from __future__ import annotations

from typing import Sequence

from pydantic import ConfigDict, Field

from editors.edit_memory import KeyConfig, MemoryEditor
from editors.editor import Retrieval
from editors.inputs import Query
from editors.prompts import in_context_prompt


class IkeConfig(KeyConfig):
    """IKE settings."""

    model_config = ConfigDict(extra="forbid")

    # The default model was trained on one fact in context; more demonstrations are
    # out of its training distribution.
    k: int = Field(1, ge=1, description="stored edits prefixed to each query as demonstrations")


class Ike(MemoryEditor):
    """Prefix the k nearest stored edits to every query; the closest stands next to the question."""

    name = "ike"
    Config = IkeConfig

    def retrieve(self, queries: Sequence[Query]) -> list[Retrieval]:
        """The nearest edit of each query (IKE has no scope decision: every query is routed)."""
        return self.edits.retrievals(queries, None)

    def _prompted(self, queries: Sequence[Query]) -> list[Query]:
        _, nearest = self.edits.nearest(queries, self.config.k)
        self.edits.count_routing([bool(found) for found in nearest])  # every query with an edit is a hit
        return [
            Query(in_context_prompt([(e.prompt, e.target) for e in reversed(found)], q.prompt), q.answer, q.image)
            if found else q
            for q, found in zip(queries, nearest)
        ]
