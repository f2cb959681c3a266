"""Reading edit records: JSONL (one record per line) or a JSON array, from a file or standard input.

The first non-blank character decides: `[` starts a JSON array, which ijson parses element by
element, so a large published file (VLKEB's `eval.json`) is never held whole; anything else is
JSONL. A byte-order mark sets the encoding (UTF-8 without one; UTF-16 and UTF-32 files are read
too). Every bad record yields a `RecordError` naming its position (line, or 1-based item of an
array) and field: each JSONL line is decoded and parsed on its own, so a bad byte or any parser
error costs that line only. A whole-file load gathers all of them before failing; a stream can
instead quarantine bad records to a file and go on. Images are decoded whole when a record is
checked, bounded in pixels, scaled down and cached for the run.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import select
import stat
import sys
import threading
import warnings
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Literal, NamedTuple

import ijson
from PIL import Image
from pydantic import ValidationError

from memory.cache import LRUCache
from memory.files import append_jsonl
from simulator.records import (
    PORT_TAGS,
    RECORD_FORMATS,
    EditRecord,
    RecordFormat,
    Retraction,
    foreign_fields,
    unknown_fields,
)

log = logging.getLogger(__name__)

Unit = Literal["line", "item"]
Wait = Callable[[], bool]  # at the end of a followed file: wait a little; False means stop
# Byte-order marks, longest first: UTF-32-LE's begins with UTF-16-LE's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_JSON_SPACE = " \t\r\n"  # JSON's whitespace: a line of nothing else is blank
_CHUNK = 1 << 16  # bytes read at a time
# Nesting deeper than this in an array element is a bad record (a record nests 4 levels: port_new[].Q&A);
# it bounds the builder's work, and the memory a crafted `[[[[...` would otherwise take.
MAX_DEPTH = 64

# Pillow decodes the whole raster: an image over this many pixels is refused from its header, before it
# is decoded (40 MP holds a full-frame camera photo; Pillow's own bomb warning starts at 89.5 MP).
MAX_IMAGE_PIXELS = 40_000_000
# Decoded images are scaled down to at most this many pixels before caching: the most any declared family
# reads, Qwen2-VL's published max_pixels (16384 patches of 28 x 28 px: 3584 x 3584). The others read a
# longest side of at most 2304 px (LLaVA-OneVision's largest tile grid), which an image of this many
# pixels keeps at any aspect ratio: scaling down takes away no detail a model would read.
CACHED_PIXELS = 12_845_056
CACHE_BYTES = 256 * 2**20  # decoded images one ImageRoot keeps (RGB: 3 bytes a pixel)


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


class ImageRootError(FileNotFoundError):
    """The image root itself is gone (deleted or unmounted mid-run): a fault of the run, not of a record."""


class ImageRoot:
    """Resolves record image paths under one folder and decodes them; nothing outside it is ever opened.

    An image is decoded whole when a record is checked (a truncated file or a decompression bomb is a
    bad field, not a failed run), refused over `max_pixels`, scaled down to `cached_pixels` and kept
    in a cache of `cache_bytes`, so the run's later `open` of the same path decodes nothing.
    """

    def __init__(
        self,
        root: str | Path,
        max_pixels: int = MAX_IMAGE_PIXELS,
        cached_pixels: int = CACHED_PIXELS,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image root {root} is not a directory")
        self.max_pixels = max_pixels
        self.cached_pixels = cached_pixels
        self._cache: LRUCache[Image.Image] = LRUCache(cache_bytes, _image_bytes)

    def resolve(self, relative: str) -> Path:
        """The file behind a record's image path; ValueError if it escapes the root or is missing."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"image path {relative!r} resolves outside the image root {self.root}")
        if not path.is_file():
            self._check_root()
            raise ValueError(f"image {relative!r} not found under {self.root}")
        return path

    def check(self, relative: str) -> None:
        """Raise ValueError unless the image is under the root, decodes whole and is within the pixel bound."""
        self.open(relative)

    def open(self, relative: str) -> Image.Image:
        """The image as RGB, scaled down to `cached_pixels` at most; cached, so callers must not modify it."""
        image = self._cache.get(relative)
        if image is None:
            image = _scaled_down(self._decode(relative), self.cached_pixels)
            self._cache.put(relative, image)
        return image

    def _check_root(self) -> None:
        """ImageRootError when the root folder is gone: every record after this one would be quarantined."""
        if not self.root.is_dir():
            raise ImageRootError(f"image root {self.root} is gone: it was deleted or unmounted during the run")

    def _decode(self, relative: str) -> Image.Image:
        path = self.resolve(relative)
        try:
            with warnings.catch_warnings():
                # Pillow only warns between its MAX_IMAGE_PIXELS and twice that: here a bomb is refused.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    width, height = image.size
                    if width * height <= self.max_pixels:  # from the header: a bigger image is never decoded
                        return image.convert("RGB")  # decodes every pixel: a truncated file fails here
        except FileNotFoundError:  # removed since it was resolved
            self._check_root()
            raise ValueError(f"image {relative!r} not found under {self.root}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"image {relative!r} is refused as a decompression bomb: {error}") from None
        except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ... on bad data
            raise ValueError(f"image {relative!r} is not a readable image: {_described(error)}") from None
        raise ValueError(f"image {relative!r} is {width} x {height} = {width * height:,} pixels, over the bound "
                         f"of {self.max_pixels:,}")


def _image_bytes(image: Image.Image) -> int:
    """Bytes of a decoded image's pixels."""
    return image.width * image.height * len(image.getbands())


def _scaled_down(image: Image.Image, max_pixels: int) -> Image.Image:
    """`image` with its aspect ratio, scaled down to at most `max_pixels` pixels; as it is if it has no more."""
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / pixels)
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)  # bicubic, as the families' processors resize


def _described(error: BaseException) -> str:
    """An exception as `Type: message` (the type alone when it has no message)."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def parse_record(
    data: object,
    line: int,
    record_format: RecordFormat = "vlkeb",
    images: ImageRoot | None = None,
    unit: Unit = "line",
) -> EditRecord | Retraction:
    """Validate one decoded JSON value as a record, or a retraction line (it has `op`); RecordsError lists every
    bad field.

    A key that only another format reads is an error (`--format evqa` would drop VLKEB's
    `port_new`); keys no format reads are left to the caller to report (`unknown_fields`).
    """
    if not isinstance(data, dict):
        raise RecordsError([RecordError(line, None, f"expected a JSON object, got {type(data).__name__}", unit)])
    if "op" in data:
        try:
            return Retraction.model_validate(data)
        except ValidationError as error:
            raise RecordsError([RecordError(line, _field(e["loc"]), e["msg"], unit) for e in error.errors()]) from None
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
        sniffed = _sniff(stream)
        unit: Unit = "item" if sniffed.is_array else "line"
        for position, value, _raw in _values(stream, sniffed):
            if isinstance(value, RecordError):
                errors.append(value)
                continue
            unknown.note(value, position, unit)
            try:
                record = parse_record(value, position, record_format, images, unit)
            except RecordsError as error:
                errors.extend(error.errors)
                continue
            if isinstance(record, Retraction):
                errors.append(RecordError(position, "op", "a retraction belongs in a stream, not in this file", unit))
            else:
                records.append(record)
    if errors:
        raise RecordsError(errors, str(path))
    return records


class StreamReader:
    """Iterates the records of a JSONL stream or JSON array; bad records go to a quarantine file when one is given.

    Without a quarantine file the first bad record raises RecordsError. `read`, `quarantined`
    and `line` count what has been consumed (`line` in lines, or array items: `unit`), so a run
    can report and resume: `start_line` skips what a previous run consumed, `follow` waits for a
    growing JSONL file like `tail -f` (an array is complete once written: it is read once).
    Setting `stop` ends the iteration within `poll_seconds`, even while a pipe or terminal (standard
    input) sends nothing; such a stream is read from its file descriptor, so nothing else may read it.
    A missing image root raises ImageRootError, with `line` left before the record that met it.
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

    def __iter__(self) -> Iterator[EditRecord | Retraction]:
        stream, opened = self._open()
        wait = self._wait if self.follow else None
        try:
            sniffed = _sniff(stream, wait)
            self.unit = "item" if sniffed.is_array else "line"
            if sniffed.is_array and self.follow:
                log.warning("%s is a JSON array: it is read once (--follow waits for lines appended to JSONL)",
                            self.source)
            unknown = _UnknownFields(self.record_format, str(self.source))
            for position, value, raw in _values(stream, sniffed, wait):
                consumed, self.line = self.line, position
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
                except ImageRootError:
                    self.line = consumed  # not this record's fault: a resume reads it again
                    raise
                self.read += 1
                yield record
        except _Stopped:
            return
        finally:
            if opened is not None:
                opened.close()

    def tally(self) -> str:
        """What has been consumed, for a diagnosis: `12 lines read, 12 quarantined`."""
        return f"{self.line} {self.unit}{'' if self.line == 1 else 's'} read, {self.quarantined} quarantined"

    def _wait(self) -> bool:
        """At the end of a followed file: wait a poll interval; False once the run is stopping."""
        return not self.stop.wait(self.poll_seconds)

    def _open(self) -> tuple[Any, IO[bytes] | None]:
        """(the byte stream to read, the file this reader opened and closes, if any)."""
        if isinstance(self.source, (str, Path)) and str(self.source) != "-":
            opened: IO[bytes] | None = open(self.source, "rb")
            stream: Any = opened
        else:
            opened, stream = None, _binary(sys.stdin if isinstance(self.source, (str, Path)) else self.source)
        fd = _blocking_fd(stream)
        return (_Pipe(fd, self.stop, self.poll_seconds) if fd is not None else stream), opened

    def reject(self, line: int, message: str) -> None:
        """Quarantine a record read earlier that its consumer cannot use (e.g. the model cannot take it)."""
        self.read -= 1
        self._reject(RecordError(line, None, message, self.unit), "")

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
        if not isinstance(value, dict) or "op" in value:  # an operation line is no record: its keys are its own
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
        return _sniff(handle).is_array


class _Sniffed(NamedTuple):
    """What the start of a stream says: JSON array or JSONL, its encoding, the bytes read past the BOM."""

    is_array: bool
    encoding: str
    head: bytes


def _sniff(stream: Any, wait: Wait | None = None) -> _Sniffed:
    """Reads a byte-order mark, if any, and up to the first character that is not JSON whitespace.

    With `wait`, an empty or blank file is waited on until a record starts (or `wait` says stop).
    """

    def byte() -> bytes:
        while not (read := stream.read(1)) and wait is not None and wait():
            pass
        return read

    head = b""
    while any(bom.startswith(head) and len(bom) > len(head) for bom, _ in _BOMS):  # (part of) a BOM so far
        if not (read := byte()):
            break
        head += read
    bom, encoding = next(((bom, encoding) for bom, encoding in _BOMS if head.startswith(bom)), (b"", "utf-8"))
    body = bytearray(head[len(bom):])
    width = len(" ".encode(encoding))  # bytes a code unit
    checked = 0
    while True:
        while checked + width <= len(body):
            char = body[checked : checked + width].decode(encoding, "replace")
            if char not in _JSON_SPACE:
                return _Sniffed(char == "[", encoding, bytes(body))
            checked += width
        if not (read := byte()):
            return _Sniffed(False, encoding, bytes(body))
        body += read


def _values(stream: Any, sniffed: _Sniffed, wait: Wait | None = None) -> Iterator[tuple[int, Any, str]]:
    """(position, decoded value or RecordError, raw text) of every non-blank line or array item."""
    if sniffed.is_array:
        source: Any = _Prefixed(sniffed.head, stream)
        yield from _array_values(source if sniffed.encoding == "utf-8" else _Transcoded(source, sniffed.encoding))
        return
    encoding = sniffed.encoding
    for number, raw in enumerate(_lines(stream, sniffed.head, "\n".encode(encoding), wait), start=1):
        try:
            # A BOM can start any line: files joined with `cat`.
            text = raw.decode(encoding).removeprefix("\ufeff")
        except UnicodeDecodeError as error:
            message = f"not {encoding.upper()} text: {error.reason} at byte {error.start + 1} of the line"
            yield number, RecordError(number, None, message), raw.decode(encoding, "replace").rstrip("\r\n")
            continue
        if not text.strip(_JSON_SPACE):
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            message = f"malformed JSON: {error.msg} (column {error.colno})"
        except Exception as error:  # RecursionError (deep nesting), ValueError (an integer of 5000 digits), ...
            message = f"unreadable JSON: {_described(error)}"
        else:
            yield number, value, text.rstrip("\r\n")
            continue
        yield number, RecordError(number, None, message), text.rstrip("\r\n")


def _lines(stream: Any, head: bytes, newline: bytes, wait: Wait | None) -> Iterator[bytes]:
    """Lines of `head` + `stream`, each ending in `newline` where a character starts (UTF-16/32: 2/4 bytes).

    The last may lack its newline; with `wait`, complete lines only, waiting at the end for more.
    """
    width = len(newline)
    buffer, start, search = bytearray(head), 0, 0
    while True:
        while (end := buffer.find(newline, search)) != -1:
            search = end + 1
            if (end - start) % width == 0:  # else the bytes of two other characters, as U+0A41 U+2000 in UTF-16-LE
                search = end + width
                yield bytes(buffer[start:search])
                start = search
        del buffer[:start]
        search, start = max(search - start, len(buffer) - width + 1, 0), 0
        chunk = stream.read(_CHUNK)
        if chunk:
            buffer += chunk
        elif wait is None:
            if buffer:
                yield bytes(buffer)
            return
        elif not wait():
            return


def _array_values(stream: Any) -> Iterator[tuple[int, Any, str]]:
    """The elements of a top-level JSON array, built one at a time from the parser's events.

    An element nested deeper than MAX_DEPTH is a bad record and the rest is read. Broken JSON syntax,
    or any other error of the parser, cannot be resynchronised: it is reported at the item being
    read and the rest of the file is not.
    """
    index = 0
    try:
        # Not use_float: yajl's own integers stop at 64 bits, ijson's are Python's; numbers with a point or an
        # exponent come as Decimal and are made floats (as json.loads reads them) by _element.
        events = ijson.basic_parse(stream)
        next(events)  # start_array: the sniff saw '['
        for event, value in events:
            if event == "end_array":
                break
            element = _element(event, value, events)
            index += 1  # counted once whole: an error while building it is at index + 1, the item being read
            if element is _TOO_DEEP:
                yield index, RecordError(index, None, f"nested deeper than {MAX_DEPTH} levels", "item"), ""
            else:
                yield index, element, json.dumps(element)
        for _ in events:  # anything after the array is an error of the parser's
            pass
    except (_Stopped, OSError):  # a stop, or a fault of the disk or pipe: not the record's
        raise
    except Exception as error:
        message, near = _parse_error(error)
        yield index + 1, RecordError(index + 1, None, message + "; the rest of the array is not read", "item"), near


_TOO_DEEP = object()


def _element(event: str, value: Any, events: Iterator[tuple[str, Any]]) -> Any:
    """One array element from its first parser event on; _TOO_DEEP (its events consumed) past MAX_DEPTH."""
    builder: ijson.ObjectBuilder | None = ijson.ObjectBuilder()
    depth = 0
    while True:
        depth += event in ("start_map", "start_array")
        if builder is not None and depth > MAX_DEPTH:
            builder = None  # the events still go by, so the rest of the array can be read
        if builder is not None:
            builder.event(event, float(value) if isinstance(value, Decimal) else value)
        depth -= event in ("end_map", "end_array")
        if depth == 0:
            return _TOO_DEEP if builder is None else builder.value
        event, value = next(events)


def _parse_error(error: Exception) -> tuple[str, str]:
    """(message, the text near the error) for an exception of the array parser."""
    if not isinstance(error, ijson.JSONError):
        # ijson's C backend wraps an error of Python's (an integer of 5000 digits) in a SystemError.
        return f"unreadable JSON: {_described(error.__cause__ or error)}", ""
    # yajl's message: what is wrong, then the text around it and a caret line.
    text = error.args[0] if error.args else str(error)
    lines = (text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)).splitlines()
    near = lines[1].strip() if len(lines) > 1 else ""
    return f"malformed JSON: {lines[0] if lines else 'parse error'}" + (f" near {near!r}" if near else ""), near


class _Stopped(Exception):
    """Raised by a read that saw the reader's stop: the iteration ends."""


class _Prefixed:
    """A binary stream with the bytes format sniffing consumed put back in front."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if self.head and size != 0:
            # A short read is allowed: readers ask again until they get b"".
            out, self.head = self.head, b""
            return out
        return self.stream.read(size)


class _Transcoded:
    """A UTF-16 or UTF-32 byte stream read as UTF-8, which ijson parses.

    A lone surrogate passes through as bytes no UTF-8 parser takes, so yajl reports it where it is;
    an error of the decoder itself (a truncated last character) is reported at the item being read.
    """

    def __init__(self, stream: Any, encoding: str) -> None:
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder(encoding)("surrogatepass")

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        while True:
            chunk = self.stream.read(size)
            text = self.decoder.decode(chunk, final=not chunk)
            if text or not chunk:  # half a character decodes to nothing yet: read on
                return text.encode("utf-8", "surrogatepass")


class _Pipe:
    """A pipe, FIFO or terminal read after `poll`, so that a stop is seen while no data comes.

    A blocking read would only return when the writer sends a line or closes its end.
    """

    def __init__(self, fd: int, stop: threading.Event, poll_seconds: float) -> None:
        self.fd, self.stop = fd, stop
        self.timeout_ms = max(1, round(poll_seconds * 1000))
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        while not self.poll.poll(self.timeout_ms):  # data, the writer's end closed, or an error
            if self.stop.is_set():
                raise _Stopped
        return os.read(self.fd, size if size > 0 else _CHUNK)


class _Encoded:
    """A text stream read as UTF-8 bytes (standard input replaced by a StringIO, say)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size).encode("utf-8")


def _binary(stream: IO[Any]) -> IO[bytes]:
    """`stream` as bytes: its binary buffer when it has one."""
    if hasattr(stream, "buffer"):
        return stream.buffer
    return _Encoded(stream) if isinstance(stream.read(0), str) else stream  # type: ignore[return-value]


def _blocking_fd(stream: Any) -> int | None:
    """The file descriptor of a stream whose reads can wait for a writer (pipe, FIFO, terminal, socket).

    None for a regular file (a read returns at its end) and for a stream without one (in memory).
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return None if stat.S_ISREG(os.fstat(fd).st_mode) else fd
