"""The demo: real data (MovieLens-100K from the recbole wheel), end to end on two CPU ranks.

convert -> item index (MiniLM embeddings + RQ-VAE) -> period 0 (full training of a tiny
random-weight Llama, shared by the three runs) -> periods 1..4 with peso, single and cumulative
LoRA -> the results table by method and user group, a plot, and TensorBoard logs. Every step is
skipped when its outputs already exist, so a rerun only redoes what is missing.
"""

from __future__ import annotations

import os
import time

from data_tools.convert import ConvertOptions, convert
from data_tools.examples import movielens_100k
from data_tools.index.build import build_index
from data_tools.inspect import window_table
from launcher.periods import REPO, run_local, start_from_period0
from launcher.report import report

CONFIG = os.path.join(REPO, "configs", "demo.yaml")
DS_CONFIG = os.path.join(REPO, "ds_configs", "zero3.json")
METHODS = ("peso", "single", "cumulative")
PERIOD0_STEPS = 600


def run_demo(workdir: str, nproc: int = 2) -> None:
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    data = os.path.join(workdir, "data", "ml-100k")
    inter, item = movielens_100k()
    manifest = convert(ConvertOptions(format="movielens", reviews=inter, meta=item, out=data))
    print(window_table(manifest), flush=True)
    build_index(data, embedder="minilm")

    runs = {m: os.path.join(workdir, "runs", m) for m in METHODS}
    first = runs[METHODS[0]]
    run_local(CONFIG, data, first, DS_CONFIG, nproc, [f"schedule.max_steps={PERIOD0_STEPS}"], env=env, upto=0)
    for run in runs.values():
        if run != first:
            start_from_period0(first, run)
    for method, run in runs.items():
        run_local(CONFIG, data, run, DS_CONFIG, nproc, [f"method.name={method}"], env=env)

    png = os.path.join(workdir, "report.png")
    text = report(list(runs.values()), png)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    print(f"\nplot: {png}\nTensorBoard: tensorboard --logdir {os.path.join(workdir, 'runs')}\n"
          f"demo finished in {(time.time() - t0) / 60:.1f} min")
