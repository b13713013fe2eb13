"""What a run reports to TensorBoard (rank 0), in torchtitan's spirit: loss and its parts,
learning rate, gradient norm, throughput (tokens and samples per second per rank), TFLOPs and
MFU, memory, and the share of time spent waiting for data.

Scalars go under `<run>/tb/` with a step that keeps counting across periods, so the whole
continual run reads as one curve; each period's first step is marked in the `period` scalar.
A resumed period hides the points its killed run wrote after the checkpoint it resumes from
(`purge_step`), so every step has exactly one point.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import time

import torch


def memory_stats(cuda: bool) -> dict:
    if cuda:
        return {
            "memory/gpu_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "memory/gpu_max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    return {"memory/cpu_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Throughput:
    """Accumulates work between two log points (per rank)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.data_wait = 0.0
        self.input_tokens = self.target_tokens = self.samples = 0
        self.flops = 0.0

    def add(self, input_tokens: int, target_tokens: int, samples: int, flops: float, data_wait: float):
        self.input_tokens += input_tokens
        self.target_tokens += target_tokens
        self.samples += samples
        self.flops += flops
        self.data_wait += data_wait

    def report(self, peak_flops: float, peak_label: str) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        mfu_key = "perf/mfu_cpu_nominal" if peak_label == "cpu_nominal" else "perf/mfu"
        out = {
            "perf/input_tokens_per_s_per_rank": self.input_tokens / dt,
            "perf/target_tokens_per_s_per_rank": self.target_tokens / dt,
            "perf/samples_per_s_per_rank": self.samples / dt,
            "perf/tflops_per_rank": self.flops / dt / 1e12,
            "perf/data_wait_share": self.data_wait / dt,
        }
        if peak_flops > 0:
            out[mfu_key] = self.flops / dt / peak_flops
        return out


def duration(seconds: float) -> str:
    """1:02:03 (hours:minutes:seconds)."""
    return str(datetime.timedelta(seconds=round(seconds)))


class Pace:
    """Elapsed time and the time left of a job of `total` units, from the pace of the units done
    in this process (a resumed period measures its own pace, not the time before the restart)."""

    def __init__(self, done: int, total: int):
        self.t0 = time.perf_counter()
        self.start, self.total = done, total

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self, done: int) -> str:
        elapsed = self.elapsed()
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        left = duration((self.total - done) / rate) if rate > 0 else "unknown"
        return f"elapsed {duration(elapsed)}, ETA {left}"


class MetricsLogger:
    """TensorBoard on rank 0; a no-op elsewhere.

    `purge_step`: the first step this process writes; TensorBoard hides every point at or after
    it that earlier processes wrote (a resumed period's killed run got past its checkpoint)."""

    def __init__(self, run_dir: str, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)
        # On disk now: a killed run keeps every point up to its checkpoint, which its resumed
        # run does not write again (the writer's buffer would otherwise lose the last minutes).
        self.writer.flush()

    def text(self, tag: str, payload: dict, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, "```\n" + json.dumps(payload, indent=1, default=str) + "\n```", step)

    def hparams(self, flat: dict, metrics: dict) -> None:
        if self.writer is not None:
            clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}
            self.writer.add_hparams(clean, metrics, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
