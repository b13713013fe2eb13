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

import os

from data_tools.readback import check_fields, read_json
from data_tools.windows import GROUPS

MAIN_METRICS = ["hit@5", "hit@10", "ndcg@5", "ndcg@10"]


def load_run(run: str) -> dict:
    """period -> metrics.json content, for the periods that have one; with the period's
    train_summary.json, where there is one, under "train_summary". A file that is cut short or
    hand-edited into another shape is a DamagedFile naming it (the report is not written)."""
    out = {}
    base = os.path.join(run, "periods")
    for name in sorted(os.listdir(base), key=lambda n: int(n) if n.isdigit() else -1) if os.path.isdir(base) else []:
        path = os.path.join(base, name, "metrics.json")
        if name.isdigit() and os.path.isfile(path):
            how = {"what": f"period {name}'s metrics", "remedy": _remedy(run, int(name), path)}
            out[int(name)] = _checked_metrics(read_json(path, **how, fields={"windows": dict}), path, how)
            summary = os.path.join(base, name, "train_summary.json")
            if os.path.isfile(summary):
                how = {"what": f"period {name}'s training summary", "remedy": _remedy(run, int(name), summary)}
                out[int(name)]["train_summary"] = read_json(summary, **how)
    return out


def _remedy(run: str, period: int, path: str) -> str:
    return (
        f"put it back from a copy, or write it again with `python train/main.py ... --run_dir {run} --period "
        f"{period} --eval_only` (metrics.json; evaluates the period's export again)"
    )


_NUMBER = (float, type(None))


def _checked_metrics(doc: dict, path: str, how: dict) -> dict:
    """metrics.json with what the report reads: per window its overall metrics and its groups'
    (each with its users), and those of the references where there are any."""
    for j, w in doc["windows"].items():
        parts = [("", w)] + [(f"'s {ref}", w[ref]) for ref in ("popularity", "transitions") if ref in w]
        for label, part in parts:
            where = f"window {j}{label}"
            check_fields(part, {"overall": dict, "groups": dict}, path, **how, where=where)
            check_fields(part["overall"], dict.fromkeys(part["overall"], _NUMBER), path, **how, where=where)
            check_fields(part["groups"], dict.fromkeys(GROUPS, dict), path, **how, where=f"{where}'s groups")
            for g in GROUPS:
                group = part["groups"][g]
                fields = {"users": int, **dict.fromkeys((k for k in group if k != "users"), _NUMBER)}
                check_fields(group, fields, path, **how, where=f"{where}'s group {g}")
    return doc


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
    pull = {t: periods[t].get("train_summary", {}).get("pull_ratio_mean") for t in sorted(periods)}
    moved = {t: periods[t].get("train_summary", {}).get("adapter_relative_distance") for t in sorted(periods)}
    rows_moved = {t: periods[t].get("train_summary", {}).get("token_rows_relative_distance") for t in sorted(periods)}
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
        # per period: the proximal pull against the data (mean of the logged ratios), and how far
        # the period moved its adapter from where it started (relative)
        "pull": pull,
        "moved": moved,
        "rows_moved": rows_moved,  # the same over the code-token rows (what method.pull=all also pulls)
        "pull_average": mean([pull[t] for t in incremental if t in pull]),
    }


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _ratio(x) -> str:
    """A ratio that may span orders of magnitude (1e-7 at the authors' lambda, 1 where the pull acts)."""
    return "-" if x is None else f"{x:.3g}"


def markdown(runs: dict[str, dict], metric: str = "ndcg@10") -> str:
    """`runs`: name -> load_run(...)."""
    sums = {name: summarize(p, metric) for name, p in runs.items()}
    return "\n".join(_summary_table(sums, metric) + _pull_table(sums) + _r_matrices(sums, metric))


def _summary_table(sums: dict[str, dict], metric: str) -> list[str]:
    """One row per run (averages over periods >= 1), then the references, then what pull / data is."""
    lines = [
        "Average over the incremental windows (periods >= 1), each period on its own test window:",
        "",
        "| run | method | "
        + " | ".join(MAIN_METRICS)
        + " | "
        + " | ".join(f"{g} {metric}" for g in GROUPS)
        + f" | BWT ({metric}) | forgetting | pull / data |",
        "| --- | --- | " + " | ".join("---" for _ in MAIN_METRICS + list(GROUPS)) + " | --- | --- | --- |",
    ]
    for name, s in sums.items():
        if not s:
            lines.append(f"| {name} | (no evaluated period) |")
            continue
        lines.append(
            f"| {name} | {s['method']} | "
            + " | ".join(_fmt(s["average_incremental"][k]) for k in MAIN_METRICS)
            + " | "
            + " | ".join(_fmt(s["groups"][g].get(metric)) for g in GROUPS)
            + f" | {_fmt(s['bwt'])} | {_fmt(s['forgetting'])} | {_ratio(s['pull_average'])} |"
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
                + " | - | - | - |"
            )
    return lines + [
        "",
        "pull / data: how hard the proximal term pulled the LoRA factors against the data, the norm of "
        "lam x its gradient over the norm of the data loss's gradient (mean of the logged steps, over "
        "periods >= 1; `-`: no proximal term). What its size means: docs/methods.md.",
    ]


def _pull_table(sums: dict[str, dict]) -> list[str]:
    """Per period of each run that has a start to compare with: pull / data and how far it moved."""
    regularized = {name: s for name, s in sums.items() if s and any(v is not None for v in s["moved"].values())}
    if not regularized:
        return []
    periods = sorted({t for s in regularized.values() for t, v in s["moved"].items() if v is not None})
    lines = [
        "",
        "Per period: pull / data, and how far the period moved its adapter from where it started "
        "(||theta - theta_start|| / ||theta_start|| over the LoRA factors; for peso, its anchor), and its "
        "code-token rows (`rows`; method.pull=all pulls them too):",
        "",
        "| run | " + " | ".join(f"period {t}" for t in periods) + " |",
        "| --- | " + " | ".join("---" for _ in periods) + " |",
    ]
    for name, s in regularized.items():
        cells = [
            f"{_ratio(s['pull'].get(t))}; moved {_ratio(s['moved'].get(t))}"
            + ("" if s["rows_moved"].get(t) is None else f", rows {_ratio(s['rows_moved'].get(t))}")
            for t in periods
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _r_matrices(sums: dict[str, dict], metric: str) -> list[str]:
    """Each run's R matrix: the model after period i on window j's test users."""
    lines = []
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
    return lines


def _reference_curve(runs: dict[str, dict], key: str, panel: str, metric: str) -> list[tuple[int, float]]:
    """(period, a reference ("popularity", "transitions") on that period's window) from the first
    run that has it."""
    for periods in runs.values():
        points = []
        for t, m in sorted(periods.items()):
            reference = m["windows"].get(str(t), {}).get(key)
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
    import matplotlib.pyplot as plt

    fig = figure(runs, metric)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(runs: dict[str, dict], metric: str = "ndcg@10"):
    """The plot's matplotlib figure (`plot` writes it): a panel each for overall and the groups,
    a line per run and per reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = ["overall", *GROUPS]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True)
    # Runs that give the same numbers (peso at a lambda too small to act, and single) must not
    # hide each other: each later run is drawn thinner, dashed, with hollow markers of its own.
    styles = [("o", "-", 6, 2.2), ("s", "--", 9, 1.6), ("^", ":", 11, 1.4), ("D", "-.", 8, 1.2), ("v", "--", 10, 1.0)]
    for ax, panel in zip(axes, panels):
        for k, (name, periods) in enumerate(runs.items()):
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
            marker, line, size, width = styles[k % len(styles)]
            ax.plot(
                xs,
                ys,
                marker=marker,
                linestyle=line,
                markersize=size,
                linewidth=width,
                markerfacecolor="none" if k else None,
                label=name,
                zorder=3 + len(runs) - k,  # the first run on top, the others' hollow markers around it
            )
        for key, style, label in (
            ("popularity", "k--", "most popular items"),
            ("transitions", "k:", "items that followed the last ones"),
        ):
            reference = _reference_curve(runs, key, panel, metric)
            if reference:
                ax.plot(*zip(*reference), style, linewidth=1, label=label, zorder=1)
        ax.set_title(f"{panel}")
        ax.set_xlabel("period")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole periods, never 2.5
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


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
