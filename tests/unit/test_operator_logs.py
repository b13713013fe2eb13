"""What an operator reads: log lines (timestamps, levels, ranks), progress with elapsed time and
ETA where no progress bar can show, and TensorBoard with one point per step after a resume."""

from __future__ import annotations

import logging
import re

import pytest

from train.common.logs import PACKAGES, configure_logging
from train.evaluation import evaluator as evaluate
from train.loop import telemetry as metrics
from train.loop.telemetry import MetricsLogger, Pace

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture
def fresh_loggers():
    """Give the loggers of train/ and launcher/ back as they were after the test."""
    saved = {name: (lg.handlers[:], lg.level, lg.propagate) for name in PACKAGES for lg in [logging.getLogger(name)]}
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


@pytest.fixture
def clock(monkeypatch):
    """A settable perf_counter for train.loop.telemetry (Pace measures with it)."""
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    return now


def test_rank0_logs_info_with_a_timestamp_other_ranks_only_warnings(fresh_loggers, capsys, monkeypatch):
    monkeypatch.delenv("PESO_LOG_LEVEL", raising=False)
    configure_logging(0)
    configure_logging(0)  # again: replaces its handler, does not print every line twice
    logging.getLogger("train.loop.trainer").info("period 0 epoch 0: validation loss 1.0")
    assert re.fullmatch(rf"{STAMP} INFO period 0 epoch 0: validation loss 1.0\n", capsys.readouterr().out)
    configure_logging(1)
    logging.getLogger("launcher.periods").info("not shown")
    logging.getLogger("train.loop.trainer").warning("shown")
    assert re.fullmatch(rf"{STAMP} WARNING \[rank 1\] shown\n", capsys.readouterr().out)


def test_the_level_comes_from_PESO_LOG_LEVEL(fresh_loggers, capsys, monkeypatch):
    monkeypatch.setenv("PESO_LOG_LEVEL", "warning")
    configure_logging(0)
    logging.getLogger("train.evaluation.evaluator").info("not shown")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("PESO_LOG_LEVEL", "loud")
    configure_logging(0)
    logging.getLogger("train.evaluation.evaluator").info("shown")
    out = capsys.readouterr().out
    assert "PESO_LOG_LEVEL='loud' is not one of DEBUG, INFO, WARNING, ERROR; using INFO" in out and "shown" in out


def test_pace_gives_elapsed_time_and_eta_from_this_process_steps(clock):
    pace = Pace(done=10, total=110)  # resumed at step 10
    clock[0] += 100.0
    assert pace.summary(20) == "elapsed 0:01:40, ETA 0:15:00"  # 90 steps left at 0.1 step/s
    assert Pace(0, 5).summary(0) == "elapsed 0:00:00, ETA unknown"


def test_evaluation_without_a_terminal_reports_users_done_every_minute(clock, monkeypatch):
    seen = []
    monkeypatch.setattr(evaluate.log, "info", seen.append)
    progress = evaluate.EvaluatedUsersReporter(window=2, users=1000, batches=10, show_bar=False)
    for k, at in enumerate([20, 40, 61, 80, 100, 125]):
        clock[0] = 1000.0 + at
        progress.batch_done(k)
    progress.close()
    assert seen == [
        "evaluating window 2: 300 of 1,000 users, elapsed 0:01:01, ETA 0:02:22",
        "evaluating window 2: 600 of 1,000 users, elapsed 0:02:05, ETA 0:01:23",
    ]


def _steps(tb: str, tag: str) -> list[int]:
    """Every point TensorBoard shows for `tag` (duplicates included), by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb, size_guidance={"scalars": 0})
    acc.Reload()
    return sorted(e.step for e in acc.Scalars(tag))


def test_a_resumed_writer_hides_what_the_killed_run_wrote_past_its_checkpoint(tmp_path):
    killed = MetricsLogger(str(tmp_path), True)
    for step in range(1, 7):  # checkpoint at step 4, killed after step 6
        killed.scalars({"train/loss": 1.0 / step}, step)
    killed.close()
    resumed = MetricsLogger(str(tmp_path), True, purge_step=5)
    for step in range(5, 9):
        resumed.scalars({"train/loss": 2.0 / step}, step)
    resumed.close()
    assert _steps(str(tmp_path / "tb"), "train/loss") == list(range(1, 9))
