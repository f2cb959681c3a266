"""Property-based tests of the stream reader: whatever a stream holds, every line is accounted for.

Streams mix good records with arbitrary JSON values and nesting, random bytes, Latin-1 lines,
UTF-8/16/32 with byte-order marks, blank, huge and non-ASCII fields; images are random, truncated,
huge or not images at all. Invariants: no exception escapes the reader; every non-blank line (array
item) is either yielded or quarantined with a reason naming it; read + quarantined = non-blank
lines; good records come out unchanged. Seeds are fixed (derandomize) and examples bounded, so CI
runs the same cases every time.
"""

import io
import json

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from simulator.stream import ImageRoot, StreamReader

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)
TEXT_FIELDS = ("src", "alt", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a")
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32")  # utf-16/32: with a BOM; -be: BOM added

# Any text a record may hold: every Unicode character but surrogates (not text), not blank.
texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30).filter(str.strip)
field_texts = st.one_of(texts, texts.map(lambda t: t * 2000), st.sampled_from(["x" * 100_000, "¿Qué es esto? 这是什么？"]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def good_records(draw, key):
    """A valid VLKEB record with id `key` and arbitrary text in its text fields."""
    record = {field: draw(field_texts) for field in TEXT_FIELDS}
    hops = draw(st.lists(st.tuples(st.sampled_from(["1-hop", "2-hop", "3-hop", "4-hop"]), texts, texts), max_size=3))
    return {**record, "id": key, "image": "a/1.png", "image_rephrase": "a/1.png", "m_loc": "a/1.png",
            "port_new": [{"port_type": kind, "Q&A": {"Question": q, "Answer": a}} for kind, q, a in hops]}


def unchanged(record, data):
    return record.id == data["id"] and all(getattr(record, field) == data[field] for field in TEXT_FIELDS) and [
        (p.port_type, p.qa.question, p.qa.answer) for p in record.port_new
    ] == [(p["port_type"], p["Q&A"]["Question"], p["Q&A"]["Answer"]) for p in data["port_new"]]


def text_lines(key):
    """(kind, JSON text line, the record when it is good) for a line of any text encoding."""
    good = good_records(key)
    return st.one_of(
        good.map(lambda r: ("good", json.dumps(r, ensure_ascii=False), r)),
        good.map(lambda r: ("good", "\ufeff" + json.dumps(r), r)),  # a BOM inside: files joined with `cat`
        good.flatmap(lambda r: st.sampled_from(TEXT_FIELDS).flatmap(lambda f: st.one_of(
            json_values, st.sampled_from(["", "  ", "\t"])).map(lambda v: ("any", json.dumps({**r, f: v}), None)))),
        json_values.map(lambda v: ("any", json.dumps(v, ensure_ascii=False), None)),
        st.integers(1, 3000).map(lambda n: ("any", "[" * n + "]" * n, None)),
        st.integers(1, 3000).map(lambda n: ("bad", '{"src": ' + "{" * n, None)),
        st.integers(4301, 6000).map(lambda n: ("bad", '{"id": ' + "7" * n + "}", None)),
        st.sampled_from(["", " ", "\t", "\r", " \t \r"]).map(lambda blank: ("blank", blank, None)),
    )


def byte_lines(key):
    """(kind, raw bytes of a line, the record when it is good) for a UTF-8 stream: text lines and raw bytes."""
    latin = st.text(st.characters(max_codepoint=255, exclude_characters="\n"), min_size=1, max_size=20)
    return st.one_of(
        text_lines(key).map(lambda line: (line[0], line[1].encode("utf-8"), line[2])),
        st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"\n", b"")).filter(
            lambda b: b.replace(b"\xef\xbb\xbf", b"").strip(b" \t\r")).map(lambda b: ("any", b, None)),
        latin.map(lambda t: ("any", json.dumps({"src": t}, ensure_ascii=False).encode("latin-1"), None)),
    )


@st.composite
def streams(draw):
    """(encoding, the file's bytes, lines as (kind, record)): the first is a good record, so the file is JSONL."""
    encoding = draw(st.sampled_from(ENCODINGS))
    count = draw(st.integers(1, 12))
    first = draw(good_records("line-1"))
    if encoding == "utf-8":  # raw bytes only make sense in a UTF-8 stream
        rest = [draw(byte_lines(f"line-{n}")) for n in range(2, count + 1)]
        lines = [("good", json.dumps(first).encode(), first), *rest]
        data = b"\n".join(raw for _, raw, _ in lines)
    else:
        rest = [draw(text_lines(f"line-{n}")) for n in range(2, count + 1)]
        lines = [("good", json.dumps(first), first), *rest]
        bom = "\ufeff" if encoding == "utf-16-be" else ""  # the others write their own
        data = (bom + "\n".join(text for _, text, _ in lines)).encode(encoding)
    newline = "\n".encode("utf-16-be" if encoding == "utf-16-be" else encoding.removesuffix("-sig"))
    if encoding in ("utf-16", "utf-32"):
        newline = newline[len("\ufeff".encode(encoding)):]  # encode() puts a BOM before each piece
    if draw(st.booleans()):
        data += newline
    return encoding, data, [(kind, record) for kind, _, record in lines]


@SETTINGS
@given(streams())
def test_every_line_of_any_stream_is_read_or_quarantined_with_its_reason(tmp_path_factory, stream):
    encoding, data, lines = stream
    for kind in {kind for kind, _ in lines}:
        event(f"{encoding}: {kind} lines")  # shown by --hypothesis-show-statistics: what the examples cover
    folder = tmp_path_factory.mktemp("stream")
    path, quarantine = folder / "edits.jsonl", folder / "quarantine.jsonl"
    path.write_bytes(data)
    reader = StreamReader(path, quarantine=quarantine)
    yielded = {}
    for record in reader:  # no exception escapes
        yielded[reader.line] = record
    entries = [json.loads(line) for line in quarantine.read_text(encoding="utf-8").splitlines()] \
        if quarantine.exists() else []
    quarantined = {entry["line"] for entry in entries}
    non_blank = {number for number, (kind, _) in enumerate(lines, start=1) if kind != "blank"}
    assert set(yielded) | quarantined == non_blank and not set(yielded) & quarantined
    assert reader.read + reader.quarantined == len(non_blank) and reader.line == max(non_blank)
    assert all(entry["message"] and entry["unit"] == "line" for entry in entries)
    for number, (kind, record) in enumerate(lines, start=1):
        if kind == "good":
            assert unchanged(yielded[number], record)
        if kind == "bad":
            assert number in quarantined


def array_items(key):
    """(kind, JSON text of an array item, the record when it is good)."""
    return st.one_of(
        good_records(key).map(lambda r: ("good", json.dumps(r, ensure_ascii=False, indent=2), r)),
        json_values.map(lambda v: ("any", json.dumps(v), None)),
        st.integers(1, 3000).map(lambda n: ("any", "[" * n + "]" * n, None)),
    )


@st.composite
def arrays(draw):
    """(the file's bytes, items as (kind, record), cut: the file is truncated)."""
    encoding = draw(st.sampled_from(ENCODINGS))
    items = [draw(array_items(f"item-{n}")) for n in range(1, draw(st.integers(0, 8)) + 1)]
    data = ("[\n" + ",\n".join(text for _, text, _ in items) + "\n]").encode(encoding)
    if encoding == "utf-16-be":
        data = "\ufeff".encode(encoding) + data
    cut = draw(st.none() | st.integers(0, len(data) - 1))
    return (data if cut is None else data[:cut]), [(kind, record) for kind, _, record in items], cut is not None


@SETTINGS
@given(arrays())
def test_every_item_of_any_array_is_read_or_quarantined_and_a_break_ends_it_once(tmp_path_factory, array):
    data, items, cut = array
    event(f"{len(items)} items, {'cut' if cut else 'whole'}")
    folder = tmp_path_factory.mktemp("array")
    quarantine = folder / "quarantine.jsonl"
    reader = StreamReader(io.BytesIO(data), quarantine=quarantine)
    yielded = {}
    for record in reader:
        yielded[reader.line] = record
    entries = [json.loads(line) for line in quarantine.read_text(encoding="utf-8").splitlines()] \
        if quarantine.exists() else []
    quarantined = {entry["line"] for entry in entries}
    # Every item consumed is accounted for, in order; a broken array ends with one entry saying so.
    assert set(yielded) | quarantined == set(range(1, reader.line + 1)) and not set(yielded) & quarantined
    assert reader.read + reader.quarantined == reader.line
    ended = [entry for entry in entries if entry["message"].endswith("the rest of the array is not read")]
    if ended:
        assert ended == entries[-1:]
    if not cut and reader.unit == "item":
        assert not ended and reader.line == len(items)
    for number, (kind, record) in enumerate(items, start=1):
        if kind == "good" and number in yielded:
            assert unchanged(yielded[number], record)
    if not cut:
        assert all(number in yielded for number, (kind, _) in enumerate(items, start=1) if kind == "good")


# Formats Pillow writes each mode in, and a pixel's bytes (mode "1": a byte a row of up to 8 pixels, 1 is enough).
FORMATS = {"RGB": ["PNG", "JPEG", "WEBP", "TIFF"], "RGBA": ["PNG", "WEBP", "TIFF"], "L": ["PNG", "JPEG", "TIFF"],
           "P": ["PNG", "TIFF"], "1": ["PNG", "TIFF"], "I;16": ["PNG", "TIFF"], "CMYK": ["JPEG", "TIFF"]}
BYTES = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1, "1": 1, "I;16": 2, "CMYK": 4}


@st.composite
def image_files(draw):
    """(bytes of a file named .png, True when it is a whole image within the bounds of the root below)."""
    width, height = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    mode = draw(st.sampled_from(sorted(FORMATS)))
    pixels = draw(st.binary(min_size=width * height * BYTES[mode], max_size=width * height * BYTES[mode]))
    buffer = io.BytesIO()
    Image.frombytes(mode, (width, height), pixels).save(buffer, format=draw(st.sampled_from(FORMATS[mode])))
    whole = buffer.getvalue()
    return draw(st.one_of(
        st.just((whole, width * height <= 4000)),
        st.integers(0, len(whole) - 1).map(lambda cut: (whole[:cut], False)),
        st.binary(max_size=200).map(lambda b: (b, False)),
        st.binary(max_size=200).map(lambda b: (whole[:16] + b, False)),  # a real header, then noise
    ))


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow warns of the corrupt TIFF tags it skips
@SETTINGS
@given(image_files())
def test_any_file_behind_an_image_path_is_checked_without_an_exception_but_value_error(tmp_path_factory, file):
    data, readable = file
    folder = tmp_path_factory.mktemp("images")
    (folder / "x.png").write_bytes(data)
    images = ImageRoot(folder, max_pixels=4000, cached_pixels=1000)
    try:
        images.check("x.png")
    except ValueError as error:
        event(str(error).split(":")[0].removeprefix("image 'x.png' "))
        assert not readable and "'x.png'" in str(error)
        return
    event("readable")
    image = images.open("x.png")
    assert image.mode == "RGB" and image.width * image.height <= 1000
