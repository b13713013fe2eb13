"""The continual study: peso against single and cumulative LoRA on real data, with seeds, the
popularity reference, user groups, the R matrix and a lambda sweep.

    python bench/continual_cds.py                       # the paper's Amazon CDs blocks (about 60 minutes on 2 cores)
    python bench/continual_cds.py --blocks DIR          # another folder of block_<k>.json (+ semantic_ids.json)
    python bench/continual_cds.py --movielens           # MovieLens-100K from the recbole wheel (converted, indexed)
    python bench/continual_cds.py --data DIR            # any dataset folder that has an item index

The model of `--config` (default configs/cds_study.yaml) learns window 0 in full from random
weights, once, until its validation loss stops improving; then, for each seed (LoRA
initialization and data order), windows 1.. are learned with peso, single and cumulative LoRA,
each starting from that same period 0, and peso again at each of `--lams` (the paper's term, on a
log scale up to where the pull outweighs the data) and `--entries-lams` (`method.kl_scale:
entries`), on every seed: the stability/plasticity curve, with the pull / data ratio each lambda
reached (TensorBoard's pull/ratio) and, per seed, how peso compares with single on the same seed. Every period goes through the real entry point (train/main.py under DeepSpeed);
period 0 on `--nproc` ranks, the later runs as `--parallel` single-rank jobs side by side (on a
small model, two independent jobs use two cores better than two ranks of one job).

Every evaluation also scores the most popular items of its window on the same test users
(metrics.json "popularity"): that is the reference each method must beat.

Writes bench/<name>.md (tables, mean ± sd over seeds), bench/<name>.png (the methods per period)
and bench/<name>_lambda.png (NDCG@10 overall, for dormant and for new users against lambda, the
figure of bench/pull_sweep.py) (name: continual_cds, or --name), and prints one JSON line. Resumable: finished periods are kept (`--work`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_tools.convert import ConvertOptions, convert, convert_blocks  # noqa: E402
from data_tools.dataset import ITEM_INDEX, load_manifest  # noqa: E402
from data_tools.help_format import HelpFormatter  # noqa: E402
from data_tools.windows import GROUPS  # noqa: E402
from launcher.periods import RunSettings, local_command, run_local, start_from_period0, train_args  # noqa: E402
from launcher.report import MAIN_METRICS, load_run, summarize  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pull_sweep  # noqa: E402  (bench/pull_sweep.py: the curve's summary and figure)

CDS = os.path.join(os.path.dirname(REPO), "shared", "data", "amazon-cds-blocks")
CONFIG = os.path.join(REPO, "configs", "cds_study.yaml")
DS = os.path.join(REPO, "ds_configs", "zero2.json")
METHODS = ("peso", "single", "cumulative")


def mean_sd(xs: list) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list) -> str:
    m, s = mean_sd(xs)
    return f"{m:.4f} ± {s:.4f}"


def prepare_data(a, work: str) -> str:
    """The dataset folder the study runs on (converted and indexed here unless --data)."""
    if a.data:
        if not os.path.isfile(os.path.join(a.data, ITEM_INDEX)):
            raise SystemExit(f"{a.data} has no {ITEM_INDEX}; build it with `python -m data_tools index {a.data}`")
        return a.data
    data = os.path.join(work, "data")
    if a.movielens:
        from data_tools.examples import movielens_100k
        from data_tools.index.build import build_index

        inter, item = movielens_100k()
        convert(ConvertOptions(format="movielens", reviews=inter, meta=item, out=data, progress=False))
        build_index(data, progress=False)  # MiniLM embeddings: the default CodingOptions
        return data
    if not os.path.isdir(a.blocks):
        raise SystemExit(f"no blocks folder at {a.blocks} (pass --blocks DIR, --movielens or --data DIR)")
    return convert_blocks(a.blocks, data)


def evaluate_on_every_user(a, data: str, period0: str, env: dict) -> dict:
    """Period 0's model on every test user of window 0 (the runs evaluate a sample there, so
    that every period's row of R stays cheap): its metrics.json, from a copy of the run."""
    folder = os.path.join(a.work, "period0-every-user")
    metrics = os.path.join(folder, "periods", "0", "metrics.json")
    if not os.path.isfile(metrics):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(period0, folder, ignore=shutil.ignore_patterns("ds_ckpt", "tb"))
        args = train_args(a.config, data, folder, DS, [*a.overrides, "eval.max_users=null"], period=0)
        subprocess.run(local_command(a.nproc, [*args, "--eval_only"]), env=env, cwd=REPO, check=True)
    with open(metrics) as f:
        return json.load(f)["windows"]["0"]


def loss_columns(periods: dict, last: int) -> tuple[list, float]:
    """A run's test loss on each window 1..last right after learning it, and its forgetting in
    loss: the loss on window j after the last period minus right after period j, over j < last."""

    def loss(after: int, window: int) -> float:
        return periods[after]["windows"][str(window)]["overall"]["test_loss"]

    return [loss(t, t) for t in range(1, last + 1)], statistics.mean(loss(last, j) - loss(j, j) for j in range(1, last))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = ap.add_mutually_exclusive_group()
    source.add_argument(
        "--blocks", default=CDS, help="folder of block_<k>.json and semantic_ids.json (default: the CDs blocks)"
    )
    source.add_argument("--movielens", action="store_true", help="MovieLens-100K from the recbole wheel instead")
    source.add_argument("--data", help="a dataset folder with an item index instead")
    ap.add_argument("--config", default=CONFIG, help="experiment YAML (default: configs/cds_study.yaml)")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the main runs (model.seed, data.seed)"
    )
    ap.add_argument(
        "--lams",
        type=float,
        nargs="*",
        default=[200.0, 2000.0, 20000.0, 200000.0, 2000000.0],
        help="more peso lambdas (the paper's term), on every seed; the config's lambda is the main runs'",
    )
    ap.add_argument(
        "--entries-lams",
        type=float,
        nargs="*",
        default=[0.2],
        help="peso lambdas with method.kl_scale=entries, on every seed",
    )
    ap.add_argument("--work", default="/tmp/peso-cds-study", help="runs and data (finished periods are kept)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks of period 0")
    ap.add_argument("--parallel", type=int, default=2, help="single-rank runs side by side after period 0")
    ap.add_argument("--name", default="continual_cds", help="bench/<name>.md and .png")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run (default: none)")
    a = ap.parse_args()
    t0 = time.time()
    os.makedirs(a.work, exist_ok=True)
    data = prepare_data(a, a.work)
    windows = len(load_manifest(data)["windows"])
    last = windows - 1
    with open(a.config) as f:
        cfg = yaml.safe_load(f)
    main_lam = float(cfg["method"]["lam"])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    period0 = os.path.join(a.work, "period0")
    run_local(RunSettings(a.config, data, period0, DS, list(a.overrides)), a.nproc, env=env, upto=0)
    window0 = evaluate_on_every_user(a, data, period0, env)
    jobs = {}  # run folder -> overrides
    for seed in a.seeds:
        for method in METHODS:
            jobs[os.path.join(a.work, f"seed{seed}", method)] = [
                f"model.seed={seed}",
                f"data.seed={seed}",
                f"method.name={method}",
            ]
        for name, extra in lambda_variants(a).items():
            jobs[os.path.join(a.work, f"seed{seed}", name)] = [
                f"model.seed={seed}",
                f"data.seed={seed}",
                "method.name=peso",
                *extra["overrides"],
            ]
    for run in jobs:
        start_from_period0(period0, run)

    def run_job(job: tuple[str, list]) -> None:
        run, overrides = job
        with open(run + ".log", "a") as log:
            run_local(RunSettings(a.config, data, run, DS, [*a.overrides, *overrides]), 1, env=env, log=log)
        print(
            f"{os.path.relpath(run, a.work)}: every period done ({(time.time() - t0) / 60:.0f} min; log {run}.log)",
            flush=True,
        )

    with ThreadPoolExecutor(a.parallel) as pool:
        list(pool.map(run_job, jobs.items()))

    runs = {
        (seed, method): load_run(os.path.join(a.work, f"seed{seed}", method)) for seed in a.seeds for method in METHODS
    }
    lines, result = tables(runs, window0, a.seeds, last, cfg, data)
    curve = lambda_curve(a, main_lam, cfg)
    lines += curve_table(curve, a.seeds, cfg)
    result["curve"] = curve
    minutes = (time.time() - t0) / 60
    lines += [
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} cores; this invocation took "
        f"{minutes:.0f} min (finished periods are kept, so a rerun only redoes the tables).",
    ]
    with open(os.path.join(REPO, "bench", f"{a.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(runs, a.seeds, last, os.path.join(REPO, "bench", f"{a.name}.png"))
    pull_sweep.plot(
        {"curve": curve, "data": source_name(data), "seeds": len(a.seeds), "windows": f"1-{last}"},
        os.path.join(REPO, "bench", f"{a.name}_lambda.png"),
    )
    result.update(
        minutes=round(minutes, 1),
        machine=f"{platform.machine()} {os.cpu_count()} cores",
        date=time.strftime("%Y-%m-%d"),
        data=data,
        config=os.path.relpath(a.config, REPO),
    )
    print("\n".join(lines))
    print(json.dumps(result))


def tables(runs: dict, w0: dict, seeds: list, last: int, cfg: dict, data: str) -> tuple[list, dict]:
    """The markdown tables and the JSON summary (`w0`: period 0 on every test user of window 0)."""
    sums = {key: summarize(periods, "ndcg@10") for key, periods in runs.items()}
    shape = cfg["model"].get("shape") or cfg["model"].get("path")
    ratio = w0["overall"]["ndcg@10"] / max(w0["popularity"]["overall"]["ndcg@10"], 1e-12)
    lines = [
        f"Data: {data}. Model: `{shape}` trained in full on window 0 (from random weights, until the validation loss "
        f"stopped improving), then LoRA r={cfg['lora']['r']} over windows 1-{last}; objective "
        f"`{cfg['data'].get('objective', 'response')}`; {len(seeds)} seeds ({', '.join(map(str, seeds))}) of the LoRA "
        f"periods; mean ± sd over seeds. Test users per window: all, or a seeded sample of {cfg['eval'].get('max_users')}. "
        "The reference: the 10 most frequent training targets of each window, on the same users.",
        "",
        f"After period 0, on window 0's test users ({w0['users']} of {w0['users_in_window']}): NDCG@10 "
        f"{w0['overall']['ndcg@10']:.4f} against {w0['popularity']['overall']['ndcg@10']:.4f} for the most popular items "
        f"({ratio:.1f}x); Hit@10 {w0['overall']['hit@10']:.4f} against {w0['popularity']['overall']['hit@10']:.4f}."
        + (
            f" The items that followed each user's last items (no model): NDCG@10 "
            f"{w0['transitions']['overall']['ndcg@10']:.4f}, Hit@10 {w0['transitions']['overall']['hit@10']:.4f}."
            if "transitions" in w0
            else ""
        ),
        "",
        f"Average over windows 1-{last} (each period on its own test window):",
        "",
        "| method | " + " | ".join(MAIN_METRICS) + " |",
        "| --- | " + " | ".join("---" for _ in MAIN_METRICS) + " |",
    ]
    result = {
        "bench": "continual_cds",
        "seeds": seeds,
        "data": data,
        "period0_window0": {
            "ndcg@10": round(w0["overall"]["ndcg@10"], 5),
            "popularity_ndcg@10": round(w0["popularity"]["overall"]["ndcg@10"], 5),
            "ratio": round(ratio, 2),
            "users": w0["users"],
        },
        "methods": {},
    }
    for method in METHODS:
        per_seed = [sums[(s, method)]["average_incremental"] for s in seeds]
        lines.append(f"| {method} | " + " | ".join(fmt([p[k] for p in per_seed]) for k in MAIN_METRICS) + " |")
        result["methods"][method] = {k: round(mean_sd([p[k] for p in per_seed])[0], 5) for k in MAIN_METRICS}
    pop = sums[(seeds[0], METHODS[0])]["popularity"]
    lines.append(
        "| most popular 10 of each window (reference) | " + " | ".join(f"{pop[k]:.4f}" for k in MAIN_METRICS) + " |"
    )
    result["popularity"] = {k: round(pop[k], 5) for k in MAIN_METRICS}
    follow = sums[(seeds[0], METHODS[0])]["transitions"]
    if any(v is not None for v in follow.values()):
        lines.append(
            "| items that followed the user's last items (reference, no model) | "
            + " | ".join(f"{follow[k]:.4f}" for k in MAIN_METRICS)
            + " |"
        )
        result["transitions"] = {k: round(follow[k], 5) for k in MAIN_METRICS}

    pop_groups = sums[(seeds[0], METHODS[0])]["popularity_groups"]
    lines += [
        "",
        f"NDCG@10 by user group (windows 1-{last}; users per group and window in metrics.json):",
        "",
        "| method | " + " | ".join(GROUPS) + " |",
        "| --- | " + " | ".join("---" for _ in GROUPS) + " |",
    ]
    for method in METHODS:
        lines.append(
            f"| {method} | "
            + " | ".join(fmt([sums[(s, method)]["groups"][g]["ndcg@10"] for s in seeds]) for g in GROUPS)
            + " |"
        )
        result["methods"][method]["groups_ndcg@10"] = {
            g: round(mean_sd([sums[(s, method)]["groups"][g]["ndcg@10"] for s in seeds])[0], 5) for g in GROUPS
        }
    lines.append(
        "| most popular 10 (reference) | "
        + " | ".join("-" if pop_groups[g]["ndcg@10"] is None else f"{pop_groups[g]['ndcg@10']:.4f}" for g in GROUPS)
        + " |"
    )

    periods = range(1, last + 1)
    lines += [
        "",
        "NDCG@10 per window (each period on its own window), backward transfer and forgetting:",
        "",
        "| method | " + " | ".join(f"window {t}" for t in periods) + " | BWT | forgetting |",
        "| --- | " + " | ".join("---" for _ in range(last + 2)) + " |",
    ]
    first = runs[(seeds[0], METHODS[0])]
    for method in METHODS:
        cells = [fmt([runs[(s, method)][t]["windows"][str(t)]["overall"]["ndcg@10"] for s in seeds]) for t in periods]
        cells += [fmt([sums[(s, method)]["bwt"] for s in seeds]), fmt([sums[(s, method)]["forgetting"] for s in seeds])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        result["methods"][method]["bwt_ndcg@10"] = round(mean_sd([sums[(s, method)]["bwt"] for s in seeds])[0], 5)
        result["methods"][method]["forgetting_ndcg@10"] = round(
            mean_sd([sums[(s, method)]["forgetting"] for s in seeds])[0], 5
        )
    lines.append(
        "| most popular 10 (reference) | "
        + " | ".join(f"{first[t]['windows'][str(t)]['popularity']['overall']['ndcg@10']:.4f}" for t in periods)
        + " | - | - |"
    )

    for method in METHODS:
        lines += [
            "",
            f"{method}: R[i][j] = NDCG@10 after period i on window j's test users (mean over seeds)",
            "",
            "| after period | " + " | ".join(f"window {j}" for j in range(last + 1)) + " |",
            "| --- | " + " | ".join("---" for _ in range(last + 1)) + " |",
        ]
        for i in range(last + 1):
            row = [
                statistics.mean(sums[(s, method)]["R"][i][j] for s in seeds) if j <= i else None
                for j in range(last + 1)
            ]
            lines.append(f"| {i} | " + " | ".join("-" if x is None else f"{x:.4f}" for x in row) + " |")

    lines += [
        "",
        f"Test loss (teacher-forced cross-entropy of the target's tokens; lower is better), each period on its own "
        f"window, and its forgetting: the loss on window j after period {last} minus right after period j, over j < {last}:",
        "",
        "| method | " + " | ".join(f"window {t}" for t in periods) + " | mean | forgetting (loss) |",
        "| --- | " + " | ".join("---" for _ in range(last + 2)) + " |",
    ]
    for method in METHODS:
        per_seed = [loss_columns(runs[(s, method)], last) for s in seeds]
        own = [[own_s[t] for own_s, _ in per_seed] for t in range(last)]
        mean_own = [statistics.mean(own_s) for own_s, _ in per_seed]
        lines.append(
            f"| {method} | "
            + " | ".join(fmt(x) for x in own)
            + f" | {fmt(mean_own)} | {fmt([f for _, f in per_seed])} |"
        )
        result["methods"][method]["test_loss"] = round(mean_sd(mean_own)[0], 5)
        result["methods"][method]["forgetting_loss"] = round(mean_sd([f for _, f in per_seed])[0], 5)

    return lines, result


def source_name(data: str) -> str:
    """The dataset's name for a figure: the folder its reviews came from (the manifest's sources)."""
    sources = load_manifest(data).get("sources") or [{"path": data}]
    return os.path.basename(os.path.dirname(sources[0]["path"])) or os.path.basename(data.rstrip("/"))


def lambda_variants(a) -> dict:
    """The lambda sweep's peso runs per seed: folder name -> overrides, lambda and the term's form."""
    variants = {f"peso_lam{lam:g}": dict(overrides=[f"method.lam={lam}"], lam=lam, form="faithful") for lam in a.lams}
    variants |= {
        f"peso_entries_lam{lam:g}": dict(
            overrides=["method.kl_scale=entries", f"method.lam={lam}"], lam=lam, form="entries"
        )
        for lam in a.entries_lams
    }
    return variants


def lambda_curve(a, main_lam: float, cfg: dict) -> dict:
    """bench/pull_sweep.py's curve over this study's runs: per variant, the mean and sd over seeds
    of NDCG@10 (overall and per group) and of the pull / data ratio, plus every seed's NDCG@10
    minus single's on the same seed (`vs_single`)."""
    per_seed = {("single", s): pull_sweep.summary(os.path.join(a.work, f"seed{s}", "single")) for s in a.seeds}
    form = "entries" if cfg["method"].get("kl_scale") == "entries" else "faithful"
    main = f"peso_entries_lam{main_lam:g}" if form == "entries" else f"peso_lam{main_lam:g}"
    variants = {"single": {}, main: dict(lam=main_lam, form=form, main=True)}
    for s in a.seeds:  # the main peso runs are the config's lambda
        per_seed[(main, s)] = pull_sweep.summary(os.path.join(a.work, f"seed{s}", "peso"))
    for name, spec in lambda_variants(a).items():
        variants[name] = {k: v for k, v in spec.items() if k != "overrides"}
        for s in a.seeds:
            per_seed[(name, s)] = pull_sweep.summary(os.path.join(a.work, f"seed{s}", name))
    curve = {}
    for name, spec in variants.items():
        seeds = [per_seed[(name, s)] for s in a.seeds]
        curve[name] = {**spec, **pull_sweep.over_seeds(seeds)}
        curve[name]["vs_single"] = [
            round(per_seed[(name, s)]["ndcg@10"] - per_seed[("single", s)]["ndcg@10"], 5) for s in a.seeds
        ]
    return curve


def curve_table(curve: dict, seeds: list, cfg: dict) -> list:
    """The stability/plasticity table: one row per lambda, mean ± sd over seeds."""

    def cell(ms: list, digits: int = 4) -> str:
        return "-" if ms[0] is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"

    def ratio(ms: list) -> str:  # spans orders of magnitude (1e-4 at the authors' lambda)
        return "-" if ms[0] is None else f"{ms[0]:.3g} ± {ms[1]:.2g}"

    lines = [
        "",
        f"The pull's strength: peso at each lambda ({len(seeds)} seeds; the paper's term reduced by the "
        f"{cfg['method'].get('reduce', 'mean')} over modules, or `kl_scale: entries`). pull / data: the mean of "
        "TensorBoard's pull/ratio (the norm of lambda x the term's gradient on the LoRA factors over the data loss's); "
        "moved: ||adapter - anchor|| / ||anchor|| per period, over the LoRA factors (and the code-token rows); vs single: NDCG@10 minus single's on the same seed, "
        "one value per seed. Figure: bench/<name>_lambda.png.",
        "",
        "| peso | pull / data | moved | rows moved | NDCG@10 | dormant | new | continuing | vs single (per seed) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    # single, then the paper's term by lambda, then kl_scale entries
    order = sorted(curve, key=lambda n: (n != "single", curve[n].get("form") == "entries", curve[n].get("lam", 0)))
    for name in order:
        v = curve[name]
        label = (
            "single (no term)"
            if name == "single"
            else ("`kl_scale: entries`, " if v["form"] == "entries" else "")
            + f"lambda {v['lam']:g}"
            + (" (the config's)" if v.get("main") else "")
        )
        groups = v["groups_ndcg@10"]
        lines.append(
            f"| {label} | {ratio(v['pull_over_data'])} | {cell(v['adapter_moved'], 3)} | "
            f"{cell(v['token_rows_moved'], 3)} | {cell(v['ndcg@10'])} | "
            + " | ".join(cell(groups.get(g, [None, None])) for g in ("dormant", "new", "continuing"))
            + " | "
            + ("-" if name == "single" else ", ".join(f"{d:+.4f}" for d in v["vs_single"]))
            + " |"
        )
    return lines


def plot(runs: dict, seeds: list, last: int, path: str) -> None:
    """Three panels, mean and sd over seeds: NDCG@10 on each period's own window (with the
    popularity reference), the test loss there, and NDCG@10 on window 1 as later periods are
    learned (forgetting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    periods = list(range(1, last + 1))

    def own(method, key):
        return [[runs[(s, method)][t]["windows"][str(t)]["overall"][key] for s in seeds] for t in periods]

    def window1(method):
        return [[runs[(s, method)][t]["windows"]["1"]["overall"]["ndcg@10"] for s in seeds] for t in periods]

    panels = [
        ("NDCG@10, own window", lambda m: own(m, "ndcg@10")),
        ("test loss, own window", lambda m: own(m, "test_loss")),
        ("NDCG@10 on window 1 (forgetting)", window1),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4))
    for ax, (title, values) in zip(axes, panels):
        for method in METHODS:
            stats = [mean_sd(v) for v in values(method)]
            ax.errorbar(
                periods, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3, label=method
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("period")
        ax.set_xticks(periods)
        ax.grid(alpha=0.3)
    first = runs[(seeds[0], METHODS[0])]
    axes[0].plot(
        periods,
        [first[t]["windows"][str(t)]["popularity"]["overall"]["ndcg@10"] for t in periods],
        "k--",
        label="most popular 10",
    )
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
