"""`report`: the results of one or more runs, from their periods' metrics.json.

For each run: per period, the metrics on that period's own test window (the paper's protocol),
their average over the incremental windows (periods >= 1), the same by user group, and the
matrix R[i][j] (model after period i, test users of window j) with backward transfer
BWT = mean_j (R[T-1][j] - R[j][j]) and forgetting F = mean_j (max_{i<T-1} R[i][j] - R[T-1][j])
over j < T-1. Several runs (methods) are compared side by side, with the reference every
recommender must beat: the most popular items of each window (its most frequent training
targets), scored by the evaluation on the same test users (metrics.json, "popularity"); and a
stronger reference without a model, the items that followed the users' last items among the
window's training targets ("transitions").
"""

from __future__ import annotations

import json
import os

from data_tools.windows import GROUPS

MAIN_METRICS = ["hit@5", "hit@10", "ndcg@5", "ndcg@10"]


def load_run(run: str) -> dict:
    """period -> metrics.json content, for the periods that have one."""
    out = {}
    base = os.path.join(run, "periods")
    for name in sorted(os.listdir(base), key=lambda n: int(n) if n.isdigit() else -1) if os.path.isdir(base) else []:
        path = os.path.join(base, name, "metrics.json")
        if name.isdigit() and os.path.isfile(path):
            with open(path) as f:
                out[int(name)] = json.load(f)
    return out


def summarize(periods: dict, metric: str = "ndcg@10") -> dict:
    if not periods:
        return {}
    last = max(periods)
    R = {i: {int(j): w["overall"].get(metric) for j, w in m["windows"].items()} for i, m in periods.items()}
    incremental = [t for t in periods if t >= 1 and str(t) in periods[t]["windows"]]

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    def averages(part) -> tuple[dict, dict]:
        """Overall and per-group means over the incremental periods, each on its own window."""
        own = [part(periods[t]["windows"][str(t)]) for t in incremental]
        own = [w for w in own if w is not None]
        overall = {k: mean([w["overall"].get(k) for w in own]) for k in MAIN_METRICS}
        by_group = {
            g: {k: mean([w["groups"][g].get(k) for w in own if w["groups"][g]["users"]]) for k in MAIN_METRICS}
            for g in GROUPS
        }
        return overall, by_group

    avg, groups = averages(lambda w: w)
    popularity, popularity_groups = averages(lambda w: w.get("popularity"))
    transitions, transitions_groups = averages(lambda w: w.get("transitions"))
    earlier = [j for j in range(last) if j in R.get(j, {}) and j in R[last]]
    bwt = mean([R[last][j] - R[j][j] for j in earlier])
    forgetting = mean([max(R[i][j] for i in range(j, last) if j in R.get(i, {})) - R[last][j] for j in earlier])
    return {
        "method": periods[last].get("method"),
        "periods": sorted(periods),
        "R": R,
        "metric": metric,
        "average_incremental": avg,
        "groups": groups,
        "bwt": bwt,
        "forgetting": forgetting,
        "popularity": popularity,
        "popularity_groups": popularity_groups,
        "transitions": transitions,
        "transitions_groups": transitions_groups,
    }


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def markdown(runs: dict[str, dict], metric: str = "ndcg@10") -> str:
    """`runs`: name -> load_run(...)."""
    lines = [
        "Average over the incremental windows (periods >= 1), each period on its own test window:",
        "",
        "| run | method | "
        + " | ".join(MAIN_METRICS)
        + " | "
        + " | ".join(f"{g} {metric}" for g in GROUPS)
        + f" | BWT ({metric}) | forgetting |",
        "| --- | --- | " + " | ".join("---" for _ in MAIN_METRICS + list(GROUPS)) + " | --- | --- |",
    ]
    sums = {name: summarize(p, metric) for name, p in runs.items()}
    for name, s in sums.items():
        if not s:
            lines.append(f"| {name} | (no evaluated period) |")
            continue
        lines.append(
            f"| {name} | {s['method']} | "
            + " | ".join(_fmt(s["average_incremental"][k]) for k in MAIN_METRICS)
            + " | "
            + " | ".join(_fmt(s["groups"][g].get(metric)) for g in GROUPS)
            + f" | {_fmt(s['bwt'])} | {_fmt(s['forgetting'])} |"
        )
    for key, label in (
        ("popularity", "most popular items of each window"),
        ("transitions", "items that followed the user's last items (no model)"),
    ):
        reference = next((s for s in sums.values() if s and any(v is not None for v in s[key].values())), None)
        if reference is not None:
            lines.append(
                f"| {label} | reference | "
                + " | ".join(_fmt(reference[key][k]) for k in MAIN_METRICS)
                + " | "
                + " | ".join(_fmt(reference[f"{key}_groups"][g].get(metric)) for g in GROUPS)
                + " | - | - |"
            )
    for name, s in sums.items():
        if not s:
            continue
        windows = sorted({j for row in s["R"].values() for j in row})
        lines += [
            "",
            f"{name}: R[i][j] = {metric} of the model after period i on window j's test users",
            "",
            "| after period | " + " | ".join(f"window {j}" for j in windows) + " |",
            "| --- | " + " | ".join("---" for _ in windows) + " |",
        ]
        for i, row in sorted(s["R"].items()):
            lines.append(f"| {i} | " + " | ".join(_fmt(row.get(j)) for j in windows) + " |")
    return "\n".join(lines)


def _popularity_curve(runs: dict[str, dict], panel: str, metric: str) -> list[tuple[int, float]]:
    """(period, the popularity reference on that period's window) from the first run that has it."""
    for periods in runs.values():
        points = []
        for t, m in sorted(periods.items()):
            reference = m["windows"].get(str(t), {}).get("popularity")
            if reference is None:
                continue
            vals = reference["overall"] if panel == "overall" else reference["groups"][panel]
            if panel == "overall" or vals["users"]:
                points.append((t, vals[metric]))
        if points:
            return points
    return []


def plot(runs: dict[str, dict], path: str, metric: str = "ndcg@10") -> None:
    """One PNG: the metric on each period's own window, overall and per user group, per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["overall", *GROUPS]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True)
    for ax, panel in zip(axes, panels):
        for name, periods in runs.items():
            xs, ys = [], []
            for t, m in sorted(periods.items()):
                w = m["windows"].get(str(t))
                if w is None:
                    continue
                vals = w["overall"] if panel == "overall" else w["groups"][panel]
                if panel != "overall" and not vals["users"]:
                    continue
                xs.append(t)
                ys.append(vals[metric])
            ax.plot(xs, ys, marker="o", label=name)
        reference = _popularity_curve(runs, panel, metric)
        if reference:
            ax.plot(*zip(*reference), "k--", label="most popular items")
        ax.set_title(f"{panel}")
        ax.set_xlabel("period")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(run_dirs: list[str], out_png: str | None = None, metric: str = "ndcg@10") -> str:
    runs = {os.path.basename(os.path.normpath(r)): load_run(r) for r in run_dirs}
    text = markdown(runs, metric)
    if out_png:
        plot(runs, out_png, metric)
    return text


def write_report(run: str) -> str:
    """<run>/report.md and <run>/report.png, for a run whose periods are done; returns the text."""
    text = report([run], os.path.join(run, "report.png"))
    with open(os.path.join(run, "report.md"), "w") as f:
        f.write(text + "\n")
    return text
