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

import json
import os
import shutil

from data_tools.atomic import atomic_write_bytes
from data_tools.readback import DamagedFile, read_json


class FinishedWindows:
    """Period `period`'s finished windows in `run`. `model_folders`: the folders whose files the
    evaluated model is loaded from (the period's export, then the frozen earlier adapters it
    adds); `settings`: the evaluation's settings a result depends on (a JSON-able dict)."""

    def __init__(self, run, period: int, model_folders: list[str], settings: dict):
        self.run, self.period, self.model_folders, self.settings = run, period, model_folders, settings
        self.folder = os.path.join(run.period_dir(period), "eval")

    def _path(self, window: int) -> str:
        return os.path.join(self.folder, f"window-{window}.json")

    def key(self, dtype, world_size: int) -> dict:
        """What a window's result depends on besides the data (see the module doc)."""
        files = {}
        for folder in self.model_folders:
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    st = os.stat(path)
                    files[path] = [st.st_size, st.st_mtime_ns]
        key = {"export": files, **self.settings, "dtype": str(dtype), "world_size": world_size}
        return json.loads(json.dumps(key))  # as it reads back from a file

    def saved(self, key: dict, windows: list[int]) -> dict[int, dict]:
        """The window files that hold a result for this key: window -> {"result", "recommendations"?}."""
        out = {}
        for j in windows:
            try:  # a damaged one is evaluated again (it was kept only to save time)
                data = read_json(self._path(j), missing={})
            except DamagedFile:
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
