"""Which periods remain, and how they are launched on this machine (`run_local`).

The run's state.json (written by train/main.py when a period is done, and when one stops on a
signal after its checkpoint) is the truth: a rerun continues with the first period not done, and
never repeats a finished one. A period that was interrupted resumes inside itself from its own
checkpoints. SIGTERM or SIGUSR1 to this process asks the running period to checkpoint and stop.
`start_from_period0` starts a run from another run's finished period 0, to compare methods on
the later periods.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from data_tools.dataset import load_manifest
from train.common.exit_codes import EXIT_REQUEUE, EXIT_USAGE
from train.common.logs import stamped
from train.common.run_folder import RunFolder

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a checkout, or site-packages when installed
MAIN = os.path.join(REPO, "train", "main.py")


class PeriodFailed(RuntimeError):
    def __init__(self, period: int, code: int):
        super().__init__(
            f"period {period} failed (exit code {code}); fix the cause and rerun: finished periods are kept "
            "and this one resumes from its last checkpoint"
        )
        self.period, self.code = period, code


class PeriodRefused(PeriodFailed):
    """A period refused its inputs or config (exit code 2): its one `error:` line is printed
    already (by train/main.py), and the launcher exits 2 too, quietly."""

    def __init__(self, period: int):
        super().__init__(period, EXIT_USAGE)


class PeriodInterrupted(RuntimeError):
    """A period checkpointed on a signal and stopped; the same command again resumes it."""

    def __init__(self, period: int):
        super().__init__(f"period {period} stopped on a signal after a checkpoint; rerun the same command to resume it")
        self.period = period


def remaining_periods(data: str, run: str, restart: bool = False) -> list[int]:
    """The periods still to train, in order: the dataset's windows the run has not done (a
    dataset that `data_tools append` grew has new ones). Raises DatasetChanged (one line) if a
    window a period trained on has changed since (`restart`: the period that started trains
    again from its start, so its own window may have)."""
    manifest = load_manifest(data)
    folder = RunFolder(run)
    folder.check_windows(manifest, data, restart=restart)
    done = set(folder.state()["done"])
    return [t for t in range(len(manifest["windows"])) if t not in done]


def train_args(
    config: str,
    data: str,
    run: str,
    ds_config: str,
    overrides: list[str],
    period: int | None = None,
    restart: bool = False,
) -> list[str]:
    args = ["--ds_config", ds_config, "--config", config, "--data", data, "--run_dir", run]
    if period is not None:
        args += ["--period", str(period)]
    if restart:
        args.append("--restart-period")
    return args + list(overrides)


@dataclass(frozen=True)
class RunSettings:
    """What every period of a run trains with: train/main.py's --config, --data, --run_dir and
    --ds_config, and the dotted overrides."""

    config: str
    data: str
    run_dir: str
    ds_config: str
    overrides: Sequence[str] = ()

    def train_args(self, period: int | None = None, restart: bool = False) -> list[str]:
        """train/main.py's arguments for `period` (default: the next one the run has not done)."""
        return train_args(self.config, self.data, self.run_dir, self.ds_config, list(self.overrides), period, restart)


def local_command(nproc: int, args: list[str], script: str = MAIN) -> list[str]:
    """`script` (train/main.py by default) with `args` on `nproc` ranks of this machine: torchrun
    for several (it picks a free port: several runs can share a machine; launcher/torchrun.py,
    which passes the ranks' exit codes 2 and 75 on), a plain process for one."""
    if nproc <= 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "launcher.torchrun", "--standalone", f"--nproc_per_node={nproc}", script, *args]


def run_local(
    settings: RunSettings,
    nproc: int,
    *,
    env: dict | None = None,
    upto: int | None = None,
    log=None,
    restart: bool = False,
) -> list[int]:
    """Train every remaining period (up to period `upto`) of the run on `nproc` ranks of this
    machine; returns those trained. `env`: the periods' environment (default: this process's).
    `log`: a file that takes the periods' output (default: this process's stdout and stderr).
    `restart`: the first period discards its checkpoints instead of resuming (--restart-period).
    Raises PeriodFailed, PeriodRefused when a period refused its inputs (its line is printed), or
    PeriodInterrupted when a period checkpointed on a signal."""
    trained = []
    for t in remaining_periods(settings.data, settings.run_dir, restart=restart):
        if upto is not None and t > upto:
            break
        _announce(f"== period {t}: {os.path.basename(settings.config)} on {nproc} rank(s)", log)
        started = time.time()
        args = settings.train_args(t, restart=restart and not trained)
        code = _run_period(local_command(nproc, args), env, log)
        if code == EXIT_REQUEUE or (code != 0 and stopped_on_signal(settings.run_dir, t, started)):
            raise PeriodInterrupted(t)
        if code == EXIT_USAGE:
            raise PeriodRefused(t)
        if code != 0:
            raise PeriodFailed(t, code)
        trained.append(t)
    return trained


def _run_period(command: list[str], env: dict | None, log) -> int:
    """The period's exit code. SIGTERM or SIGUSR1 to this process asks the period to checkpoint and
    stop: passed on as SIGTERM, which the trainer takes like SIGUSR1 and torchrun passes on to its
    workers (it kills them 30 s later if they have not finished their checkpoint)."""
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    with _signals_passed_to(proc):
        return proc.wait()


@contextlib.contextmanager
def _signals_passed_to(proc: subprocess.Popen):
    if threading.current_thread() is not threading.main_thread():  # the demo's side-by-side runs
        yield
        return
    signals = (signal.SIGTERM, signal.SIGUSR1)
    previous = {sig: signal.signal(sig, lambda signum, frame: proc.send_signal(signal.SIGTERM)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stopped_on_signal(run: str, period: int, since: float) -> bool:
    """Whether `period` stopped on a signal after a checkpoint, whatever the exit code said: the run's
    state.json says so (rank 0 writes phase "stopped" after the checkpoint), if written since `since`.
    torchrun reports its workers' exit 75 as a failure (1); srun --kill-on-bad-exit=1 may return
    128 + the signal it stopped the other ranks with (launcher/slurm.py)."""
    folder = RunFolder(run)
    try:
        fresh = os.path.getmtime(folder.path("state.json")) >= since
    except FileNotFoundError:
        return False
    state = folder.state()
    return fresh and state["phase"] == "stopped" and state["period"] == period


def _announce(message: str, log_file=None) -> None:
    """A line of the chain's log: into `log_file` beside the periods' own output when there is
    one, else through this process's logger."""
    if log_file is None:
        log.info(message)
    else:
        print(stamped(message), file=log_file, flush=True)


def start_from_period0(src: str, dst: str) -> None:
    """Start run `dst` from run `src`'s finished period 0 (same backbone, tokenizer and model),
    to compare methods on the later periods without training period 0 again."""
    if os.path.exists(os.path.join(dst, "state.json")):
        return
    os.makedirs(os.path.join(dst, "periods"), exist_ok=True)
    for name in ("tokenizer", "base", "tb"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copytree(os.path.join(src, name), os.path.join(dst, name), dirs_exist_ok=True)
    shutil.copytree(
        os.path.join(src, "periods", "0"),
        os.path.join(dst, "periods", "0"),
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("ds_ckpt"),
    )
    state = RunFolder(src).state()
    if 0 not in state["done"]:
        raise ValueError(f"{src} has not finished period 0")
    RunFolder(dst).save_state(done=[0], global_step=state["global_step"], period=0, phase="done")
