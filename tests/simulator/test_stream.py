"""Record formats and readers: validation, line/field errors, encodings, images, quarantine, stopping."""

import io
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from simulator import ImageRoot, RecordsError, StreamReader, load_records, parse_record
from simulator.records import EICRecord, EVQARecord, VLKEBRecord
from simulator.stream import ImageRootError
from tests.tiny_models import random_image


def vlkeb(**overrides):
    record = {
        "src": "What is this building?",
        "pred": "Eiffel Tower",
        "alt": "Big Ben",
        "rephrase": "Which building is shown?",
        "image": "a/1.png",
        "image_rephrase": "a/2.png",
        "loc": "Who wrote Hamlet?",
        "loc_ans": "Shakespeare",
        "m_loc": "b/1.png",
        "m_loc_q": "What animal is this?",
        "m_loc_a": "cat",
        "port_new": [
            {"port_type": "1-hop", "Q&A": {"Question": "Which city is it in?", "Answer": "London"}},
            {"port_type": "2-hop", "Q&A": {"Question": "Which country is that city in?", "Answer": "UK"}},
        ],
    }
    record.update(overrides)
    return record


@pytest.fixture
def root(tmp_path):
    for rel in ("a/1.png", "a/2.png", "b/1.png"):
        path = tmp_path / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(len(rel)).save(path)
    return ImageRoot(tmp_path / "images")


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_vlkeb_record_parses_with_hops(root):
    record = parse_record(vlkeb(), line=3, images=root)
    assert isinstance(record, VLKEBRecord)
    assert record.id == "3"  # no id: the line number is the id
    assert record.hop(2).answer == "UK" and record.hop(3) is None
    assert [p.hops for p in record.port_new] == [1, 2]
    assert parse_record(vlkeb(id=17), line=3).id == "17"


def test_mmedit_formats_parse_without_portability():
    data = vlkeb()
    del data["port_new"]
    assert isinstance(parse_record(data, 1, "evqa"), EVQARecord)
    record = parse_record({**data, "src": "a photo of", "alt": "a red bus on a street"}, 1, "eic")
    assert isinstance(record, EICRecord) and record.hop(1) is None


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"alt": 5}, "alt", "valid string"),
        ({"loc_ans": ""}, "loc_ans", "at least 1 character"),
        ({"image": "../../etc/passwd"}, "image", "inside the image root"),
        ({"m_loc": "/etc/passwd"}, "m_loc", "relative"),
        ({"port_new": [{"port_type": "5-hop", "Q&A": {"Question": "q", "Answer": "a"}}]}, "port_new[0].port_type", "1-hop"),
        ({"port_new": [{"port_type": "1-hop", "Q&A": {"Question": "q"}}]}, "port_new[0].Q&A.Answer", "required"),
        ({"port_q": "q", "port_a": "a"}, None, "missing port_edit_q, port_edit_a"),
    ],
)
def test_bad_fields_are_named(change, field, message):
    data = {k: v for k, v in {**vlkeb(), **change}.items() if v is not None}
    with pytest.raises(RecordsError) as caught:
        parse_record(data, line=9)
    (error,) = caught.value.errors
    assert (error.line, error.field) == (9, field)
    assert message in error.message
    assert "line 9" in str(caught.value)


def test_missing_field_is_named():
    data = vlkeb()
    del data["rephrase"]
    with pytest.raises(RecordsError) as caught:
        parse_record(data, line=2)
    assert [(e.line, e.field) for e in caught.value.errors] == [(2, "rephrase")]


def test_image_root_rejects_escapes_missing_and_unreadable_files(root, tmp_path):
    outside = tmp_path / "secret.png"
    random_image(9).save(outside)
    os.symlink(outside, root.root / "a" / "link.png")
    (root.root / "a" / "text.png").write_text("not an image")
    cases = {"a/link.png": "outside the image root", "a/none.png": "not found", "a/text.png": "not a readable image"}
    for relative, message in cases.items():
        with pytest.raises(RecordsError) as caught:
            parse_record(vlkeb(image_rephrase=relative), line=4, images=root)
        (error,) = caught.value.errors
        assert (error.line, error.field) == (4, "image_rephrase") and message in error.message
    assert root.open("a/1.png").mode == "RGB"


def test_jsonl_with_a_malformed_line_and_an_escaping_path_is_rejected_with_both(tmp_path, root):
    path = write_lines(
        tmp_path / "edits.jsonl",
        [json.dumps(vlkeb()), '{"src": "broken', json.dumps(vlkeb()), json.dumps(vlkeb(image="../../etc/passwd"))],
    )
    with pytest.raises(RecordsError) as caught:
        load_records(path, images=root)
    errors = [(e.line, e.field) for e in caught.value.errors]
    assert errors == [(2, None), (4, "image")]
    assert "malformed JSON" in caught.value.errors[0].message
    assert "2 bad record(s)" in str(caught.value)


def test_json_array_errors_name_the_item_index(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([vlkeb(), vlkeb(alt=""), vlkeb()], indent=2))  # pretty-printed, as VLKEB's
    with pytest.raises(RecordsError) as caught:
        load_records(path)
    assert [(e.line, e.unit, e.field) for e in caught.value.errors] == [(2, "item", "alt")]
    assert "item 2, field 'alt': " in str(caught.value)
    path.write_text(json.dumps([vlkeb(), vlkeb()]))
    assert [r.id for r in load_records(path)] == ["1", "2"]  # no id: the item index is the id


def test_broken_json_syntax_in_an_array_names_the_item_and_stops(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([vlkeb(), vlkeb()], indent=2)[:-2] + ',\n  {"src" "x"},\n' + json.dumps(vlkeb()) + "]")
    with pytest.raises(RecordsError) as caught:
        load_records(path)
    (error,) = caught.value.errors
    assert (error.line, error.unit, error.field) == (3, "item", None)
    assert "malformed JSON" in error.message and "rest of the array is not read" in error.message


def test_load_records_reads_a_json_array_incrementally_with_ijson(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([vlkeb(id="a"), vlkeb(id="b")], indent=2))
    monkeypatch.setattr(type(path), "read_text", lambda *a, **k: pytest.fail("the whole file was read"))
    assert [r.id for r in load_records(path)] == ["a", "b"]


def test_stream_quarantines_bad_lines_and_goes_on(tmp_path, root):
    path = write_lines(
        tmp_path / "edits.jsonl",
        [json.dumps(vlkeb(id="e1")), "not json", "", json.dumps(vlkeb(image="../x.png", alt="")), json.dumps(vlkeb(id="e5"))],
    )
    quarantine = tmp_path / "quarantine.jsonl"
    reader = StreamReader(path, images=root, quarantine=quarantine)
    assert [r.id for r in reader] == ["e1", "e5"]
    assert (reader.read, reader.quarantined, reader.line) == (2, 2, 5)
    entries = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [(e["line"], e["field"]) for e in entries] == [(2, None), (4, "alt"), (4, "image")]
    assert entries[0]["raw"] == "not json"


def test_stream_without_quarantine_stops_at_the_first_bad_line(tmp_path):
    path = write_lines(tmp_path / "edits.jsonl", [json.dumps(vlkeb()), "[1, 2]", json.dumps(vlkeb())])
    reader = StreamReader(path)
    with pytest.raises(RecordsError, match="line 2: expected a JSON object"):
        list(reader)
    assert reader.read == 1


def test_stream_reads_standard_input(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(vlkeb(id="x")) + "\n"))
    assert [r.id for r in StreamReader("-")] == ["x"]
    assert [r.id for r in StreamReader(io.StringIO(json.dumps(vlkeb()) + "\n"))] == ["1"]


def test_follow_waits_for_lines_appended_later_and_whole_lines_only(tmp_path):
    path = write_lines(tmp_path / "edits.jsonl", [json.dumps(vlkeb(id="a"))])
    got: list[str] = []
    reader = StreamReader(path, follow=True, poll_seconds=0.01)

    def consume():
        for record in reader:
            got.append(record.id)
            if len(got) == 3:
                return

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    wait_for(lambda: got == ["a"])
    with path.open("a") as out:
        out.write(json.dumps(vlkeb(id="b"))[:20])  # a writer mid-line: nothing may be parsed yet
        out.flush()
        time.sleep(0.1)
        assert got == ["a"]
        out.write(json.dumps(vlkeb(id="b"))[20:] + "\n" + json.dumps(vlkeb(id="c")) + "\n")
    thread.join(timeout=5)
    assert got == ["a", "b", "c"] and reader.line == 3


def test_start_line_skips_what_a_previous_run_consumed(tmp_path):
    path = write_lines(tmp_path / "edits.jsonl", [json.dumps(vlkeb(id=str(i))) for i in range(5)])
    reader = StreamReader(path, start_line=3)
    assert [r.id for r in reader] == ["3", "4"] and reader.line == 5


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def write_array(path, records):
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def test_stream_reads_a_pretty_printed_array_and_quarantines_a_bad_item_in_the_middle(tmp_path, root):
    path = write_array(tmp_path / "eval.json", [vlkeb(id="e1"), vlkeb(alt="", image="../x.png"), 7, vlkeb(id="e4")])
    quarantine = tmp_path / "quarantine.jsonl"
    reader = StreamReader(path, images=root, quarantine=quarantine)
    assert [r.id for r in reader] == ["e1", "e4"]
    assert (reader.read, reader.quarantined, reader.line, reader.unit) == (2, 2, 4, "item")
    assert reader.tally() == "4 items read, 2 quarantined"
    entries = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [(e["line"], e["unit"], e["field"]) for e in entries] == [(2, "item", "alt"), (2, "item", "image"),
                                                                     (3, "item", None)]
    assert json.loads(entries[0]["raw"])["alt"] == "" and "expected a JSON object" in entries[2]["message"]


def test_stream_stops_cleanly_where_array_syntax_breaks(tmp_path):
    good = json.dumps([vlkeb(id="a"), vlkeb(id="b")], indent=2)[:-2]
    (tmp_path / "eval.json").write_text(good + ',\n  {"src" 3},\n' + json.dumps(vlkeb(id="d")) + "]")
    quarantine = tmp_path / "quarantine.jsonl"
    reader = StreamReader(tmp_path / "eval.json", quarantine=quarantine)
    assert [r.id for r in reader] == ["a", "b"]
    (entry,) = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert (entry["line"], entry["unit"]) == (3, "item") and "malformed JSON" in entry["message"]
    with pytest.raises(RecordsError, match="item 3: malformed JSON"):
        list(StreamReader(tmp_path / "eval.json"))


def test_format_is_decided_by_the_first_non_blank_character_after_a_bom(tmp_path):
    array = tmp_path / "eval.json"
    array.write_bytes(b"\xef\xbb\xbf\n \n" + json.dumps([vlkeb(id="a")]).encode())
    assert [r.id for r in StreamReader(array)] == ["a"]
    assert [r.id for r in load_records(array)] == ["a"]
    lines = tmp_path / "edits.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf\n\n" + json.dumps(vlkeb()).encode() + b"\r\n")
    reader = StreamReader(lines)
    assert [r.id for r in reader] == ["3"] and (reader.line, reader.unit) == (3, "line")
    assert [r.id for r in load_records(lines)] == ["3"]


def test_an_array_on_standard_input_and_start_line_counting_items(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps([vlkeb(id="x"), vlkeb(id="y")], indent=2)))
    assert [r.id for r in StreamReader("-")] == ["x", "y"]
    path = write_array(tmp_path / "eval.json", [vlkeb(id=str(i)) for i in range(5)])
    reader = StreamReader(path, start_line=3)
    assert [r.id for r in reader] == ["3", "4"] and reader.line == 5


def test_follow_reads_an_array_once_and_waits_for_a_first_jsonl_line(tmp_path):
    path = write_array(tmp_path / "eval.json", [vlkeb(id="a")])
    assert [r.id for r in StreamReader(path, follow=True, poll_seconds=0.01)] == ["a"]  # ends: arrays are whole
    empty = tmp_path / "edits.jsonl"
    empty.write_text("")
    got: list[str] = []
    reader = StreamReader(empty, follow=True, poll_seconds=0.01)
    thread = threading.Thread(target=lambda: got.extend(r.id for r in reader), daemon=True)
    thread.start()
    time.sleep(0.05)
    empty.write_text("\n" + json.dumps(vlkeb(id="late")) + "\n")
    wait_for(lambda: got == ["late"])
    reader.stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and reader.line == 2


def test_vlkeb_edit_onehop_items_parse_and_feed_the_one_hop_edit():
    item = {"port_q": "Which city is it in?", "port_a": "Paris", "port_edit_q": "Where is Big Ben?",
            "port_edit_a": "Paris"}
    record = parse_record(vlkeb(port_new=[item]), line=1)
    assert (record.one_hop().question, record.one_hop().answer) == ("Which city is it in?", "Paris")
    assert (record.port_edit_q, record.port_edit_a) == ("Where is Big Ben?", "Paris")
    assert record.hop(1) is None  # edit_onehop records carry no k-hop tests
    assert VLKEBRecord.model_validate(record.model_dump(mode="json", by_alias=True)) == record  # checkpoints
    flat = parse_record(vlkeb(**item), line=1)  # the synthetic world's layout: top level, beside port_new hops
    assert flat.port_edit_q == "Where is Big Ben?" and flat.hop(1).answer == "London"


@pytest.mark.parametrize(
    "port_new, extra, field, message",
    [
        ([{"port_q": "q", "port_a": "a"}], {}, "port_new[0].port_edit_q", "required"),
        ([{"question": "q"}], {}, "port_new[0]", "port_type and Q&A (multi-hop) or port_q"),
        ([{"port_q": "q", "port_a": "a", "port_edit_q": "e", "port_edit_a": "f"}] * 2, {}, None, "one one-hop edit"),
        ([{"port_q": "q", "port_a": "a", "port_edit_q": "e", "port_edit_a": "f"}],
         {"port_q": "q", "port_a": "a", "port_edit_q": "e", "port_edit_a": "f"}, None, "given twice"),
    ],
)
def test_bad_edit_onehop_items_are_named(port_new, extra, field, message):
    with pytest.raises(RecordsError) as caught:
        parse_record(vlkeb(port_new=port_new, **extra), line=5)
    assert [e.field for e in caught.value.errors][0] == field
    assert message in caught.value.errors[0].message


def test_mmedit_formats_refuse_vlkeb_fields_instead_of_dropping_them(tmp_path):
    with pytest.raises(RecordsError) as caught:
        parse_record(vlkeb(port_q="q", port_a="a", port_edit_q="e", port_edit_a="f"), line=2, record_format="evqa")
    assert [e.field for e in caught.value.errors] == ["port_new", "port_q", "port_a", "port_edit_q", "port_edit_a"]
    assert "line 2, field 'port_new': belongs to --format vlkeb; --format evqa" in str(caught.value)
    path = write_array(tmp_path / "eval.json", [vlkeb(), vlkeb()])
    reader = StreamReader(path, record_format="eic", quarantine=tmp_path / "q.jsonl")
    assert list(reader) == [] and reader.quarantined == 2


def test_metadata_no_format_reads_is_accepted_and_reported_once_per_stream(tmp_path, caplog):
    records = [vlkeb(source="wiki", port_new=[{"port_type": "1-hop", "Q&A": {"Question": "q", "Answer": "a"},
                                               "entity": "m.01"}]), vlkeb(source="wiki", category="x")]
    path = write_lines(tmp_path / "edits.jsonl", [json.dumps(r) for r in records])
    caplog.set_level("WARNING", logger="simulator.stream")
    assert len(list(StreamReader(path))) == 2
    warned = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warned) == 2
    assert "line 1: field(s) 'source', 'port_new[].entity' ignored" in warned[0]
    assert "line 2: field(s) 'category' ignored" in warned[1]
    data = vlkeb(source="wiki")
    del data["port_new"]
    assert parse_record(data, 1, "evqa").src == data["src"]


def test_a_blank_answer_is_a_bad_record_not_a_failed_run(tmp_path):
    record = {"src": "q?", "alt": "   ", "rephrase": "q2?", "image": "a.png", "image_rephrase": "a.png",
              "loc": "l?", "loc_ans": "x", "m_loc": "a.png", "m_loc_q": "m?", "m_loc_a": "y"}
    with pytest.raises(RecordsError, match="line 3, field 'alt': Value error, must not be blank"):
        parse_record(record, 3)


def quarantine_entries(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_each_line_is_decoded_and_parsed_on_its_own(tmp_path):
    lines = [
        json.dumps(vlkeb(id="e1")).encode(),
        json.dumps(vlkeb(src="Qu'est-ce, ce bâtiment ?"), ensure_ascii=False).encode("latin-1"),  # a Latin-1 line
        b'{"id": ' + b"1" * 5000 + b"}",  # json.loads: ValueError, over Python's int max str digits
        b'{"src": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # json.loads: RecursionError
        json.dumps(vlkeb(src="a\ud800b")).encode(),  # a \ud800 escape: valid JSON, not text
        json.dumps(vlkeb(id="e6")).encode(),
    ]
    path = tmp_path / "edits.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    quarantine = tmp_path / "quarantine.jsonl"
    reader = StreamReader(path, quarantine=quarantine)
    assert [r.id for r in reader] == ["e1", "e6"]
    assert (reader.read, reader.quarantined, reader.line) == (2, 4, 6)
    entries = quarantine_entries(quarantine)
    assert [(e["line"], e["field"]) for e in entries] == [(2, None), (3, None), (4, None), (5, "src")]
    assert "not UTF-8 text: invalid continuation byte" in entries[0]["message"]
    assert "Qu'est-ce, ce b\ufffdtiment" in entries[0]["raw"]
    assert "unreadable JSON: ValueError: Exceeds the limit (4300 digits)" in entries[1]["message"]
    assert "unreadable JSON: RecursionError" in entries[2]["message"]
    assert "unicode" in entries[3]["message"]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_a_utf16_or_utf32_file_is_read_by_its_byte_order_mark(tmp_path, encoding, layout):
    # U+0A41 U+2000 in UTF-16-LE (41 0A 00 20) and U+2000 U+0A41 in -BE (20 00 0A 41) hold a newline's bytes.
    records = [vlkeb(id="a", src="Welches Gebäude ist das? 这是什么建筑？ 🏛"), vlkeb(id="b", src="\u0a41\u2000\u0a41")]
    text = json.dumps(records, ensure_ascii=False, indent=2) if layout == "array" else "\r\n".join(
        json.dumps(r, ensure_ascii=False) for r in records) + "\r\n"
    path = tmp_path / "edits.json"
    path.write_bytes("\ufeff".encode(encoding) + text.encode(encoding))  # as Windows tools write UTF-16
    reader = StreamReader(path, quarantine=tmp_path / "q.jsonl")
    assert [(r.id, r.src) for r in reader] == [(r["id"], r["src"]) for r in records]
    assert (reader.read, reader.quarantined, reader.unit) == (2, 0, "item" if layout == "array" else "line")
    assert [r.id for r in load_records(path)] == ["a", "b"]


def test_a_broken_line_of_a_utf16_file_costs_that_line_only(tmp_path):
    good = [json.dumps(vlkeb(id=name), ensure_ascii=False).encode("utf-16-le") for name in ("a", "c")]
    lone = json.dumps(vlkeb(id="b"))[:-1].encode("utf-16-le") + b"\x00\xd8" + b"}\x00"  # a lone high surrogate
    newline = "\n".encode("utf-16-le")
    path = tmp_path / "edits.jsonl"
    path.write_bytes(b"\xff\xfe" + newline.join([good[0], lone, good[1]]) + newline)
    quarantine = tmp_path / "quarantine.jsonl"
    reader = StreamReader(path, quarantine=quarantine)
    assert [r.id for r in reader] == ["a", "c"]
    ((entry),) = quarantine_entries(quarantine)
    assert entry["line"] == 2 and "not UTF-16-LE text" in entry["message"]


def test_a_utf8_bom_never_costs_a_record(tmp_path, monkeypatch):
    record = json.dumps(vlkeb(id="a")).encode()
    first = tmp_path / "first.jsonl"
    first.write_bytes(b"\xef\xbb\xbf" + record + b"\n")
    joined = tmp_path / "joined.jsonl"  # `cat a.jsonl b.jsonl` of two files saved with a BOM
    joined.write_bytes(first.read_bytes() + b"\xef\xbb\xbf" + json.dumps(vlkeb(id="b")).encode() + b"\n")
    quarantine = tmp_path / "q.jsonl"
    assert [r.id for r in StreamReader(first, quarantine=quarantine)] == ["a"]
    assert [r.id for r in StreamReader(joined, quarantine=quarantine)] == ["a", "b"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeff" + record.decode() + "\n"))
    assert [r.id for r in StreamReader("-", quarantine=quarantine)] == ["a"]
    assert not quarantine.exists()


def test_an_array_item_nested_too_deep_is_one_bad_item_and_the_rest_is_read(tmp_path):
    path = tmp_path / "eval.json"
    deep = "[" * 5000 + "]" * 5000
    path.write_text(f"[{json.dumps(vlkeb(id='a'))},\n{deep},\n{json.dumps(vlkeb(id='c'))}]")
    quarantine = tmp_path / "quarantine.jsonl"
    reader = StreamReader(path, quarantine=quarantine)
    assert [r.id for r in reader] == ["a", "c"]
    ((entry),) = quarantine_entries(quarantine)
    assert (entry["line"], entry["unit"]) == (2, "item") and "nested deeper than" in entry["message"]


def test_any_parser_error_ends_an_array_with_one_entry(tmp_path):
    path = tmp_path / "eval.json"
    good = json.dumps(vlkeb(id="a")).encode("utf-16-le")
    path.write_bytes(b"\xff\xfe" + "[".encode("utf-16-le") + good + ",\n".encode("utf-16-le") + b"\x00\xd8"
                     + json.dumps(vlkeb(id="b")).encode("utf-16-le") + "]".encode("utf-16-le"))
    quarantine = tmp_path / "quarantine.jsonl"
    reader = StreamReader(path, quarantine=quarantine)
    assert [r.id for r in reader] == ["a"]
    ((entry),) = quarantine_entries(quarantine)
    assert entry["line"] == 2 and "malformed JSON" in entry["message"]
    assert entry["message"].endswith("the rest of the array is not read")
    # Python's own error inside ijson (an integer of 5000 digits): ijson loses the events of the block it
    # was parsing, so the entry names the first item not read.
    path.write_text(f"[{json.dumps(vlkeb(id='a'))}, {'1' * 5000}, {json.dumps(vlkeb(id='c'))}]")
    quarantine.unlink()
    reader = StreamReader(path, quarantine=quarantine)
    assert [r.id for r in reader] == []
    ((entry),) = quarantine_entries(quarantine)
    assert entry["line"] == 1 and "ValueError: Exceeds the limit (4300 digits)" in entry["message"]
    assert entry["message"].endswith("the rest of the array is not read")


def test_an_array_keeps_integers_past_64_bits():
    path = io.BytesIO(json.dumps([vlkeb(id=2**64), vlkeb(t=1.5e300)]).encode())
    assert [(r.id, r.t) for r in StreamReader(path)] == [(str(2**64), None), ("2", 1.5e300)]


def png_header(width, height):
    """A PNG that is only a header: signature, IHDR and IEND, no pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_images_are_decoded_whole_when_a_record_is_checked(root):
    whole = (root.root / "a" / "1.png").read_bytes()
    (root.root / "a" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root.root / "a" / "header.png").write_bytes(png_header(5000, 5000))  # opens as a PNG, has no pixels
    (root.root / "a" / "bomb.png").write_bytes(png_header(30_000, 30_000))  # 900 MP: Pillow's bomb error
    cases = {"a/truncated.png": "not a readable image", "a/header.png": "not a readable image",
             "a/bomb.png": "decompression bomb"}
    for relative, message in cases.items():
        with pytest.raises(RecordsError) as caught:
            parse_record(vlkeb(image=relative), line=4, images=root)
        (error,) = caught.value.errors
        assert (error.line, error.field) == (4, "image") and message in error.message, error.message


def test_pixel_bounds_ours_and_pillows(tmp_path, monkeypatch):
    random_image(1, (40, 40)).save(tmp_path / "square.png")  # 1600 pixels
    with pytest.raises(ValueError, match="40 x 40 = 1,600 pixels, over the bound of 1,000"):
        ImageRoot(tmp_path, max_pixels=1000).check("square.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's check off: ours still holds
    with pytest.raises(ValueError, match="over the bound"):
        ImageRoot(tmp_path, max_pixels=1000).check("square.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow only warns below twice its limit
    with pytest.raises(ValueError, match="decompression bomb"):
        ImageRoot(tmp_path, max_pixels=10**9).check("square.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)
    with pytest.raises(ValueError, match="decompression bomb"):
        ImageRoot(tmp_path, max_pixels=10**9).check("square.png")


def test_images_are_scaled_down_before_caching(tmp_path):
    random_image(1, (60, 40)).save(tmp_path / "wide.png")
    image = ImageRoot(tmp_path, cached_pixels=1200).open("wide.png")
    assert (image.width, image.height, image.mode) == (28, 42, "RGB")  # 2400 pixels scaled by sqrt(1/2)
    assert ImageRoot(tmp_path).open("wide.png").size == (40, 60)


def test_a_checked_image_is_not_decoded_again_and_the_cache_is_bounded_in_bytes(tmp_path, monkeypatch):
    for name in "abcd":
        random_image(ord(name)).save(tmp_path / f"{name}.png")  # 20 x 24 RGB: 1440 bytes decoded
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path).name) or real_open(path, *a, **k))
    images = ImageRoot(tmp_path, cache_bytes=3 * 1440)
    images.check("a.png")
    images.open("a.png")
    assert opened == ["a.png"]
    for name in "bcd":
        images.open(f"{name}.png")
    images.open("d.png")
    images.open("a.png")  # the least recently used: dropped for d
    assert opened == ["a.png", "b.png", "c.png", "d.png", "a.png"]


def test_a_deleted_image_root_stops_the_stream_instead_of_quarantining_it(tmp_path):
    images = tmp_path / "images"
    for rel in ("a/1.png", "a/2.png", "b/1.png", "c/1.png", "c/2.png", "d/1.png"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        random_image(len(rel)).save(images / rel)
    path = write_lines(tmp_path / "edits.jsonl", [
        json.dumps(vlkeb(id="e1")),
        json.dumps(vlkeb(id="e2", image="c/1.png", image_rephrase="c/2.png", m_loc="d/1.png")),
    ])
    quarantine = tmp_path / "quarantine.jsonl"
    reader = StreamReader(path, images=ImageRoot(images), quarantine=quarantine)
    records = iter(reader)
    assert next(records).id == "e1"
    shutil.rmtree(images)
    with pytest.raises(ImageRootError, match="is gone"):
        next(records)
    assert (reader.line, reader.read, reader.quarantined) == (1, 1, 0)  # a resume reads line 2 again
    assert not quarantine.exists()
    with pytest.raises(ImageRootError):
        reader.images.open("c/2.png")


STOPPING_CHILD = """
import sys, threading
from simulator.signals import stopping_on_signals
from simulator.stream import StreamReader
stop = threading.Event()
with stopping_on_signals(stop):
    print("ready", flush=True)
    for record in StreamReader("-", quarantine=sys.argv[1], stop=stop, poll_seconds=0.1):
        print(record.id, flush=True)
print("stopped", flush=True)
"""


@pytest.mark.parametrize("first", [json.dumps(vlkeb(id="a")) + "\n", "[" + json.dumps(vlkeb(id="a")) + ",\n"])
def test_sigterm_stops_a_reader_of_standard_input_that_gets_no_data(tmp_path, first):
    quarantine = tmp_path / "quarantine.jsonl"
    child = subprocess.Popen([sys.executable, "-c", STOPPING_CHILD, str(quarantine)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=60) == "ready\n"
        child.stdin.write(first)  # a record, then nothing; the writer keeps its end open
        child.stdin.flush()
        assert lines.get(timeout=10) == "a\n"
        sent = time.monotonic()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=5) == 0 and time.monotonic() - sent < 2
        assert lines.get(timeout=5) == "stopped\n"
        assert not quarantine.exists()  # a stop is not a broken array
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
