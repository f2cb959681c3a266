"""What every `simulate` command shares: one-line errors, flags generated from pydantic models, exporters."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, NoReturn, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from monitor.sink import Sink
    from simulator.config import RunConfig

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report it
Settings = TypeVar("Settings", bound=BaseModel)


class CommandError(Exception):
    """A user-facing failure: printed without a traceback, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """A parser whose errors are one line, `simulate: error: ...`, like every other user error."""

    def error(self, message: str) -> NoReturn:
        """Print the problem in one line (no usage block) and exit with status 2."""
        command = self.prog.removeprefix("simulate").strip()
        print_error(f"{command}: {message}" if command else message)
        sys.exit(USAGE_ERROR)


def print_error(message: str) -> None:
    """`simulate: error: ...` on standard error, a multi-line message joined into one line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print(f"simulate: error: {'; '.join(lines)}", file=sys.stderr)


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "",
                      aliases: dict[str, str] | None = None) -> None:
    """One flag per field of `model`, so a settings file and the command line share names.

    A nested settings model (e.g. `collapse`) becomes flags `--collapse-<field>` whose dest is
    the dotted path; `nested` folds them back. Flags left out are absent from the namespace, so
    the model's own defaults (or a settings file) apply. `aliases` adds a second flag for a field.
    """
    for name, field in model.model_fields.items():
        annotation = _unwrap_optional(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            add_model_options(parser, annotation, f"{prefix}{name}.", aliases)
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        shown = f" (default: {default})" if default not in (None, False, {}, []) else ""
        off = "; 'off' disables it" if prefix and field.default is not None and annotation is not bool else ""
        kwargs: dict[str, Any] = {
            "dest": prefix + name, "default": argparse.SUPPRESS, "help": f"{field.description}{shown}{off}"
        }
        if annotation is bool:
            kwargs["action"] = "store_true"
        elif get_origin(annotation) is list:
            item = _unwrap_optional(get_args(annotation)[0])
            item = getattr(item, "__origin__", item)  # PositiveInt is Annotated[int, ...]
            kwargs.update(nargs="+", metavar="N" if item in (int, float) else "PATH" if item is Path else "VALUE")
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = get_args(annotation)
        elif get_origin(annotation) is dict:
            kwargs.update(type=json.loads, metavar="JSON")
        elif prefix:
            kwargs["type"] = lambda value: None if value.lower() in ("off", "none") else value
        flags = ["--" + (prefix + name).replace("_", "-").replace(".", "-")]
        if aliases and name in aliases:
            flags.append(aliases[name])
        parser.add_argument(*flags, **kwargs)


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"collapse.ppl_ratio": 3} -> {"collapse": {"ppl_ratio": 3}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    return out


def validation_problems(error: ValidationError, flags: bool = True) -> str:
    """Every problem of a pydantic error in one line, each named by its flag (or dotted field path)."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"] if isinstance(part, str))  # list indices left out
        name = ("--" + where.replace("_", "-").replace(".", "-")) if flags and where else (where or "settings")
        problems.append(f"{name}: {item['msg']}")
    return "; ".join(problems)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a run reports as the user's to fix (settings, model, input, checkpoint, a foreign editor state):
    one line and exit 2 from the CLI, reported once and not retried in a sweep."""
    from editors.editor import StateMismatchError
    from editors.families import UnsupportedModelError
    from editors.inputs import InputError
    from editors.registry import UnknownMethodError
    from memory.files import FolderLockedError
    from simulator.checkpoint import CheckpointError
    from simulator.run import RunError
    from simulator.stream import RecordsError

    return (RunError, CheckpointError, RecordsError, UnknownMethodError, FileNotFoundError, UnsupportedModelError,
            InputError, StateMismatchError, FolderLockedError)


def method_config_error(method: str, error: ValidationError) -> CommandError:
    """The one-line error for method settings (`--method-config`) the method's Config refuses."""
    return CommandError(f"invalid --method-config for {method}: {validation_problems(error, flags=False)}")


def validated(build: Callable[[], Settings]) -> Settings:
    """Build settings, turning every validation problem into one readable CommandError."""
    try:
        return build()
    except ValidationError as error:
        raise CommandError("invalid settings: " + validation_problems(error)) from None
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None


def options(args: argparse.Namespace, model: type[Settings], *, skip: tuple[str, ...] = ("verbose",)) -> Settings:
    """The subcommand's settings model from its parsed flags (every problem in one CommandError)."""
    values = nested({k: v for k, v in vars(args).items() if k not in skip})
    return validated(lambda: model.model_validate(values))


def exporters(config: RunConfig, kind: str = "simulate") -> list[Sink]:
    """The run's exporters (MLflow, Prometheus, Pushgateway); a busy metrics port is a CommandError."""
    from monitor.exporters import build_sinks

    try:
        return build_sinks(config, kind)
    except OSError as error:
        raise CommandError(
            f"cannot serve Prometheus metrics on {config.prometheus_host}:{config.prometheus_port}: {error}"
        ) from None
