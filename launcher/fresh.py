"""`python -m launcher demo --fresh`: keeping a model fresh, on MovieLens-100K (CPU, minutes).

The stream arrives in three parts (the ratings up to 1997-12-15, up to 1998-02-15, then the
rest). The first is converted with calendar windows of 60 days, the others are appended
(`data_tools append`); after each arrival the new items get codes (`data_tools index`: only
them; no code moves) and `launcher run` trains the periods of the windows that closed, from the
last finished one. The last window is still open at the end: held back, not trained.

    arrival 1: convert -> window 0            -> period 0 (full training of a tiny Llama)
    arrival 2: append  -> window 1            -> period 1 (peso, LoRA)
    arrival 3: append  -> window 2 (3 open)   -> period 2

Every step is skipped when its outputs exist (a reviews file already appended is not read
again), so a rerun only redoes what is missing. The same commands by hand: README, "Keeping a
model fresh".
"""

from __future__ import annotations

import calendar
import os
import time
from collections.abc import Callable, Sequence

from data_tools.append import AppendOptions, append
from data_tools.convert import ConvertOptions, convert
from data_tools.dataset import load_manifest
from data_tools.examples import movielens_100k
from data_tools.index.build import build_index
from data_tools.inspect import window_table
from launcher.files import shipped
from launcher.periods import RunSettings, run_local
from launcher.report import report

CONFIG = shipped("configs", "demo.yaml")
DS_CONFIG = shipped("ds_configs", "zero2.json")
ARRIVALS = ("1997-12-15", "1998-02-15")  # where the stream is cut: three arrivals
SPLIT = "calendar:60"


def split_arrivals(inter: str, folder: str, cuts: Sequence[str] = ARRIVALS) -> list[str]:
    """The .inter file as len(cuts) + 1 files, each with the header: the ratings before the first
    cut, between the cuts, and after the last."""
    bounds = [calendar.timegm(time.strptime(c, "%Y-%m-%d")) for c in cuts]
    with open(inter) as f:
        header, *lines = f.readlines()
    parts: list[list[str]] = [[] for _ in range(len(cuts) + 1)]
    for line in lines:
        ts = float(line.split("\t")[3])
        parts[sum(ts >= b for b in bounds)].append(line)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, part in enumerate(parts):
        path = os.path.join(folder, f"arrival-{k + 1}.inter")
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(header)
                f.writelines(part)
        paths.append(path)
    return paths


def run_fresh(
    workdir: str,
    nproc: int = 2,
    overrides: Sequence[str] = ("method.name=peso",),
    config: str = CONFIG,
    index: Callable[[str], object] | None = None,
) -> str:
    """The three arrivals, each followed by its new items' codes and its periods; returns the
    report. `index(data)` codes the items (default: `build_index`, MiniLM embeddings)."""
    t0 = time.time()
    workdir = os.path.abspath(workdir)
    env = dict(
        os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"
    )
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    inter, item = movielens_100k()
    arrivals = split_arrivals(inter, os.path.join(workdir, "data", "arrivals"))
    data = os.path.join(workdir, "data", "ml-100k-fresh")
    run = os.path.join(workdir, "runs", "fresh")
    settings = RunSettings(config, data, run, DS_CONFIG, list(overrides))
    for k, reviews in enumerate(arrivals, 1):
        if k == 1:
            try:
                manifest = load_manifest(data)  # converted (and perhaps appended to) by an earlier run
            except FileNotFoundError:
                manifest = convert(
                    ConvertOptions(format="movielens", reviews=reviews, meta=item, out=data, split=SPLIT)
                )
        else:
            manifest = append(AppendOptions(data=data, reviews=reviews, meta=item))
        pending = manifest["pending"]
        print(
            f"\narrival {k}: {len(manifest['windows'])} windows written, {pending['interactions']:,} interactions held "
            f"back (window {pending['first_open_window']} is open)\n{window_table(manifest)}",
            flush=True,
        )
        (index or build_index)(data)  # codes for the new items only
        trained = run_local(settings, nproc, env=env)
        print(f"arrival {k}: trained period(s) {trained or 'none (no new window)'}", flush=True)
    png = os.path.join(workdir, "report-fresh.png")
    text = report([run], png)
    with open(os.path.join(workdir, "report-fresh.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    print(f"\nplot: {png}\nfresh demo finished in {(time.time() - t0) / 60:.1f} min")
    return text
