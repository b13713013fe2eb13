"""Keeping a model fresh on the real local cluster: `sbatch slurm/continual.sh` trains the
periods of a calendar dataset; new reviews are appended (`python -m data_tools append`), the
new items get codes, and the same sbatch command, resubmitted, trains only the new periods."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

from .test_continual import OVERRIDES, chain_requests, done, log_text, submit, wait_until

CUT = "1997-12-15"  # MovieLens-100K runs from 1997-09-20 to 1998-04-22; windows of 60 days


def _split_stream(inter: str, folder: str) -> tuple[str, str]:
    """The .inter file as two arrivals: the reviews before CUT, then the rest (each with the header)."""
    import calendar
    import time

    cut = calendar.timegm(time.strptime(CUT, "%Y-%m-%d"))
    with open(inter) as f:
        header, *lines = f.readlines()
    parts = [os.path.join(folder, "first.inter"), os.path.join(folder, "later.inter")]
    for path, keep in zip(parts, (lambda ts: ts < cut, lambda ts: ts >= cut)):
        with open(path, "w") as f:
            f.write(header)
            f.writelines(line for line in lines if keep(float(line.split("\t")[3])))
    return parts[0], parts[1]


def _code_items(root: str) -> None:
    """A random unique code for every item, the same for an item whatever came after it (an
    imported index; `python -m data_tools index` keeps codes the same way, test_append.py)."""
    from data_tools.index.build import import_index

    with open(os.path.join(root, "items.jsonl")) as f:
        sources = [json.loads(line)["source_id"] for line in f]
    prefixes = list(range(256**2))
    random.Random(0).shuffle(prefixes)
    table = {
        s: [f"<a_{c // 256}>", f"<b_{c % 256}>", f"<c_{k * 7 % 256}>", f"<d_{k * 13 % 256}>"]
        for k, (s, c) in enumerate(zip(sources, prefixes))
    }
    path = os.path.join(os.path.dirname(root), "codes.json")
    with open(path, "w") as f:
        json.dump(table, f)
    import_index(root, path, force=True, log=sys.stdout)


@pytest.fixture(scope="module")
def arrivals(tmp_path_factory, movielens_files):
    from data_tools.convert import ConvertOptions, convert

    from .test_continual import REPO

    folder = tmp_path_factory.mktemp("fresh")
    inter, item = movielens_files
    first, later = _split_stream(inter, str(folder))
    root = str(folder / "ds")
    m = convert(
        ConvertOptions(
            format="movielens", reviews=first, meta=item, out=root, split="calendar:60", progress=False, log=sys.stdout
        )
    )
    assert len(m["windows"]) == 1 and m["pending"]["interactions"] > 0  # window 1 is open: held back
    _code_items(root)
    ds = json.load(open(os.path.join(REPO, "ds_configs", "zero3.json")))
    ds_path = str(folder / "zero3.json")
    with open(ds_path, "w") as f:
        json.dump(ds, f)
    return root, ds_path, later, item


def test_the_chain_resubmitted_after_an_append_trains_only_the_new_periods(slurm, arrivals, tmp_path):
    from data_tools.append import AppendOptions, append
    from data_tools.dataset import load_manifest, window_fingerprint
    from train.common.run_folder import RunFolder

    data, ds, later, item = arrivals
    run, logs = str(tmp_path / "run"), tmp_path / "logs"
    logs.mkdir()
    gpus = ["--gpus-per-node=1"]
    overrides = OVERRIDES.replace("schedule.max_steps=30", "schedule.max_steps=10")
    head = submit(slurm, data, ds, run, logs, gpus, overrides)
    report = os.path.join(run, "report.md")
    wait_until(slurm, lambda: os.path.exists(report), 600, "the first chain (period 0) to finish", logs)
    assert done(run) == [0]
    chain_requests(slurm, head, log_text(logs), jobs=1)
    period0 = os.path.join(run, "periods", "0", "model", "model.safetensors")
    stamp = os.stat(period0).st_mtime_ns

    # A later arrival: the rest of the stream closes windows 1 and 2 (window 3 stays open).
    m = append(AppendOptions(data=data, reviews=later, meta=item, progress=False, log=sys.stdout))
    assert [w["index"] for w in m["windows"]] == [0, 1, 2] and m["pending"]["interactions"] > 0
    _code_items(data)
    os.remove(report)
    again = submit(slurm, data, ds, run, logs, gpus, overrides)
    wait_until(slurm, lambda: os.path.exists(report), 600, "the resubmitted chain to finish", logs)
    text = log_text(logs)
    assert done(run) == [0, 1, 2]
    assert chain_requests(slurm, again, text, jobs=2)  # periods 1 and 2, one job each
    assert text.count("period 0 on 2 node(s)") == 1 and os.stat(period0).st_mtime_ns == stamp
    recorded = RunFolder(run).recorded_windows()
    assert recorded == {t: window_fingerprint(load_manifest(data), t) for t in range(3)}
    assert "window 2" in open(report).read()
