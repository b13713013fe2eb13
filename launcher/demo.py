"""The demo: real data (MovieLens-100K from the recbole wheel), end to end on two CPU ranks.

convert -> item index (MiniLM embeddings + RQ-VAE) -> period 0 (full training of a tiny
random-weight Llama, shared by the runs) -> periods 1..4 with peso, single and cumulative LoRA,
and peso once more with a pull that acts -> the results table by method and user group beside
the most popular items of each window (the reference a recommender must beat) and how hard each
proximal term pulled, a plot, and TensorBoard logs. Every step is skipped when its outputs
already exist, so a rerun only redoes what is missing.

peso with the authors' lambda (2, mean over modules) pulls the LoRA factors about 0.003 as hard as
the data does here, and gives single's numbers to four decimals; `method.kl_scale: entries` with
lambda 0.2 pulls about 0.2 as hard (docs/methods.md, for the sweep that chose it).

ZeRO-2: on two CPU ranks, ZeRO-3 gathers and re-partitions every module's weights around its use,
which costs a model this small most of its throughput (bench/RESULTS.md, train_step); the tests
run every path under ZeRO-3 with real partitioning.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from data_tools.convert import ConvertOptions, convert
from data_tools.examples import movielens_100k
from data_tools.index.build import build_index
from data_tools.inspect import window_table
from launcher.files import shipped
from launcher.periods import RunSettings, run_local, start_from_period0
from launcher.report import report

CONFIG = shipped("configs", "demo.yaml")
DS_CONFIG = shipped("ds_configs", "zero2.json")
# run name -> its overrides of configs/demo.yaml (peso with the authors' lambda there)
RUNS = {
    "peso": ["method.name=peso"],
    "single": ["method.name=single"],
    "cumulative": ["method.name=cumulative"],
    "peso-entries-lam0.2": ["method.name=peso", "method.kl_scale=entries", "method.lam=0.2"],
}


def run_demo(workdir: str, nproc: int = 2) -> None:
    t0 = time.time()
    workdir = os.path.abspath(workdir)  # the runs' saved configs name the dataset wherever they are read from
    env = dict(
        os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"
    )
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    data = os.path.join(workdir, "data", "ml-100k")
    inter, item = movielens_100k()
    manifest = convert(ConvertOptions(format="movielens", reviews=inter, meta=item, out=data))
    print(window_table(manifest), flush=True)
    build_index(data)  # MiniLM embeddings: the default CodingOptions

    runs = {name: os.path.join(workdir, "runs", name) for name in RUNS}
    first = runs["peso"]
    run_local(RunSettings(CONFIG, data, first, DS_CONFIG), nproc, env=env, upto=0)
    for run in runs.values():
        if run != first:
            start_from_period0(first, run)

    def later_periods(name: str) -> str:
        """One run's periods 1.. on one rank, its output in <workdir>/runs/<name>.log."""
        path = os.path.join(workdir, "runs", f"{name}.log")
        with open(path, "a") as log:
            run_local(RunSettings(CONFIG, data, runs[name], DS_CONFIG, RUNS[name]), 1, env=env, log=log)
        return f"{name}: every period done ({(time.time() - t0) / 60:.1f} min so far; log: {path})"

    # The runs side by side, one rank each: on a model this small, independent jobs use the
    # cores better than the ranks of one job (period 0 above used `nproc` ranks), and a LoRA
    # period is mostly start-up and evaluation, which overlap well.
    print(f"periods 1-4 of {', '.join(RUNS)} side by side, one rank each ...", flush=True)
    with ThreadPoolExecutor(len(RUNS)) as pool:
        for line in pool.map(later_periods, RUNS):
            print(line, flush=True)

    png = os.path.join(workdir, "report.png")
    text = report(list(runs.values()), png)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    print("\n" + example_recommendations(runs["peso"], data))
    print(
        f"\nplot: {png}\nTensorBoard: tensorboard --logdir {os.path.join(workdir, 'runs')}\n"
        f"demo finished in {(time.time() - t0) / 60:.1f} min"
    )


def example_recommendations(run: str, data: str, k: int = 5) -> str:
    """What the trained recommender says for one user of the last window, beside what they did
    next: the same as `python -m launcher recommend RUN --history ...` (docs/recommend.md)."""
    from transformers.utils import logging as hf_logging

    from data_tools.dataset import load_manifest
    from train.evaluation.users import test_users
    from train.serve.recommender import Recommender

    hf_logging.disable_progress_bar()
    rec = Recommender.from_run(run, device="cpu")
    user = test_users(data, load_manifest(data), rec.period, 1, seed=0)[0]
    (ranked,) = rec.top_items([user["history"]], k)
    title = rec.catalog.title_of
    lines = [f"peso after period {rec.period}, for a test user of window {rec.period} who last rated:"]
    lines += [f"    {title[i]}" for i in user["history"][-3:]]
    lines += [f"  top {k} (log-probability):"] + [f"  {n}. {title[i]} ({s:.2f})" for n, (i, s) in enumerate(ranked, 1)]
    lines.append(f"  what they rated next: {title[user['target']]}")
    return "\n".join(lines)
