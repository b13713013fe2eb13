"""`sbatch slurm/continual.sh` on the real local cluster (2 nodes): the chain of periods, a
requeue on a signal, and a failed period that a resubmission completes.

Each chain asks for the nodes' GRES "GPUs" in another style (--gpus-per-node, --gpus-per-task,
--gpus), and every job of it must ask for the same as the first (test_resubmission.py checks
every style and option without training). The ranks train on the CPU: PESO_ALLOW_CPU=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from launcher.slurm import period_outcome

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "slurm", "continual.sh")
OVERRIDES = (
    "schedule.max_steps=30 checkpoint.every_steps=2 data.micro_batch_size=4 schedule.global_batch_size=8 "
    "eval.max_users=16 data.eval_batch_size=16 logging.progress=false logging.every_steps=2"
)


@pytest.fixture(scope="module")
def three_windows(tmp_path_factory, movielens_files):
    """MovieLens-100K in 3 windows (60% then 2 x 20%) with random item codes."""
    from data_tools.convert import ConvertOptions, convert
    from tests.conftest import import_random_codes

    root = str(tmp_path_factory.mktemp("ml3") / "ds")
    inter, item = movielens_files
    convert(
        ConvertOptions(
            format="movielens", reviews=inter, meta=item, out=root, split="paper:0.6:2", progress=False, log=sys.stdout
        )
    )
    import_random_codes(root)
    ds = json.load(open(os.path.join(REPO, "ds_configs", "zero3.json")))
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # really partitioned
    ds_path = os.path.join(os.path.dirname(root), "zero3.json")
    with open(ds_path, "w") as f:
        json.dump(ds, f)
    return root, ds_path


def submit(slurm, data: str, ds: str, run: str, logs, gpus: list[str], overrides: str = OVERRIDES) -> int:
    env = {
        "PESO_DATA": data,
        "PESO_RUN": run,
        "PESO_CONFIG": os.path.join(REPO, "configs", "tiny.yaml"),
        "PESO_DS_CONFIG": ds,
        "PESO_OVERRIDES": overrides,
        "PESO_REPO": REPO,
        "PESO_PYTHON": sys.executable,
        "PESO_ALLOW_CPU": "1",  # the job has (GRES) GPUs; there is no CUDA here
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return slurm.sbatch(
        [
            "--nodes=2",
            "--ntasks-per-node=1",
            *gpus,
            "--cpus-per-task=1",
            "--time=20",
            f"--output={logs}/chain-%j.out",
            SCRIPT,
        ],
        env=env,
        cwd=REPO,
    )


def chain_requests(slurm, head: int, text: str, jobs: int) -> dict:
    """Follow the chain from `head` through its log ("submitted job N"): `jobs` jobs, each asking
    for what the first asked for; returns that request."""
    successor = dict(re.findall(r"== job (\d+): period \d+ done; submitted job (\d+)", text))
    chain = [str(head)]
    while chain[-1] in successor:
        chain.append(successor[chain[-1]])
    assert len(chain) == jobs, (chain, text[-3000:])
    first = slurm.request(head)
    for job in chain[1:]:
        assert slurm.request(int(job)) == first, job
    return first


def done(run: str) -> list[int]:
    try:
        with open(os.path.join(run, "state.json")) as f:
            return json.load(f)["done"]
    except FileNotFoundError:
        return []


def wait_until(slurm, predicate, timeout: float, what: str, logs) -> None:
    """Poll `predicate`; fail with the chain's log on timeout, or soon after the queue empties."""
    deadline = time.monotonic() + timeout
    idle_since = None
    while not predicate():
        idle_since = (idle_since or time.monotonic()) if not slurm.squeue() else None
        if time.monotonic() > deadline or (idle_since and time.monotonic() - idle_since > 15):
            text = "\n".join(open(os.path.join(logs, f)).read()[-4000:] for f in sorted(os.listdir(logs)))
            pytest.fail(f"{'timed out' if time.monotonic() > deadline else 'no job left'} waiting for {what}\n{text}")
        time.sleep(0.5)


def log_text(logs) -> str:
    return "".join(open(os.path.join(logs, f)).read() for f in sorted(os.listdir(logs)))


@pytest.fixture(scope="module")
def uninterrupted(slurm, three_windows, tmp_path_factory):
    data, ds = three_windows
    run, logs = str(tmp_path_factory.mktemp("chain") / "run"), tmp_path_factory.mktemp("chain-logs")
    head = submit(slurm, data, ds, run, logs, ["--gpus-per-node=1"])
    wait_until(slurm, lambda: os.path.exists(os.path.join(run, "report.md")), 600, "the chain to finish", logs)
    return run, log_text(logs), head


def test_the_chain_runs_every_period_in_order_across_two_nodes(slurm, uninterrupted):
    run, text, head = uninterrupted
    assert chain_requests(slurm, head, text, jobs=3)["TresPerNode"] == "gres:gpu:1"
    assert done(run) == [0, 1, 2]
    starts = [text.index(f"period {t} on 2 node(s) node1,node2") for t in range(3)]
    assert starts == sorted(starts)
    for t in range(3):
        with open(os.path.join(run, "periods", str(t), "metrics.json")) as f:
            m = json.load(f)
        assert sorted(m["windows"]) == [str(j) for j in range(t + 1)] and m["windows"][str(t)]["invalid_outputs"] == 0
        with open(os.path.join(run, "periods", str(t), "config.json")) as f:
            assert json.load(f)["world_size"] == 2
    assert "window 2" in open(os.path.join(run, "report.md")).read()
    assert os.path.getsize(os.path.join(run, "report.png")) > 1000
    assert open(os.path.join(run, "hostfile")).read() == "node1 slots=1\nnode2 slots=1\n"


def test_a_signalled_job_requeues_resumes_and_ends_like_an_uninterrupted_run(
    slurm, three_windows, uninterrupted, tmp_path
):
    """Two stops: one in period 1's training, one in period 2's evaluation (after its first window:
    the rerun evaluates only the others). Evaluation sees more users here (48, batches of 8), so
    that the stop arrives while it runs."""
    data, ds = three_windows
    run, logs = str(tmp_path / "run"), tmp_path / "logs"
    logs.mkdir()
    overrides = OVERRIDES.replace(
        "eval.max_users=16 data.eval_batch_size=16", "eval.max_users=48 data.eval_batch_size=8"
    )
    head = submit(slurm, data, ds, run, logs, ["--gpus-per-task=1", "--gpus-per-node=0"], overrides)
    ckpt = os.path.join(run, "periods", "1", "ds_ckpt", "COMPLETE.json")
    wait_until(slurm, lambda: os.path.exists(ckpt), 300, "period 1 to checkpoint", logs)
    job = next(int(r["JobId"]) for r in slurm.squeue() if r["JobState"] == "RUNNING")
    signalled = time.time()
    slurm.command(["scancel", "--signal=USR1", "--batch", str(job)])  # how preemption and the time limit arrive
    wait_until(slurm, lambda: "period 1 checkpointed" in log_text(logs), 120, "period 1 to stop", logs)
    # The rerun cannot start before cred_expire + 1 = 11 s (conf.py): state.json is still the one
    # rank 0 wrote after the checkpoint. Whatever code srun returns (with --kill-on-bad-exit=1 the
    # first rank that exits 75 makes SLURM stop the others: 128 + SIGTERM, or SIGKILL), it says
    # "requeue" for this period only, and only if written since the period started.
    with open(os.path.join(run, "state.json")) as f:
        state = json.load(f)
    assert (state["phase"], state["period"]) == ("stopped", 1)
    assert [period_outcome(code, run, 1, signalled) for code in (0, 75, 137, 143, 1)] == ["done"] + ["requeue"] * 4
    assert period_outcome(143, run, 2, signalled) == "failed"
    assert period_outcome(143, run, 1, os.path.getmtime(os.path.join(run, "state.json")) + 1) == "failed"

    # Period 2's evaluation: once window 0 is done (its result kept on disk), the stop request.
    first_window = os.path.join(run, "periods", "2", "eval", "window-0.json")
    wait_until(slurm, lambda: os.path.exists(first_window), 300, "period 2 to evaluate window 0", logs)
    evaluating = next(int(r["JobId"]) for r in slurm.squeue() if r["JobState"] == "RUNNING")
    slurm.command(["scancel", "--signal=USR1", "--batch", str(evaluating)])
    wait_until(slurm, lambda: "period 2 checkpointed" in log_text(logs), 120, "period 2's evaluation to stop", logs)
    with open(os.path.join(run, "state.json")) as f:
        assert json.load(f)["phase"] == "stopped" and not os.path.exists(
            os.path.join(run, "periods", "2", "metrics.json")
        )

    wait_until(slurm, lambda: os.path.exists(os.path.join(run, "report.md")), 600, "the chain to finish", logs)
    assert slurm.job_info(job)["RestartCnt"] == "1" and slurm.job_info(evaluating)["RestartCnt"] == "1"
    text = log_text(logs)
    assert "period 1 checkpointed; requeueing" in text and "resumed period 1" in text
    assert "period 2: window 0 was evaluated before a stop; its result is reused" in text
    with open(os.path.join(run, "periods", "2", "metrics.json")) as f:
        windows = json.load(f)["windows"]
    assert sorted(windows) == ["0", "1", "2"] and all(w["users"] == 48 for w in windows.values())
    assert chain_requests(slurm, head, text, jobs=3)["TresPerTask"] == "gres:gpu:1"
    for t in range(3):
        a = load_file(
            os.path.join(
                uninterrupted[0],
                "periods",
                str(t),
                "adapter" if t else "model",
                "adapter_model.safetensors" if t else "model.safetensors",
            )
        )
        b = load_file(
            os.path.join(
                run,
                "periods",
                str(t),
                "adapter" if t else "model",
                "adapter_model.safetensors" if t else "model.safetensors",
            )
        )
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (t, k)
    for run_dir in (uninterrupted[0], run):
        with open(os.path.join(run_dir, "periods", "1", "train_summary.json")) as f:
            assert json.load(f)["samples_seen"] == 30 * 8


def test_a_failed_period_stops_the_chain_and_a_resubmission_completes_it(slurm, three_windows, tmp_path):
    data, ds = three_windows
    broken = str(tmp_path / "data")
    shutil.copytree(data, broken)
    shards = os.path.join(broken, "windows", "01")
    hidden = str(tmp_path / "hidden")
    os.makedirs(hidden)
    for name in os.listdir(shards):
        if name.startswith("train-"):
            shutil.move(os.path.join(shards, name), hidden)
    run, logs = str(tmp_path / "run"), tmp_path / "logs"
    logs.mkdir()
    gpus = ["--gpus=2", "--gpus-per-node=0"]
    head = submit(slurm, broken, ds, run, logs, gpus)
    # The missing shards are found before any rank trains: one `error:` line naming them, exit 2.
    wait_until(slurm, lambda: "period 1 refused its inputs" in log_text(logs), 400, "period 1 to fail", logs)
    failed = int(re.search(r"== job (\d+): period 1 refused its inputs", log_text(logs)).group(1))
    slurm.wait_for(failed, states={"FAILED"}, timeout=60)
    assert re.search(r"error: the train shard of window 1 \S+train-\d+\.tar is missing", log_text(logs))
    assert done(run) == [0] and slurm.squeue() == []  # nothing else was submitted
    for name in os.listdir(hidden):
        shutil.move(os.path.join(hidden, name), shards)
    again = submit(slurm, broken, ds, run, logs, gpus)
    wait_until(
        slurm, lambda: os.path.exists(os.path.join(run, "report.md")), 600, "the resubmitted chain to finish", logs
    )
    assert done(run) == [0, 1, 2]
    text = log_text(logs)
    assert text.count("== job") >= 4  # period 0, the failure, then periods 1 and 2
    assert chain_requests(slurm, head, text, jobs=2)["TresPerJob"] == "gres:gpu:2"
    assert chain_requests(slurm, again, text, jobs=2)["TresPerJob"] == "gres:gpu:2"
