"""CLT study plots: the seen-vs-unseen series are `aggregate`'s means of each grid cell, English in neither."""

import pytest

from clp_jax.eval.metrics import aggregate
from clp_jax.posttrain.plots import gap_series, plot_gap, plot_metric_vs_n, plot_transfer_matrix

SEEN, UNSEEN = ["de", "es"], ["fr", "sw"]


def rows_of(n, train_languages, scores, tasks="math"):
    return [{"model": "tiny", "design": "multi", "tasks": tasks, "n": n, "train_languages": train_languages,
             "task": "math", "language": lang, "exact_match": v} for lang, v in scores.items()]


def grid_rows():
    at_0 = rows_of(0, "", {"en": 90.0, "de": 10.0, "es": 20.0, "fr": 5.0, "sw": 15.0})
    at_8 = rows_of(8, "de+es", {"en": 80.0, "de": 50.0, "es": 70.0, "fr": 25.0, "sw": None})
    matrix_cell = rows_of(8, "de", {"en": 0.0, "de": 0.0, "es": 0.0, "fr": 0.0, "sw": 0.0})  # not a grid cell
    return at_0 + at_8 + matrix_cell


def test_gap_series_are_unweighted_means_over_languages_without_english():
    series = gap_series(grid_rows(), "exact_match", SEEN, UNSEEN)
    assert list(series) == [("tiny", "multi", "math")]
    by_n = series[("tiny", "multi", "math")]
    assert by_n[0] == pytest.approx({"seen": 15.0, "unseen": 10.0})
    assert by_n[8] == pytest.approx({"seen": 60.0, "unseen": 25.0})  # sw has no score at N = 8
    cell = [{"language": r["language"], "task": "math", "exact_match": r["exact_match"]}
            for r in grid_rows()[5:9]]
    means = aggregate(cell, SEEN, UNSEEN)
    assert means["languages"]["math"] == {"seen": ["de", "es"], "unseen": ["fr"]}
    assert {g: means[g]["math"]["exact_match"] for g in ("seen", "unseen")} == by_n[8]


def test_plot_gap_writes_a_png(tmp_path):
    path = tmp_path / "plots" / "gap.png"
    plot_gap(grid_rows(), "exact_match", SEEN, UNSEEN, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_language_checked_metrics_plot_only_the_tasks_that_have_them(tmp_path):
    math = [{**r, "exact_match_lang": r["exact_match"] and r["exact_match"] / 2} for r in grid_rows()]
    summaries = [{**r, "task": "summarization", "chrf_lang": 40.0, "language_ok": 80.0}
                 for r in rows_of(8, "de", {"en": 0.0, "de": 0.0, "es": 0.0})]
    rows = math + summaries
    assert gap_series(rows, "exact_match_lang", SEEN, UNSEEN)[("tiny", "multi", "math")][8] == pytest.approx(
        {"seen": 30.0, "unseen": 12.5})
    assert gap_series(rows, "chrf_lang", SEEN, UNSEEN) == {}  # its only cell is a transfer-matrix one
    assert plot_transfer_matrix(rows, "chrf_lang", 8, "math", str(tmp_path / "matrix.png"))
    assert (tmp_path / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_metric_vs_n(rows, "exact_match_lang", SEEN, UNSEEN, str(tmp_path / "vs_n.png"))
    assert (tmp_path / "vs_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
