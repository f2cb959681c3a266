"""Data as VLKEB / MMEdit publish it, streamed end to end through `simulate` on the embedded default model.

VLKEB ships pretty-printed JSON arrays (`eval.json`, `eval_multihop.json`, `eval_edit_onehop.json`);
its edit_onehop loader reads `port_q`, `port_a`, `port_edit_q`, `port_edit_a` from each `port_new`
item. The files here are rebuilt in those layouts from a few records of the default synthetic world.
"""

import json
import re

import pytest

from simulator.cli import main
from simulator.world.export import edit_records
from simulator.world.graph import WorldConfig, build_world

RECORDS = 3
EDITWATCH_ONLY = ("id", "port_base", "port_q", "port_a", "port_edit_q", "port_edit_a")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A folder with `images/` and VLKEB-layout files of the default world's first eval records.

    No world.json beside them: `--model default` is the embedded model (the default world's).
    """
    folder = tmp_path_factory.mktemp("published")
    world = build_world(WorldConfig())
    records = edit_records(world, "eval")[:RECORDS]
    (folder / "images").mkdir()
    for record in records:
        for name in (record["image"], record["image_rephrase"], record["m_loc"]):
            creature, variant = map(int, re.fullmatch(r"c(\d+)_r(\d+)\.png", name).groups())
            world.image(creature, variant).save(folder / "images" / name)
    multihop = [{k: v for k, v in r.items() if k not in EDITWATCH_ONLY} for r in records]
    onehop = [{**m, "port_new": [{k: r[k] for k in ("port_q", "port_a", "port_edit_q", "port_edit_a")}]}
              for m, r in zip(multihop, records)]
    (folder / "eval_multihop.json").write_text(json.dumps(multihop, indent=2))
    (folder / "eval_edit_onehop.json").write_text(json.dumps(onehop, indent=2))
    return folder, multihop, onehop


def simulate(stream, images, out, *flags):
    return main(["--stream", str(stream), "--images", str(images), "--out", str(out), "--no-mlflow", *flags])


def outputs(out):
    summary = json.loads((out / "summary.json").read_text())
    quarantine = out / "quarantine.jsonl"
    entries = [json.loads(line) for line in quarantine.read_text().splitlines()] if quarantine.exists() else []
    return summary, entries


def test_a_pretty_printed_array_streams_end_to_end_with_a_bad_item_quarantined(published, tmp_path):
    folder, multihop, _ = published
    items = [multihop[0], {**multihop[1], "alt": ""}, multihop[2]]
    stream = tmp_path / "eval.json"
    stream.write_text(json.dumps(items, indent=2))
    assert simulate(stream, folder / "images", tmp_path / "out", "--method", "none", "--gap", "1") == 0
    summary, quarantine = outputs(tmp_path / "out")
    assert (summary["edits_read"], summary["edits_applied"], summary["quarantined"]) == (2, 2, 1)
    assert [(q["line"], q["unit"], q["field"]) for q in quarantine] == [(2, "item", "alt")]
    assert summary["results"]["gap_1"]["edits_measured"] == 1 and "port_4hop" in summary["results"]["gap_1"]


def test_an_edit_onehop_file_drives_the_one_hop_edit(published, tmp_path, monkeypatch):
    import simulator.timeline

    folder, _, onehop = published
    second_edits = []
    original = simulator.timeline.one_hop_request

    def spy(record, images):
        request = original(record, images)
        second_edits.append((request.prompt, request.target))
        return request

    monkeypatch.setattr(simulator.timeline, "one_hop_request", spy)
    code = simulate(folder / "eval_edit_onehop.json", folder / "images", tmp_path / "out", "--method", "ike",
                    "--gap", "1", "--probe-every", str(RECORDS), "--one-hop-edit")
    assert code == 0
    summary, quarantine = outputs(tmp_path / "out")
    assert quarantine == [] and summary["edits_applied"] == RECORDS
    assert second_edits == [(r["port_new"][0]["port_edit_q"], r["port_new"][0]["port_edit_a"]) for r in onehop]
    assert "port_onehop" in summary["results"]["gap_1"]
    (round_row,) = [json.loads(line) for line in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    assert round_row["memory_size"] == 2 * RECORDS  # each record's edit and its one-hop edit


@pytest.mark.parametrize("name, text, tally", [
    ("bad.jsonl", "{not json\n[1]\n\n{\"src\": \"q\"}\n", "4 lines read, 3 quarantined"),
    ("bad.json", json.dumps([{"src": "q"}, 5], indent=2), "2 items read, 2 quarantined"),
])
def test_a_file_of_only_bad_records_exits_2_with_a_one_line_diagnosis(published, tmp_path, capsys, name, text, tally):
    folder, _, _ = published
    stream = tmp_path / name
    stream.write_text(text)
    out = tmp_path / "out"
    assert simulate(stream, folder / "images", out, "--method", "none") == 2
    err = capsys.readouterr().err
    (last,) = [line for line in err.splitlines() if line.startswith("simulate:")]
    assert last == f"simulate: error: no usable record in {stream}: {tally} (see {out / 'quarantine.jsonl'})"
    summary, quarantine = outputs(out)  # the summary and quarantine are still written
    assert summary["edits_read"] == 0 and summary["quarantined"] == int(tally.split(", ")[1].split()[0])


def test_an_empty_stream_exits_2(published, tmp_path, capsys):
    folder, _, _ = published
    (tmp_path / "empty.jsonl").write_text("\n")
    assert simulate(tmp_path / "empty.jsonl", folder / "images", tmp_path / "out", "--method", "none") == 2
    assert "no usable record in" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["edits_read"] == 0


def test_evqa_on_vlkeb_records_says_which_format_the_fields_belong_to(published, tmp_path, capsys):
    folder, multihop, _ = published
    assert simulate(folder / "eval_multihop.json", folder / "images", tmp_path / "out", "--method", "none",
                    "--format", "evqa") == 2
    assert f"no usable record in {folder / 'eval_multihop.json'}: {RECORDS} items read" in capsys.readouterr().err
    _, quarantine = outputs(tmp_path / "out")
    assert {(q["field"], q["message"].split(";")[0]) for q in quarantine} == {("port_new", "belongs to --format vlkeb")}
    without = tmp_path / "evqa.json"  # the same records without VLKEB's extra field are E-VQA records
    without.write_text(json.dumps([{k: v for k, v in r.items() if k != "port_new"} for r in multihop], indent=2))
    assert simulate(without, folder / "images", tmp_path / "out2", "--method", "none", "--format", "evqa") == 0
