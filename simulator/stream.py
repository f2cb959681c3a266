"""Reading edit records: JSONL (one record per line) or a JSON array, from a file or standard input.

The first non-blank character decides (after an optional UTF-8 BOM): `[` starts a JSON array,
which ijson parses element by element, so a large published file (VLKEB's `eval.json`) is never
held whole; anything else is JSONL. Every bad record yields a `RecordError` naming its position
(line, or 1-based item of an array) and field. A whole-file load gathers all of them before
failing; a stream can instead quarantine bad records to a file and go on.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Literal

import ijson
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from memory.files import append_jsonl
from simulator.records import PORT_TAGS, RECORD_FORMATS, EditRecord, RecordFormat, foreign_fields, unknown_fields

log = logging.getLogger(__name__)

Unit = Literal["line", "item"]
Wait = Callable[[], bool]  # at the end of a followed file: wait a little; False means stop
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class RecordError:
    """What is wrong with one record: its 1-based position, the field (or None) and why.

    `line` is the position that skipping and resuming count in: the line of a JSONL stream, or
    the element of a JSON array, as `unit` says.
    """

    line: int
    field: str | None
    message: str
    unit: Unit = "line"

    def __str__(self) -> str:
        where = f"{self.unit} {self.line}" + (f", field {self.field!r}" if self.field else "")
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
    data: object,
    line: int,
    record_format: RecordFormat = "vlkeb",
    images: ImageRoot | None = None,
    unit: Unit = "line",
) -> EditRecord:
    """Validate one decoded JSON value as a record; RecordsError lists every bad field.

    A key that only another format reads is an error (`--format evqa` would drop VLKEB's
    `port_new`); keys no format reads are left to the caller to report (`unknown_fields`).
    """
    if not isinstance(data, dict):
        raise RecordsError([RecordError(line, None, f"expected a JSON object, got {type(data).__name__}", unit)])
    data = data if "id" in data else {**data, "id": str(line)}
    errors = [
        RecordError(line, key, f"belongs to --format {owner}; --format {record_format} has no such field and "
                    f"would drop it", unit)
        for key, owner in foreign_fields(data, record_format).items()
    ]
    try:
        record = RECORD_FORMATS[record_format].model_validate(data)
    except ValidationError as error:
        errors += [RecordError(line, _field(e["loc"]), e["msg"], unit) for e in error.errors()]
        raise RecordsError(errors) from None
    if images is not None:
        for field, relative in record.image_fields.items():
            try:
                images.check(relative)
            except ValueError as error:
                errors.append(RecordError(line, field, str(error), unit))
    if errors:
        raise RecordsError(errors)
    return record


def load_records(
    path: str | Path, record_format: RecordFormat = "vlkeb", images: ImageRoot | None = None
) -> list[EditRecord]:
    """All records of a JSON array or JSONL file; RecordsError lists every bad one."""
    records, errors = [], []
    unknown = _UnknownFields(record_format, str(path))
    with open(path, "rb") as stream:
        is_array, head = _sniff(stream)
        unit: Unit = "item" if is_array else "line"
        for position, value, _raw in _values(stream, head, is_array):
            if isinstance(value, RecordError):
                errors.append(value)
                continue
            unknown.note(value, position, unit)
            try:
                records.append(parse_record(value, position, record_format, images, unit))
            except RecordsError as error:
                errors.extend(error.errors)
    if errors:
        raise RecordsError(errors, str(path))
    return records


class StreamReader:
    """Iterates the records of a JSONL stream or JSON array; bad records go to a quarantine file when one is given.

    Without a quarantine file the first bad record raises RecordsError. `read`, `quarantined`
    and `line` count what has been consumed (`line` in lines, or array items: `unit`), so a run
    can report and resume: `start_line` skips what a previous run consumed, `follow` waits for a
    growing JSONL file like `tail -f` (an array is complete once written: it is read once).
    """

    def __init__(
        self,
        source: str | Path | IO[str] | IO[bytes],
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
        self.unit: Unit = "line"
        self._last_rejected = 0

    def __iter__(self) -> Iterator[EditRecord]:
        stream, close = self._open()
        try:
            is_array, head = _sniff(stream, self._wait if self.follow else None)
            self.unit = "item" if is_array else "line"
            if is_array and self.follow:
                log.warning("%s is a JSON array: it is read once (--follow waits for lines appended to JSONL)",
                            self.source)
            unknown = _UnknownFields(self.record_format, str(self.source))
            for position, value, raw in _values(stream, head, is_array, self._wait if self.follow else None):
                self.line = position
                if position <= self.start_line:
                    continue
                if isinstance(value, RecordError):
                    self._reject(value, raw)
                    continue
                unknown.note(value, position, self.unit)
                try:
                    record = parse_record(value, position, self.record_format, self.images, self.unit)
                except RecordsError as error:
                    for item in error.errors:
                        self._reject(item, raw)
                    continue
                self.read += 1
                yield record
        finally:
            if close:
                stream.close()

    def tally(self) -> str:
        """What has been consumed, for a diagnosis: `12 lines read, 12 quarantined`."""
        return f"{self.line} {self.unit}{'' if self.line == 1 else 's'} read, {self.quarantined} quarantined"

    def _wait(self) -> bool:
        """At the end of a followed file: wait a poll interval; False once the run is stopping."""
        return not self.stop.wait(self.poll_seconds)

    def _open(self) -> tuple[IO[bytes], bool]:
        if isinstance(self.source, (str, Path)):
            if str(self.source) == "-":
                return _binary(sys.stdin), False
            return open(self.source, "rb"), True
        return _binary(self.source), False

    def _reject(self, error: RecordError, raw: str) -> None:
        if self.quarantine is None:
            raise RecordsError([error], str(self.source))
        log.warning("quarantined %s", error)
        append_jsonl(self.quarantine, {**asdict(error), "raw": raw})
        # A record with several bad fields gets one entry per field but counts once.
        if error.line != self._last_rejected:
            self.quarantined += 1
            self._last_rejected = error.line


class _UnknownFields:
    """Logs, once per stream and key, record keys that no format reads (they are not used)."""

    def __init__(self, record_format: RecordFormat, source: str) -> None:
        self.record_format: RecordFormat = record_format
        self.source = source
        self.seen: set[str] = set()

    def note(self, value: object, position: int, unit: Unit) -> None:
        if not isinstance(value, dict):
            return
        new = [key for key in unknown_fields(value, self.record_format) if key not in self.seen]
        if new:
            self.seen.update(new)
            log.warning("%s, %s %d: field(s) %s ignored: no --format (%s) reads them", self.source, unit,
                        position, ", ".join(map(repr, new)), ", ".join(RECORD_FORMATS))


def _field(loc: tuple) -> str | None:
    """Pydantic's error location as a readable field path: port_new[0].Q&A.Answer."""
    out = ""
    for part in loc:
        if part in PORT_TAGS:  # which port_new layout was tried: not a field
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def is_json_array(path: Path) -> bool:
    """True when the file holds a JSON array of records rather than JSONL."""
    with path.open("rb") as handle:
        return _sniff(handle)[0]


def _sniff(stream: IO[bytes], wait: Wait | None = None) -> tuple[bool, bytes]:
    """(is a JSON array, bytes consumed without a BOM): reads up to the first non-blank byte.

    With `wait`, an empty or blank file is waited on until a record starts (or `wait` says stop).
    """
    head = b""
    while True:
        byte = stream.read(1)
        if not byte:
            if wait is not None and wait():
                continue
            return False, head.removeprefix(BOM)
        head += byte
        if BOM.startswith(head):  # (part of) a UTF-8 byte-order mark
            continue
        if not byte.isspace():
            return byte == b"[", head.removeprefix(BOM)


def _values(
    stream: IO[bytes], head: bytes, is_array: bool, wait: Wait | None = None
) -> Iterator[tuple[int, Any, str]]:
    """(position, decoded value or RecordError, raw text) of every non-blank line or array item."""
    if is_array:
        yield from _array_values(_Prefixed(head, stream))
        return
    for number, raw in enumerate(_lines(stream, head, wait), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            message = f"not UTF-8 text: {error.reason} at byte {error.start + 1} of the line"
            yield number, RecordError(number, None, message), raw.decode("utf-8", "replace").rstrip("\r\n")
            continue
        try:
            yield number, json.loads(text), text.rstrip("\r\n")
        except json.JSONDecodeError as error:
            message = f"malformed JSON: {error.msg} (column {error.colno})"
            yield number, RecordError(number, None, message), text.rstrip("\r\n")


def _lines(stream: IO[bytes], head: bytes, wait: Wait | None) -> Iterator[bytes]:
    """Lines of `head` + `stream`; with `wait`, complete lines only, waiting at the end for more."""
    partial = head
    while True:
        chunk = stream.readline()
        if not chunk:
            if wait is None:
                if partial:
                    yield from partial.splitlines(keepends=True)
                return
            if not wait():
                return
            continue
        partial += chunk
        if partial.endswith(b"\n"):
            yield from partial.splitlines(keepends=True)
            partial = b""


def _array_values(stream: IO[bytes]) -> Iterator[tuple[int, Any, str]]:
    """The elements of a top-level JSON array, parsed one at a time.

    A bad element is only a bad record; broken JSON syntax cannot be resynchronised, so it is
    reported at the item being read and the rest of the file is not.
    """
    index = 0
    try:
        for index, value in enumerate(ijson.items(stream, "item", use_float=True), start=1):
            yield index, value, json.dumps(value)
    except ijson.JSONError as error:
        # yajl's message: what is wrong, then the text around it and a caret line.
        text = error.args[0] if error.args else str(error)
        lines = (text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)).splitlines()
        near = lines[1].strip() if len(lines) > 1 else ""
        message = f"malformed JSON: {lines[0] if lines else 'parse error'}" + (f" near {near!r}" if near else "")
        yield index + 1, RecordError(index + 1, None, message + "; the rest of the array is not read", "item"), near


class _Prefixed:
    """A binary stream with the bytes format sniffing consumed put back in front."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if self.head and size != 0:
            # A short read is allowed: readers ask again until they get b"".
            out, self.head = self.head, b""
            return out
        return self.stream.read(size)


class _Encoded:
    """A text stream read as UTF-8 bytes (standard input replaced by a StringIO, say)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size).encode("utf-8")

    def readline(self) -> bytes:
        return self.stream.readline().encode("utf-8")


def _binary(stream: IO[Any]) -> IO[bytes]:
    """`stream` as bytes: its binary buffer when it has one."""
    if hasattr(stream, "buffer"):
        return stream.buffer
    return _Encoded(stream) if isinstance(stream.read(0), str) else stream  # type: ignore[return-value]
