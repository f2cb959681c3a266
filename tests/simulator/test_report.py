"""`simulate report`: its checks against the run's own thresholds, and the page as headless Chromium loads it."""

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image

from simulator.cli import main
from simulator.command import CommandError
from simulator.report import ReportOptions, checks, load_run, plotted, render

CHROMIUM = "chromium-headless-shell"
STEPS = (5, 10, 15, 20)


def chromium() -> str:
    """The headless browser; skipped where it is not installed, except under CI, which must install it."""
    path = shutil.which(CHROMIUM)
    if path is None:
        message = f"{CHROMIUM} is not installed (apt-get install {CHROMIUM})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " — CI must install it")
        pytest.skip(message)
    return path


def round_row(step, ppl, retention=1.0, forgetting=0.0, low=None, high=None, t_loc=1.0, i_loc=1.0, limits=2.0):
    """One rounds.jsonl line as the timeline writes it (collapse judged on `ppl` > `limits`)."""
    low = retention if low is None else low
    high = retention if high is None else high
    significant = forgetting > 0 and high < retention + forgetting
    reasons = [f"reference perplexity ratio {ppl:.3g} > {limits}"] if ppl > limits else []
    return {"round": STEPS.index(step) + 1, "edits_applied": step, "edits_read": step, "failed": 0,
            "retention": retention, "retention_ci_low": low, "retention_ci_high": high, "retention_sample": 4.0,
            "forgetting": forgetting, "ref_agreement": 0.9, "ref_ppl_ratio": ppl, "weight_change_norm": step / 2,
            "collapse_alarm": float(bool(reasons)), "forgetting_significant": significant, "alarms": reasons,
            "results": {"gap_1": {"reliability": 1.0, "t_loc": t_loc, "i_loc": i_loc},
                        "gap_5": {"reliability": 1.0, "t_loc": t_loc, "i_loc": i_loc}},
            "probe_seconds": 0.1, "edits_per_second": 3.0}


def write_run(folder, rows, collapse=None, summary=True, name=None):
    """A run folder as `simulate` leaves it: config.json, rounds.jsonl and (finished) summary.json."""
    folder.mkdir(parents=True)
    collapse = {"ppl_ratio": 2.0, "agreement": 0.5, "weight_change": None, "retention": None, **(collapse or {})}
    config = {"stream": "edits.jsonl", "method": "ft-llm", "gap": [1, 5], "seed": 0, "collapse": collapse,
              "run_name": name}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if summary:
        crossed = [row for row in rows if row["alarms"]]
        forgot = [row for row in rows if row["forgetting_significant"]]
        last = rows[-1]
        (folder / "summary.json").write_text(json.dumps({
            "run": name or folder.name, "method": "ft-llm", "model": "tiny", "mode": "sequential", "gaps": [1, 5],
            "edits_read": last["edits_applied"], "edits_applied": last["edits_applied"], "quarantined": 0,
            "failed": 0, "rounds": len(rows), "stopped": "end of stream",
            "results": {setting: {**means, "edits_measured": 19} for setting, means in last["results"].items()},
            "base": {"pred_src": 0.9, "loc": 1.0},
            "health": {"retention": last["retention"], "ref_ppl_ratio": last["ref_ppl_ratio"]},
            "alarms": {"collapse": {"raised": bool(crossed), "first_at": crossed[0]["edits_applied"] if crossed else None,
                                    "reasons": crossed[0]["alarms"] if crossed else []},
                       "forgetting": {"detected": bool(forgot), "first_at": forgot[0]["edits_applied"] if forgot else None}},
        }))
    return folder


HEALTHY = [round_row(step, 1.0 + step / 100) for step in STEPS]
# Perplexity ratio crosses the run's threshold 1.5 at 15 edits; retention falls to 0.55, its interval
# below reliability at edit time from 10 edits on; locality falls to 0.7 (text) and 0.85 (image).
SICK = [round_row(5, 1.1, limits=1.5), round_row(10, 1.4, 0.8, 0.2, 0.7, 0.9, limits=1.5),
        round_row(15, 2.5, 0.6, 0.4, 0.5, 0.7, 0.7, 0.85, limits=1.5),
        round_row(20, 9.0, 0.55, 0.45, 0.45, 0.65, 0.7, 0.85, limits=1.5)]


def states(found):
    return {check.ident: check.state for check in found}


def test_checks_use_the_thresholds_of_the_runs_config(tmp_path):
    sick = load_run(write_run(tmp_path / "sick", SICK, {"ppl_ratio": 1.5}))
    found = checks(sick, ReportOptions())
    assert states(found) == {"collapse": "fail", "forgetting": "fail", "retention": "fail", "t_loc-gap_1": "fail",
                             "i_loc-gap_1": "pass", "t_loc-gap_5": "fail", "i_loc-gap_5": "pass"}
    collapse = found[0]
    assert "ref_ppl_ratio above 1.5" in collapse.threshold  # the run's own threshold, not the default 2
    assert "first alarm after 15 edits" in collapse.detail and "highest ref_ppl_ratio 9" in collapse.detail
    assert "significant after 10 edits" in found[1].detail
    assert "0.550" in found[2].detail and found[2].threshold == "floor 0.8, report default"
    healthy = load_run(write_run(tmp_path / "healthy", HEALTHY))
    assert set(states(checks(healthy, ReportOptions())).values()) == {"pass"}
    # A run whose threshold is 1.1 collapses on the same numbers that pass at 2.
    strict = load_run(write_run(tmp_path / "strict", [round_row(s, 1.0 + s / 100, limits=1.1) for s in STEPS],
                                {"ppl_ratio": 1.1}))
    assert states(checks(strict, ReportOptions()))["collapse"] == "fail"


def test_floors_come_from_the_flags_then_the_runs_collapse_retention_then_the_default(tmp_path):
    rows = [round_row(step, 1.0, retention=0.7, t_loc=0.85) for step in STEPS]
    run = load_run(write_run(tmp_path / "a", rows))
    assert states(checks(run, ReportOptions()))["retention"] == "fail"  # 0.7 < 0.8
    assert states(checks(run, ReportOptions(retention_floor=0.6)))["retention"] == "pass"
    assert states(checks(run, ReportOptions(t_loc_floor=0.9)))["t_loc-gap_1"] == "fail"
    own = load_run(write_run(tmp_path / "b", rows, {"retention": 0.65}))
    check = next(c for c in checks(own, ReportOptions()) if c.ident == "retention")
    assert check.state == "pass" and check.threshold == "floor 0.65, the run's collapse.retention"


def test_an_unfinished_run_is_reported_from_its_rounds(tmp_path):
    run = load_run(write_run(tmp_path / "going", SICK[:3], {"ppl_ratio": 1.5}, summary=False))
    found = {check.ident: check for check in checks(run, ReportOptions())}
    assert found["collapse"].state == "fail" and "after 15 edits" in found["collapse"].detail
    assert found["retention"].detail.startswith("retention after the last round 0.600")  # the last round's
    assert found["t_loc-gap_1"].state == "fail"  # the running means of the last round


def test_a_resumed_run_is_read_from_its_rounds_not_the_summary_of_its_earlier_end(tmp_path):
    # Interrupted at 10 edits (healthy), resumed and now at 20 (sick): the summary of 10 edits is left until it ends.
    folder = write_run(tmp_path / "resumed", HEALTHY[:2], {"ppl_ratio": 1.5})
    (folder / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in HEALTHY[:2] + SICK[2:]))
    run = load_run(folder)
    assert run.summary is None and run.stale
    found = {check.ident: check for check in checks(run, ReportOptions())}
    assert found["collapse"].state == "fail" and found["retention"].detail.startswith(
        "retention after the last round 0.550")
    assert "resumed since summary.json was written" in render([run], ReportOptions())


def test_nan_or_inf_in_the_last_round_is_shown_not_an_older_value(tmp_path):
    # The files hold NaN/Inf as null, and so does the summary's health: it is the run's value, not a gap.
    rows = HEALTHY[:3] + [{**HEALTHY[3], "ref_ppl_ratio": None, "retention": None}]
    for summary in (True, False):
        run = load_run(write_run(tmp_path / str(summary), rows, summary=summary))
        assert run.run_value("ref_ppl_ratio") != run.run_value("ref_ppl_ratio")  # NaN
        found = {check.ident: check for check in checks(run, ReportOptions())}
        assert "highest ref_ppl_ratio nan" in found["collapse"].detail, found["collapse"].detail
        assert found["retention"].state == "fail" and "nan" in found["retention"].detail
    unjudged = [{k: v for k, v in row.items() if k not in ("ref_ppl_ratio", "ref_agreement")} for row in HEALTHY]
    collapse = checks(load_run(write_run(tmp_path / "plain", unjudged, summary=False)), ReportOptions())[0]
    assert collapse.detail == "no alarm in 4 probe rounds"  # nothing to add: no dangling separator


def test_a_single_mode_run_has_no_rounds_to_judge_but_its_locality(tmp_path):
    folder = tmp_path / "single"
    write_run(folder, HEALTHY[:1])
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(mode="single", rounds=0, health={}, results={"single": {"reliability": 1.0, "t_loc": 0.5, "i_loc": 0.9}})
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "rounds.jsonl").write_text("")
    run = load_run(folder)
    assert states(checks(run, ReportOptions())) == {"collapse": "n/a", "forgetting": "n/a", "retention": "n/a",
                                                     "t_loc-single": "fail", "i_loc-single": "pass"}
    html = render([run], ReportOptions())
    assert "No probe round yet: nothing to plot." in html and "<img" not in html
    assert 'data-state="n/a"><span class="state">N/A</span> <b class="name">collapse</b>' in html


class Page(HTMLParser):
    """What the test reads of the DOM Chromium dumped: images, checks, tables, every URL."""

    def __init__(self):
        super().__init__()
        self.images, self.checks, self.ids, self.urls = {}, {}, set(), []
        self._check = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        self.urls += [value for name, value in attrs.items() if name in ("src", "href") and value]
        if tag == "img":
            self.images[attrs["alt"].partition(":")[0]] = attrs["src"]
        if tag == "li" and "check" in attrs.get("class", ""):
            self._check = attrs["id"]
            self.checks[self._check] = {"state": attrs["data-state"], "text": ""}

    def handle_endtag(self, tag):
        if tag == "li":
            self._check = None

    def handle_data(self, data):
        if self._check:
            self.checks[self._check]["text"] += data


def loaded(path):
    """The page as headless Chromium loaded it (its DOM), and a screenshot of it."""
    browser = chromium()
    flags = [browser, "--headless", "--disable-gpu", "--no-sandbox"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120, check=True)
    shot = path.with_suffix(".png")
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,2000", path.as_uri()], capture_output=True,
                   timeout=120, check=True)
    page = Page()
    page.feed(dom.stdout)
    return page, shot


def decoded(src):
    """An image of a data: URL, decoded."""
    head, _, data = src.partition(",")
    assert head == "data:image/png;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_the_page_loads_in_chromium_with_every_plot_and_check(tmp_path, capsys):
    sick = write_run(tmp_path / "sick", SICK, {"ppl_ratio": 1.5})
    healthy = write_run(tmp_path / "healthy", HEALTHY)
    out = tmp_path / "report" / "sick.html"
    assert main(["report", str(sick), "--against", str(healthy), "--out", str(out), "--t-loc-floor", "0.75"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page, shot = loaded(out)

    # Every metric of rounds.jsonl is a plot; the retention interval is a band on retention's, not plots of its own.
    assert set(page.images) == {"retention", "retention_sample", "forgetting", "forgetting_significant",
                                "ref_agreement", "ref_ppl_ratio", "weight_change_norm", "collapse_alarm",
                                "reliability", "t_loc", "i_loc"}
    for key, src in page.images.items():
        image = decoded(src)
        assert image.format == "PNG" and image.size == (700, 400), key
        assert len(image.convert("L").getcolors(1 << 16)) > 10, key  # drawn, not blank
        assert f"plot-{key}" in page.ids
    html = out.read_text()
    assert all(url.startswith("data:") for url in page.urls)  # self-contained: nothing to fetch
    assert "<script" not in html and "<link" not in html and "url(" not in html
    # The --against run beside the run: its settings, its checks.
    assert '<th class="key">sick</th><th class="key">healthy</th>' in html
    assert "Settings that differ (highlighted): collapse.ppl_ratio." in html
    assert '<td class="key">collapse</td><td class="fail">FAIL</td><td class="pass">PASS</td>' in html

    assert {ident: check["state"] for ident, check in page.checks.items()} == {
        "check-collapse": "fail", "check-forgetting": "fail", "check-retention": "fail",
        "check-t_loc-gap_1": "fail", "check-i_loc-gap_1": "pass", "check-t_loc-gap_5": "fail",
        "check-i_loc-gap_5": "pass"}
    collapse = page.checks["check-collapse"]["text"]
    assert collapse.startswith("FAIL") and "ref_ppl_ratio above 1.5" in collapse and "after 15 edits" in collapse
    assert "floor 0.75" in page.checks["check-t_loc-gap_1"]["text"]  # the flag's floor, not the default
    assert page.checks["check-i_loc-gap_1"]["text"].startswith("PASS")
    assert {"checks-all", "results", "base", "health", "settings"} <= page.ids

    with Image.open(shot) as screenshot:
        assert screenshot.size == (1400, 2000) and len(screenshot.convert("L").getcolors(1 << 16)) > 10


def test_the_against_runs_are_lines_on_the_same_plots_and_columns_beside_the_run(tmp_path):
    from monitor.exporters.plots import figures

    sick = write_run(tmp_path / "sick", SICK, {"ppl_ratio": 1.5})
    healthy = write_run(tmp_path / "healthy", HEALTHY)
    runs = [load_run(sick), load_run(healthy)]
    series, collapses = plotted(runs)
    assert set(series["retention"]) == {"sick", "healthy"}
    assert set(series["reliability"]) == {"sick gap_1", "sick gap_5", "healthy gap_1", "healthy gap_5"}
    assert collapses == {"sick": 15}  # the healthy run never collapsed: no marker of its own
    shown = dict(figures({key: series[key] for key in ("retention", "retention_ci_low", "retention_ci_high")},
                         collapses=collapses))
    axes = shown["retention"].axes[0]
    assert [line.get_label() for line in axes.get_lines()[:2]] == ["sick", "healthy"]
    assert len(axes.collections) == 2  # each run's interval band



def test_bad_run_folders_are_one_line_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    broken = write_run(tmp_path / "broken", HEALTHY)
    (broken / "summary.json").write_text(json.dumps({"results": {"gap_1": {"reliability": "high"}}}))
    assert main(["report", str(broken)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "summary.json" in error and "results.gap_1.reliability" in error
    assert main(["report", str(broken), "--t-loc-floor", "2"]) == 2
    assert "--t-loc-floor" in capsys.readouterr().err
    (broken / "config.json").write_text("{")
    assert main(["report", str(broken)]) == 2
    assert "config.json is not JSON" in capsys.readouterr().err
    sweep = tmp_path / "sweep"  # a sweep's own folder: config.json and summary.json too, but of its cells
    sweep.mkdir()
    (sweep / "config.json").write_text(json.dumps({"name": "grid", "base": {}, "grid": {}}))
    (sweep / "summary.json").write_text(json.dumps({"sweep": "grid", "stopped": "end of grid", "cells": {}}))
    assert main(["report", str(sweep)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is a sweep's folder: give one of its cells' run folders" in error


def test_a_torn_last_round_is_left_out_and_a_torn_middle_one_is_an_error(tmp_path, caplog):
    run = write_run(tmp_path / "killed", HEALTHY[:3], summary=False)
    with (run / "rounds.jsonl").open("a") as rounds:
        rounds.write('{"round": 4, "edits_app')  # killed while writing
    assert [row["edits_applied"] for row in load_run(run).rows] == [5, 10, 15]
    assert "last line 4 is incomplete" in caplog.text
    with (run / "rounds.jsonl").open("a") as rounds:
        rounds.write("\n" + json.dumps(HEALTHY[3]) + "\n")
    with pytest.raises(CommandError, match="line 4 is not JSON"):
        load_run(run)


@pytest.mark.slow
def test_a_real_ft_llm_run_that_crosses_its_perplexity_threshold_fails_collapse(tmp_path):
    from simulator.config import RunConfig
    from simulator.run import simulate
    from simulator.world.export import write_world
    from simulator.world.graph import WorldConfig

    world = write_world(WorldConfig(), tmp_path / "world", progress=False)  # the embedded model's own world
    out = tmp_path / "ft"
    simulate(RunConfig(stream=str(world / "eval.jsonl"), method="ft-llm", gap=[1, 5], limit=30, probe_every=5,
                       retention_sample=10, reference_size=8, out=out, no_mlflow=True,
                       collapse={"ppl_ratio": 1.15, "agreement": None}), progress=False)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    crossed = [row["edits_applied"] for row in rows if row["ref_ppl_ratio"] > 1.15]
    assert crossed and crossed[0] < 30  # ft-llm degrades the reference set within 30 edits

    assert main(["report", str(out)]) == 0  # written beside the run
    page, _ = loaded(out / "report.html")
    collapse = page.checks["check-collapse"]
    assert collapse["state"] == "fail" and "ref_ppl_ratio above 1.15" in collapse["text"]
    assert f"first alarm after {crossed[0]} edits" in collapse["text"]
    summary = json.loads((out / "summary.json").read_text())
    for setting, means in summary["results"].items():
        for key in ("t_loc", "i_loc"):
            state = page.checks[f"check-{key}-{setting}"]["state"]
            assert state == ("pass" if means[key] >= 0.8 else "fail"), (key, setting)
    assert {"ref_ppl_ratio", "retention", "reliability", "t_gen", "port_1hop"} <= set(page.images)
    ratio = decoded(page.images["ref_ppl_ratio"])
    assert ratio.size == (700, 400)
