"""The run report: R[i][j], the incremental average, backward transfer and forgetting by hand."""

from __future__ import annotations

import json
import os

import pytest

from launcher.report import figure, load_run, markdown, plot, summarize

GROUPS = ("new", "dormant", "continuing")


def _vals(ndcg: float) -> dict:
    return {"hit@5": ndcg * 2, "hit@10": ndcg * 3, "ndcg@5": ndcg / 2, "ndcg@10": ndcg}


def _window(ndcg: float, users: int = 10) -> dict:
    groups = {g: {"users": users // 3 if g != "dormant" else 0, **_vals(ndcg)} for g in GROUPS}
    return {
        "users": users,
        "invalid_outputs": 0,
        "overall": dict(_vals(ndcg), test_loss=1 - ndcg),
        "groups": groups,
        "popularity": {
            "overall": _vals(ndcg / 10),
            "groups": {g: dict(v, **_vals(ndcg / 10)) for g, v in groups.items()},
        },
        "transitions": {
            "overall": _vals(ndcg / 4),
            "groups": {g: dict(v, **_vals(ndcg / 4)) for g, v in groups.items()},
        },
    }


@pytest.fixture
def run(tmp_path):
    # R[i][j] (ndcg@10): after period i on window j
    R = {0: {0: 0.10}, 1: {0: 0.08, 1: 0.20}, 2: {0: 0.09, 1: 0.15, 2: 0.30}}
    for i, row in R.items():
        d = tmp_path / "run" / "periods" / str(i)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(
            json.dumps({"period": i, "method": "peso", "windows": {str(j): _window(v) for j, v in row.items()}})
        )
    return str(tmp_path / "run")


def test_summary_by_hand(run):
    s = summarize(load_run(run))
    assert s["R"] == {0: {0: 0.10}, 1: {0: 0.08, 1: 0.20}, 2: {0: 0.09, 1: 0.15, 2: 0.30}}
    assert s["average_incremental"]["ndcg@10"] == pytest.approx(
        (0.20 + 0.30) / 2
    )  # periods 1 and 2 on their own window
    assert s["bwt"] == pytest.approx(((0.09 - 0.10) + (0.15 - 0.20)) / 2)
    assert s["forgetting"] == pytest.approx(((0.10 - 0.09) + (0.20 - 0.15)) / 2)  # best earlier minus last
    assert s["groups"]["dormant"]["ndcg@10"] is None  # no dormant user anywhere
    assert s["groups"]["new"]["ndcg@10"] == pytest.approx(0.25)
    # the popularity reference of the same windows, averaged the same way
    assert s["popularity"]["ndcg@10"] == pytest.approx((0.020 + 0.030) / 2)
    assert s["popularity_groups"]["new"]["ndcg@10"] == pytest.approx(0.025)
    assert s["transitions"]["ndcg@10"] == pytest.approx((0.05 + 0.075) / 2)


def test_markdown_and_plot(run, tmp_path):
    text = markdown({"peso-run": load_run(run)})
    assert "| peso-run | peso | 0.5000 | 0.7500 | 0.1250 | 0.2500 |" in text
    assert "| most popular items of each window | reference | 0.0500 | 0.0750 | 0.0125 | 0.0250 |" in text
    assert "| items that followed the user's last items (no model) | reference | 0.1250 | 0.1875 |" in text
    assert "| 2 | 0.0900 | 0.1500 | 0.3000 |" in text
    assert "test_loss" not in text and "| 1 | 0.9200 | 0.8000 | - |" in markdown({"r": load_run(run)}, "test_loss")
    png = str(tmp_path / "plot.png")
    plot({"peso-run": load_run(run)}, png)
    assert os.path.getsize(png) > 5000


def test_the_pull_of_the_proximal_term_is_reported(run):
    """pull / data (the logged ratios' mean) over periods >= 1, and per period how far the
    adapter moved from where it started, and its code-token rows (recorded since method.pull)."""
    for t, (ratio, moved) in {1: (2e-7, 0.5), 2: (4e-7, 0.25)}.items():
        summary = {"period": t, "pull_ratio_mean": ratio, "adapter_relative_distance": moved}
        if t == 2:
            summary["token_rows_relative_distance"] = 0.125
        with open(os.path.join(run, "periods", str(t), "train_summary.json"), "w") as f:
            json.dump(summary, f)
    s = summarize(load_run(run))
    assert s["pull_average"] == pytest.approx(3e-7) and s["moved"] == {0: None, 1: 0.5, 2: 0.25}
    text = markdown({"peso-run": load_run(run)})
    (row,) = [line for line in text.splitlines() if line.startswith("| peso-run | peso |")]
    assert row.endswith(" | 3e-07 |")  # the average table's last column
    assert "| peso-run | 2e-07; moved 0.5 | 4e-07; moved 0.25, rows 0.125 |" in text


def test_the_plot_shows_coinciding_runs_both_references_and_whole_periods(run):
    """Two methods with the same numbers (peso at a lambda too small to act, and single): both
    visible, in different styles; both references drawn; the period axis in whole periods."""
    fig = figure({"peso": load_run(run), "single": load_run(run)})
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {"peso", "single", "most popular items", "items that followed the last ones"} <= set(lines)
    peso, single = lines["peso"], lines["single"]
    assert list(peso.get_xdata()) == list(single.get_xdata()) and list(peso.get_ydata()) == list(single.get_ydata())
    assert (peso.get_marker(), peso.get_linestyle()) != (single.get_marker(), single.get_linestyle())
    assert single.get_markerfacecolor() == "none" and single.get_markersize() > peso.get_markersize()
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())
