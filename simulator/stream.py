"""Reading edit records: a JSON array file, or a JSONL stream from a file or standard input.

Every bad record yields a `RecordError` naming its line and field. A whole-file load gathers
all of them before failing; a stream can instead quarantine bad lines to a file and go on.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Iterator

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from simulator.records import RECORD_FORMATS, EditRecord, RecordFormat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordError:
    """What is wrong with one record: its 1-based line, the field (or None) and why."""

    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field {self.field!r}" if self.field else "")
        return f"{where}: {self.message}"


class RecordsError(ValueError):
    """One or more bad records; `errors` holds each, the message lists them all."""

    def __init__(self, errors: list[RecordError], source: str = "") -> None:
        self.errors = errors
        head = f"{len(errors)} bad record(s)" + (f" in {source}" if source else "")
        super().__init__("\n  ".join([head + ":", *map(str, errors)]))


class ImageRoot:
    """Resolves record image paths under one folder; nothing outside it is ever opened."""

    def __init__(self, root: str | Path, cache_size: int = 512) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image root {root} is not a directory")
        # The same images are scored many times; a per-root bounded cache (a 336 px RGB image is
        # ~0.3 MB, so 512 of them stay under 200 MB). Callers must not modify returned images.
        self.open = lru_cache(maxsize=cache_size)(self._open)

    def resolve(self, relative: str) -> Path:
        """The file behind a record's image path; ValueError if it escapes the root or is unreadable."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"image path {relative!r} resolves outside the image root {self.root}")
        if not path.is_file():
            raise ValueError(f"image {relative!r} not found under {self.root}")
        return path

    def check(self, relative: str) -> None:
        """Raise ValueError unless the image exists under the root and its header is readable."""
        path = self.resolve(relative)
        try:
            with Image.open(path) as image:
                image.size
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"image {relative!r} is not a readable image: {error}") from None

    def _open(self, relative: str) -> Image.Image:
        """The image as RGB (use `open`, its cached front)."""
        with Image.open(self.resolve(relative)) as image:
            return image.convert("RGB")


def parse_record(
    data: object, line: int, record_format: RecordFormat = "vlkeb", images: ImageRoot | None = None
) -> EditRecord:
    """Validate one decoded JSON value as a record; RecordsError lists every bad field."""
    if not isinstance(data, dict):
        raise RecordsError([RecordError(line, None, f"expected a JSON object, got {type(data).__name__}")])
    data = data if "id" in data else {**data, "id": str(line)}
    try:
        record = RECORD_FORMATS[record_format].model_validate(data)
    except ValidationError as error:
        raise RecordsError([RecordError(line, _field(e["loc"]), e["msg"]) for e in error.errors()]) from None
    if images is not None:
        errors = []
        for field, relative in record.image_fields.items():
            try:
                images.check(relative)
            except ValueError as error:
                errors.append(RecordError(line, field, str(error)))
        if errors:
            raise RecordsError(errors)
    return record


def load_records(
    path: str | Path, record_format: RecordFormat = "vlkeb", images: ImageRoot | None = None
) -> list[EditRecord]:
    """All records of a JSON array or JSONL file; RecordsError lists every bad one."""
    text = Path(path).read_text(encoding="utf-8")
    values = _array_items(text, str(path)) if text.lstrip().startswith("[") else _jsonl_items(text)
    records, errors = [], []
    for line, value in values:
        if isinstance(value, RecordError):
            errors.append(value)
            continue
        try:
            records.append(parse_record(value, line, record_format, images))
        except RecordsError as error:
            errors.extend(error.errors)
    if errors:
        raise RecordsError(errors, str(path))
    return records


class StreamReader:
    """Iterates the records of a JSONL stream; bad lines go to a quarantine file when one is given.

    Without a quarantine file the first bad line raises RecordsError. `read`, `quarantined`
    and `line` count what has been consumed, so a run can report and resume: `start_line`
    skips lines a previous run consumed, `follow` waits for a growing file like `tail -f`.
    """

    def __init__(
        self,
        source: str | Path | IO[str],
        record_format: RecordFormat = "vlkeb",
        images: ImageRoot | None = None,
        quarantine: str | Path | None = None,
        start_line: int = 0,
        follow: bool = False,
        poll_seconds: float = 0.5,
        stop: threading.Event | None = None,
    ) -> None:
        self.source = source
        self.record_format: RecordFormat = record_format
        self.images = images
        self.quarantine = Path(quarantine) if quarantine is not None else None
        self.follow = follow
        self.poll_seconds = poll_seconds
        self.stop = stop or threading.Event()
        self.start_line = start_line
        self.read = 0
        self.quarantined = 0
        self.line = 0
        self._last_rejected = 0

    def __iter__(self) -> Iterator[EditRecord]:
        stream, close = self._open()
        try:
            for raw in self._lines(stream):
                self.line += 1
                if self.line <= self.start_line or not raw.strip():
                    continue
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError as error:
                    self._reject(RecordError(self.line, None, f"malformed JSON: {error.msg} (column {error.colno})"), raw)
                    continue
                try:
                    record = parse_record(value, self.line, self.record_format, self.images)
                except RecordsError as error:
                    for item in error.errors:
                        self._reject(item, raw)
                    continue
                self.read += 1
                yield record
        finally:
            if close:
                stream.close()

    def _lines(self, stream: IO[str]) -> Iterator[str]:
        """Complete lines; when following, wait at the end for more (a partial last line waits too)."""
        if not self.follow:
            yield from stream
            return
        partial = ""
        while not self.stop.is_set():
            chunk = stream.readline()
            if not chunk:
                self.stop.wait(self.poll_seconds)
                continue
            partial += chunk
            if partial.endswith("\n"):
                yield partial
                partial = ""

    def _open(self) -> tuple[IO[str], bool]:
        if not isinstance(self.source, (str, Path)):
            return self.source, False
        if str(self.source) == "-":
            return sys.stdin, False
        return open(self.source, encoding="utf-8"), True

    def _reject(self, error: RecordError, raw: str) -> None:
        if self.quarantine is None:
            raise RecordsError([error], str(self.source))
        log.warning("quarantined %s", error)
        with self.quarantine.open("a", encoding="utf-8") as out:
            out.write(json.dumps({**asdict(error), "raw": raw.rstrip("\n")}) + "\n")
        # A line with several bad fields gets one entry per field but counts once.
        if error.line != self._last_rejected:
            self.quarantined += 1
            self._last_rejected = error.line


def _field(loc: tuple) -> str | None:
    """Pydantic's error location as a readable field path: port_new[0].Q&A.Answer."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _jsonl_items(text: str) -> Iterator[tuple[int, object]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as error:
            yield number, RecordError(number, None, f"malformed JSON: {error.msg} (column {error.colno})")


def _array_items(text: str, source: str) -> Iterator[tuple[int, object]]:
    """Elements of a top-level JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    at = text.index("[") + 1
    while True:
        at = _skip_space(text, at)
        if text.startswith("]", at):
            return
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as error:
            # A broken array cannot be resynchronised: report where and stop.
            yield error.lineno, RecordError(error.lineno, None, f"malformed JSON in {source}: {error.msg}")
            return
        yield _line_of(text, at), value
        at = _skip_space(text, end)
        if text.startswith(",", at):
            at += 1
        elif not text.startswith("]", at):
            line = _line_of(text, at)
            yield line, RecordError(line, None, "malformed JSON: expected ',' or ']' between records")
            return


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at
