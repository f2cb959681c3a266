"""The plot rules of monitor/exporters/plots.py, one test per rule, on the matplotlib figures themselves."""

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.text import Text
from PIL import Image

from monitor.alarms import CollapseThresholds
from monitor.exporters.plots import (
    Threshold,
    collapse_thresholds,
    draw,
    figures,
    line_plot,
    metric_plots,
    round_plots,
    round_series,
)

STEPS = [5, 10, 15, 20]


def points(*values):
    return list(zip(STEPS, values))


def horizontal(axes, value):
    """The lines drawn at height `value` across the whole axis."""
    return [line for line in axes.get_lines() if list(line.get_ydata()) == [value, value]]


def vertical(axes, value):
    return [line for line in axes.get_lines() if list(line.get_xdata()) == [value, value]]


@pytest.mark.parametrize("key, unit", [
    ("retention", "fraction, 0–1"), ("ref_ppl_ratio", "factor"), ("ref_kl", "nats"), ("memory_size", "count"),
    ("weight_change_norm", "Frobenius norm"), ("retrieval_latency_seconds", "seconds"),
])
def test_the_y_label_names_the_metric_and_its_unit(key, unit):
    axes = draw(key, {"run": points(1, 2, 3, 4)}).axes[0]
    assert key in axes.get_ylabel() and unit in axes.get_ylabel()
    assert axes.get_xlabel() == "edits applied"


def test_a_latency_quantile_is_labelled_as_a_histogram_bucket_bound():
    axes = draw("memory_search_seconds_p99", {"run": points(0.005, 0.005, 0.01, 0.01)}).axes[0]
    assert "≤ bucket bound (p99)" in axes.get_ylabel() and "seconds" in axes.get_ylabel()
    assert "percentile" not in axes.get_ylabel()
    assert axes.get_yscale() == "log"  # the buckets are log-spaced (memory/stats.py)
    assert axes.get_lines()[0].get_drawstyle() == "steps-post"  # a bound holds until the next round


def test_per_edit_metrics_are_labelled_as_running_means_and_not_as_recovery():
    axes = draw("gap_10/reliability", {"a (ft-llm)": points(0.2, 0.3, 0.4, 0.5)}).axes[0]
    assert axes.get_ylabel().startswith("running mean of reliability")
    assert "a rise is not recovery" in axes.get_title()
    assert "running mean" not in draw("retention", {"r": points(1, 1, 1, 1)}).axes[0].get_ylabel()


def test_a_growing_ratio_gets_a_log_axis_and_fractions_a_linear_one_on_their_whole_range():
    ratio = draw("ref_ppl_ratio", {"run": points(1.0, 3.0, 40.0, 142.0)}).axes[0]
    assert ratio.get_yscale() == "log"
    low, high = ratio.get_ylim()
    assert low < 1.0 and high > 142.0
    labels = [label.get_text() for label in ratio.get_yticklabels()]
    assert "100" in labels and "10" in labels  # plain numbers, not 10^2
    fraction = draw("retention", {"run": points(0.99, 0.98, 0.985, 0.97)}).axes[0]
    assert fraction.get_yscale() == "linear"
    low, high = fraction.get_ylim()
    assert low <= 0 and high >= 1  # a drop of 0.02 is not drawn as a cliff


def test_a_threshold_is_a_horizontal_line_inside_the_axis():
    axes = draw("ref_ppl_ratio", {"run": points(1.0, 1.01, 1.02, 1.03)},
                threshold=Threshold(2.0, "collapse above")).axes[0]
    (line,) = horizontal(axes, 2.0)
    assert line.get_label() == "collapse above 2"
    assert axes.get_ylim()[1] > 2.0  # values near 1 would otherwise leave the threshold off the plot


def test_collapse_thresholds_come_from_the_runs_settings_and_off_ones_are_left_out():
    lines = collapse_thresholds(CollapseThresholds(ppl_ratio=1.5, agreement=None, retention=0.7))
    assert lines == {"ref_ppl_ratio": Threshold(1.5, "collapse above"), "retention": Threshold(0.7, "collapse below")}


def test_the_confidence_interval_is_a_shaded_band_of_its_metric_not_a_plot_of_its_own():
    series = {"retention": {"run": points(0.9, 0.8, 0.7, 0.6)},
              "retention_ci_low": {"run": points(0.8, 0.7, 0.6, 0.5)},
              "retention_ci_high": {"run": points(1.0, 0.9, 0.8, 0.7)}}
    drawn = dict(figures(series))
    assert list(drawn) == ["retention"]
    (band,) = [c for c in drawn["retention"].axes[0].collections if isinstance(c, PolyCollection)]
    vertices = band.get_paths()[0].vertices
    assert vertices[:, 1].min() == pytest.approx(0.5) and vertices[:, 1].max() == pytest.approx(1.0)
    assert vertices[:, 0].min() == 5 and vertices[:, 0].max() == 20


def test_the_first_collapse_alarm_is_a_vertical_line_on_every_plot():
    series = {"collapse_alarm": {"probe round": points(0, 0, 1, 1)}, "ref_ppl_ratio": {"probe round": points(1, 2, 3, 4)},
              "reliability": {"gap_1": points(1, 1, 0.5, 0.4)}}
    drawn = dict(figures(series))
    for key, figure in drawn.items():
        (marker,) = vertical(figure.axes[0], 15)
        assert marker.get_label() == "first collapse alarm: 15 edits", key
    # With several runs, each run's own first alarm, in its line's colour.
    runs = {"collapse_alarm": {"a": points(0, 1, 1, 1), "b": points(0, 0, 0, 0)},
            "retention": {"a": points(1, 0.5, 0.4, 0.3), "b": points(1, 1, 1, 1)}}
    axes = dict(figures(runs))["retention"].axes[0]
    (marker,) = vertical(axes, 10)
    assert marker.get_label() == "first collapse alarm of a: 10 edits"
    assert marker.get_color() == axes.get_lines()[0].get_color()
    assert not vertical(axes, 15) and not vertical(axes, 20)


def test_lines_with_identical_values_stay_visible_and_are_named():
    same = points(1, 1, 1, 1)
    axes = draw("gap_1/reliability", {"a": same, "b": same, "c": points(1, 0.5, 0.5, 0.5)}).axes[0]
    a, b, c = axes.get_lines()[:3]
    assert len({a.get_linestyle(), b.get_linestyle(), c.get_linestyle()}) == 3
    assert len({a.get_marker(), b.get_marker(), c.get_marker()}) == 3
    assert a.get_linewidth() > b.get_linewidth()  # the first drawn shows around the later, thinner one
    (note,) = [text for text in axes.texts if text.get_gid() == "identical-note"]
    assert note.get_text() == "identical values: a = b"
    different = draw("retention", {"a": points(1, 1, 1, 1), "b": points(1, 1, 1, 0.9)}).axes[0]
    assert not [text for text in different.texts if text.get_gid() == "identical-note"]


def test_round_series_labels_lines_by_run_and_setting():
    rows = [{"edits_applied": 5, "retention": 1.0, "ref_ppl_ratio": None, "alarms": [],
             "results": {"gap_1": {"reliability": 0.5}}, "probe_seconds": 0.1}]
    assert round_series(rows) == {"retention": {"probe round": [(5, 1.0)]}, "ref_ppl_ratio": {"probe round": [(5, None)]},
                                  "reliability": {"gap_1": [(5, 0.5)]}}
    assert set(round_series(rows, "b")["reliability"]) == {"b gap_1"}


def test_round_plots_and_compare_plots_write_pngs_by_the_same_rules(tmp_path):
    rows = [{"edits_applied": step, "retention": r, "retention_ci_low": r - 0.1, "retention_ci_high": r + 0.1,
             "ref_ppl_ratio": p, "collapse_alarm": float(p > 2), "results": {"gap_1": {"reliability": 1.0}}}
            for step, r, p in ((5, 0.9, 1.1), (10, 0.8, 3.0), (15, 0.7, 9.0))]
    paths = round_plots(rows, tmp_path / "run", collapse_thresholds(CollapseThresholds()))
    assert sorted(p.name for p in paths) == ["collapse_alarm.png", "ref_ppl_ratio.png", "reliability.png",
                                             "retention.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (700, 400)
    # simulate compare's keys: per-setting metrics under their setting, one line per run.
    compared = metric_plots({"gap_1/reliability": {"a (ft-llm)": points(1, 1, 1, 1)}}, tmp_path / "cmp")
    assert compared == [tmp_path / "cmp" / "gap_1" / "reliability.png"]
    assert line_plot("ref_ppl_ratio", {"a": points(1, 2, 3, 4)}, tmp_path / "one.png").stat().st_size > 0


EXTREMES = {  # metric key -> values: the widest tick labels, labels and titles a plot can hold
    "memory_search_seconds_p99": [1e-5, 1e-4, 0.002, 0.05],  # two-line label, log axis of small bounds
    "gap_100/reliability": [0.2, 0.3, 0.4, 0.5],  # the longest title: a running mean's
    "ref_ppl_ratio": [1.0, 3.0, 40.0, 1420.0],
    "memory_size": [99_000_001, 99_000_002, 99_000_003, 99_000_004],  # an offset above the axis
    "retrieval_latency_seconds": [1.5e-6, 2.5e-6, 3.5e-6, 1.25e-5],
    "gap_10/t_loc_kl": [1.05e-4, 1.12e-4, 1.21e-4, 1.34e-4],  # 8-character tick labels: 0.000100
    "weight_change_norm": [12345.678, 23456.789, 34567.891, 45678.912],
    "forgetting": [-0.4, 0.5, -0.25, 0.125],
}
STEPS_TO = {"two million": [1, 330_000, 660_000, 2_000_000],  # an exponent under the x axis
            "a round tick at the right end": [10, 160_000, 320_000, 476_200]}  # its label centred on the edge


@pytest.mark.parametrize("x_range", STEPS_TO)
@pytest.mark.parametrize("key", EXTREMES)
def test_every_text_of_a_plot_lies_inside_the_figure_and_off_the_title(key, x_range):
    steps = STEPS_TO[x_range]
    figure = draw(key, {f"run {i}": list(zip(steps, EXTREMES[key])) for i in range(3)},
                  threshold=Threshold(EXTREMES[key][1], "collapse above"), collapses={"run 0": steps[2]})
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # tick labels and offsets exist only after a draw
    renderer = canvas.get_renderer()
    inside = figure.bbox.padded(0.5)
    axes = figure.axes[0]
    title = axes.title.get_window_extent(renderer)
    hidden = [label for axis in (axes.xaxis, axes.yaxis) for tick in axis.get_major_ticks() + axis.get_minor_ticks()
              if not min(axis.get_view_interval()) <= tick.get_loc() <= max(axis.get_view_interval())
              for label in (tick.label1, tick.label2)]  # not drawn
    texts = [text for text in figure.findobj(Text)
             if text.get_visible() and text.get_text() and not any(text is label for label in hidden)]
    assert len(texts) > 10
    for text in texts:
        extent = text.get_window_extent(renderer)
        assert inside.contains(extent.x0, extent.y0) and inside.contains(extent.x1, extent.y1), text
        if text is not axes.title:
            assert not title.overlaps(extent), text
