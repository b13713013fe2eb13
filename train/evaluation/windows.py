"""The windows of a period's evaluation that are already done, kept across a stop request.

At 8B the evaluation of windows 0..t can outlast SLURM's warning before the time limit; the
stopped job is requeued, and its rerun should not evaluate again what it had finished. Rank 0
writes each finished window's result into `periods/<t>/eval/window-<j>.json` (atomically, with the
current window's recommendations), with the key of what it depends on besides the data: the
files of the period's export (and of the frozen earlier adapters it adds), by size and mtime, and
the evaluation's settings. A rerun takes the files whose key is the same; the folder goes once
metrics.json holds everything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from data_tools.atomic import atomic_write_bytes
from train.period.plan import export_dir, frozen_adapter_periods


class FinishedWindows:
    def __init__(self, cfg, run, period: int):
        self.cfg, self.run, self.period = cfg, run, period
        self.folder = os.path.join(run.period_dir(period), "eval")

    def _path(self, window: int) -> str:
        return os.path.join(self.folder, f"window-{window}.json")

    def key(self, dtype, world_size: int) -> dict:
        """What a window's result depends on besides the data (see the module doc)."""
        cfg, run, period = self.cfg, self.run, self.period
        files = {}
        for folder in [export_dir(cfg, run, period)] + [
            run.adapter_dir(t) for t in frozen_adapter_periods(cfg, cfg.method.name, period)
        ]:
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    st = os.stat(path)
                    files[path] = [st.st_size, st.st_mtime_ns]
        key = {
            "export": files,
            "eval": dataclasses.asdict(cfg.eval),
            "data": os.path.abspath(cfg.data.path),
            "eval_batch_size": cfg.data.eval_batch_size,
            "attn_implementation": cfg.model.attn_implementation,
            "temperature": cfg.method.temperature,
            "dtype": str(dtype),
            "world_size": world_size,
        }
        return json.loads(json.dumps(key))  # as it reads back from a file

    def saved(self, key: dict, windows: list[int]) -> dict[int, dict]:
        """The window files that hold a result for this key: window -> {"result", "recommendations"?}."""
        out = {}
        for j in windows:
            try:
                with open(self._path(j)) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            if data.get("key") == key and data.get("window") == j and (j != self.period or "recommendations" in data):
                out[j] = data
        return out

    def save(self, window: int, key: dict, result: dict, recommendations: list | None) -> None:
        """A finished window's result (with the current window's recommendations, every rank's
        lists), atomically."""
        data = {"key": key, "window": window, "result": result}
        if recommendations is not None:
            data["recommendations"] = sorted((r for part in recommendations for r in part), key=lambda r: r["user"])
        os.makedirs(self.folder, exist_ok=True)
        atomic_write_bytes(self._path(window), json.dumps(data).encode())

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
