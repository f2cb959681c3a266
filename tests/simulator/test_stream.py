"""Record formats and readers: validation, line/field errors, image-root safety, quarantine."""

import io
import json
import os
import threading
import time

import pytest

from simulator import ImageRoot, RecordsError, StreamReader, load_records, parse_record
from simulator.records import EICRecord, EVQARecord, VLKEBRecord
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


def test_json_array_errors_name_the_line_each_record_starts_on(tmp_path):
    records = [vlkeb(), vlkeb(alt=""), vlkeb()]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(records, indent=2))
    with pytest.raises(RecordsError) as caught:
        load_records(path)
    starts = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == "  {"]
    assert [(e.line, e.field) for e in caught.value.errors] == [(starts[1], "alt")]
    path.write_text(json.dumps([vlkeb(), vlkeb()]))
    assert [r.id for r in load_records(path)] == ["1", "1"]
    path.write_text('[{"src": 1}\n {"a": 2}]')
    with pytest.raises(RecordsError, match="expected ','"):
        load_records(path)


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
