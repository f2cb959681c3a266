"""Property-based end-to-end runs: whatever a short stream mixes in with good records, `simulate` ends with exit 0
and accounts for every line (issue 11).

Streams mix records of the default world (plain, behind a byte-order mark, with unknown nested fields) with hostile
lines: broken and non-object JSON, deep nesting, wrong types, missing fields, blank and huge text, the model's
special tokens, images missing, corrupt or outside the root, bytes that are not UTF-8, and blank lines. Each
example is a whole `simulate` run (the CLI's `main`, in this process, on the embedded default model). Invariants:
no exception escapes and the exit status is 0; the good records are applied and the hostile lines quarantined,
exactly; `lines_read` = applied + quarantined + failed (+ blank lines, which hold nothing to account for); every
quarantined line is named in quarantine.jsonl with its line number and a reason. Seeds are fixed (derandomize) and
examples few: each is a run.
"""

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from simulator.cli import main
from simulator.world.export import write_world
from simulator.world.graph import WorldConfig

GOOD = 12  # records of the default world the streams draw from
TEXT_FIELDS = ("src", "alt", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
SPECIAL = ("<image>", "<s>", "</s>", "<unk>", "<pad>")  # the default model's placeholder and special tokens
HOSTILE_IMAGES = {"hostile/truncated.png": None, "hostile/text.png": b"not an image at all",
                  "hostile/empty.png": b""}  # None: the first bytes of a real image


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The default world's folder (records, images, world.json), with a few files that are no images under images/."""
    folder = write_world(WorldConfig(), tmp_path_factory.mktemp("default-world"), progress=False)
    good = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()[:GOOD]]
    (folder / "images" / "hostile").mkdir()
    for name, data in HOSTILE_IMAGES.items():
        real = (folder / "images" / good[0]["image"]).read_bytes()
        (folder / "images" / name).write_bytes(real[: len(real) // 2] if data is None else data)
    (folder / "secret.png").write_bytes((folder / "images" / good[0]["image"]).read_bytes())  # beside the root
    return folder, good


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
not_text = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     st.lists(st.text(max_size=4), max_size=2), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                                max_size=2))


def inserted(record, field, token, at):
    """`record` with `token` inserted into a text field at word position `at`."""
    words = record[field].split(" ")
    words.insert(at % (len(words) + 1), token)
    return {**record, field: " ".join(words)}


def hostile(record):
    """(kind, JSON text or bytes) of a line that must be quarantined, made from a good record."""
    text = json.dumps(record)
    field = st.sampled_from(TEXT_FIELDS)
    image = st.sampled_from(IMAGE_FIELDS)
    return st.one_of(
        st.integers(1, len(text) - 1).map(lambda cut: ("broken JSON", text[:cut])),
        st.integers(1, 3000).map(lambda n: ("deep nesting", '{"src": ' + "{" * n)),
        st.integers(1, 3000).map(lambda n: ("not an object", "[" * n + "]" * n)),
        (json_scalars | st.lists(json_values, max_size=3)).map(lambda v: ("not an object", json.dumps(v))),
        field.flatmap(lambda f: not_text.map(lambda v: ("wrong type", json.dumps({**record, f: v})))),
        st.one_of(field, image).map(lambda f: ("missing field", json.dumps({k: v for k, v in record.items()
                                                                              if k != f}))),
        field.flatmap(lambda f: st.sampled_from(["", " ", "\t \u3000"]).map(
            lambda v: ("blank text", json.dumps({**record, f: v})))),
        st.tuples(field, st.sampled_from(SPECIAL), st.integers(0, 20)).map(
            lambda t: ("special token", json.dumps(inserted(record, *t)))),
        st.tuples(field, st.integers(300, 3000)).map(
            lambda t: ("huge text", json.dumps({**record, t[0]: " ".join(["what"] * t[1])}))),
        st.tuples(image, st.sampled_from(["nowhere/missing.png", *HOSTILE_IMAGES])).map(
            lambda t: ("bad image", json.dumps({**record, t[0]: t[1]}))),
        st.tuples(image, st.sampled_from(["../secret.png", "/etc/passwd", "a/../../secret.png", "..\\secret.png"])).map(
            lambda t: ("image outside the root", json.dumps({**record, t[0]: t[1]}))),
        st.just(("not UTF-8", json.dumps({**record, "src": "où vit-il ?"}, ensure_ascii=False).encode("latin-1"))),
        # Bytes of one line (no line break) that are not blank to JSON (a BOM aside).
        st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")).filter(
            lambda b: b.replace(b"\xef\xbb\xbf", b"").strip(b" \t")).map(lambda b: ("random bytes", b)),
    )


def good_line(record):
    """(kind, JSON text) of a line that must be applied: a record as published, behind a BOM, with nested junk."""
    return st.one_of(
        st.just(("good", json.dumps(record))),
        st.just(("good behind a BOM", "\ufeff" + json.dumps(record))),
        json_values.map(lambda junk: ("good with unknown fields", json.dumps({**record, "meta": {"x": [junk]}}))),
    )


@st.composite
def streams(draw, good):
    """Lines as (kind, bytes): the first a good record, so the file is JSONL; record ids name their line."""
    lines = []
    for number in range(1, draw(st.integers(2, 10)) + 1):
        record = {**good[draw(st.integers(0, len(good) - 1))], "id": f"line-{number}"}
        kind = "good" if number == 1 else draw(st.sampled_from(["good", "good", "hostile", "hostile", "hostile",
                                                                 "blank"]))
        if kind == "good":
            line = draw(good_line(record) if number > 1 else st.just(("good", json.dumps(record))))
        elif kind == "hostile":
            line = draw(hostile(record))
        else:
            line = ("blank", draw(st.sampled_from(["", " ", "\t"])))
        lines.append((line[0], line[1] if isinstance(line[1], bytes) else line[1].encode("utf-8")))
    return lines


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_any_mix_of_good_and_hostile_lines_ends_with_exit_0_and_every_line_accounted_for(world, tmp_path_factory,
                                                                                          data):
    folder, good = world
    lines = data.draw(streams(good))
    for kind in {kind for kind, _ in lines}:
        event(kind)  # shown by --hypothesis-show-statistics: what the examples cover
    out = tmp_path_factory.mktemp("run")
    stream = folder / f"{out.name}.jsonl"  # beside world.json and images/: --model default is the world's
    stream.write_bytes(b"\n".join(raw for _, raw in lines) + b"\n")
    code = main(["--stream", str(stream), "--method", "ft-llm", "--gap", "1", "--probe-every", "2",
                 "--checkpoint-every", "2", "--retention-sample", "2", "--reference-size", "2", "--no-mlflow",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    quarantine = [json.loads(row) for row in (out / "quarantine.jsonl").read_text().splitlines()] \
        if (out / "quarantine.jsonl").exists() else []
    bad = {number for number, (kind, _) in enumerate(lines, 1) if kind != "blank" and not kind.startswith("good")}
    last = max(number for number, (kind, _) in enumerate(lines, 1) if kind != "blank")
    blank = sum(kind == "blank" for kind, _ in lines[:last])  # blank lines after the last one are not read
    applied = [row["key"] for row in map(json.loads, (out / "pool.jsonl").read_text().splitlines())]
    assert applied == [f"line-{n}" for n, (kind, _) in enumerate(lines, 1) if kind.startswith("good")]
    assert {row["line"] for row in quarantine} == bad  # each hostile line named, no good one
    assert all(row["message"] and row["unit"] == "line" for row in quarantine)
    assert (summary["edits_applied"], summary["quarantined"], summary["failed"]) == (len(applied), len(bad), 0)
    assert summary["lines_read"] == last
    assert summary["lines_read"] == summary["edits_applied"] + summary["quarantined"] + summary["failed"] + blank
