"""The run folder (docs/folders.md, "Run folder"): where each period's outputs live, and state.json.

<run>/state.json              {"done": [...], "global_step": ..., "period": t, "phase": ...}
<run>/tokenizer/              the run's tokenizer (with the item code tokens)
<run>/base/                   a random-weight backbone built from a named shape
<run>/periods/<t>/config.json the period's resolved configuration and ds_config
<run>/periods/<t>/ds_ckpt/    DeepSpeed checkpoints inside the period
<run>/periods/<t>/adapter/    the exported adapter (PEFT, safetensors)
<run>/periods/<t>/model/      the exported full model (period 0 with model.period0=full)
<run>/periods/<t>/anchor.safetensors   the previous period's LoRA factors (peso, l2; method.pull)
<run>/periods/<t>/metrics.json evaluation of this period
<run>/periods/<t>/recommendations.jsonl   window t's test users: their top items (evaluation)
<run>/tb/                     TensorBoard

<run>/periods/<t>/window.json  the fingerprint of the dataset window the period trains on

A period records the fingerprint of its window as it starts (data_tools.dataset.window_fingerprint:
a hash of its shards' records and sha256); a rerun on a dataset whose window changed under a
period stops (`check_windows`) instead of going on. It is a file of its own, not a key of
state.json, whose time of change tells the launcher whether a period stopped on a signal.
"""

from __future__ import annotations

import json
import os

from data_tools.atomic import atomic_write_json
from data_tools.dataset import window_fingerprint
from data_tools.readback import DamagedFile, check_fields, read_json

STATE_FIELDS = {"done": list, "phase": str}
STATE_OPTIONAL = {"global_step": int, "period": (int, type(None))}
PHASES = ("new", "training", "evaluating", "stopped", "done")


class DatasetChanged(ValueError):
    """A window of the dataset is not the one a period of the run trained on (one line)."""


class RunFolder:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def path(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    def period_dir(self, t: int) -> str:
        return self.path("periods", str(t))

    def adapter_dir(self, t: int) -> str:
        return os.path.join(self.period_dir(t), "adapter")

    def model_dir(self, t: int) -> str:
        return os.path.join(self.period_dir(t), "model")

    def ckpt_dir(self, t: int) -> str:
        return os.path.join(self.period_dir(t), "ds_ckpt")

    def anchor_path(self, t: int) -> str:
        return os.path.join(self.period_dir(t), "anchor.safetensors")

    def metrics_path(self, t: int) -> str:
        return os.path.join(self.period_dir(t), "metrics.json")

    def recommendations_path(self, t: int) -> str:
        return os.path.join(self.period_dir(t), "recommendations.jsonl")

    @property
    def tokenizer_dir(self) -> str:
        return self.path("tokenizer")

    @property
    def base_dir(self) -> str:
        return self.path("base")

    # ---- state.json ---------------------------------------------------------------------------

    def state(self) -> dict:
        """state.json (a missing file: a new run); a DamagedFile if it is cut short or hand-edited
        into something else, whose line says what to write there instead."""
        try:
            state = self._read_state(self.path("state.json"))
        except DamagedFile as e:  # what to write instead is looked up only now
            raise DamagedFile(f"{e}; {self._state_remedy()}") from None
        if state is None:
            return {"done": [], "global_step": 0, "period": None, "phase": "new"}
        return state

    @staticmethod
    def _read_state(path: str) -> dict | None:
        how = {"what": "the run's state"}
        state = read_json(path, **how, missing=None, fields=STATE_FIELDS)
        if state is None:
            return None
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in state["done"]):
            raise DamagedFile(path, f"has {state['done']!r:.60} as 'done', not a list of periods (hand-edited?)", **how)
        check_fields(state, {k: v for k, v in STATE_OPTIONAL.items() if k in state}, path, **how)
        if state["phase"] not in PHASES:
            raise DamagedFile(path, f"has phase {state['phase']!r:.30}, not one of {', '.join(PHASES)}", **how)
        return state

    def _state_remedy(self) -> str:
        """What state.json should hold, as far as the periods' own files tell: each finished
        period has its train_summary.json (with its steps)."""
        done, steps = [], 0
        periods = self.path("periods")
        for name in (
            sorted(os.listdir(periods), key=lambda n: int(n) if n.isdigit() else -1) if os.path.isdir(periods) else ()
        ):
            try:
                summary = read_json(os.path.join(periods, name, "train_summary.json"), fields={"steps": int})
            except DamagedFile:
                continue
            if name.isdigit():
                done.append(int(name))
                steps += summary["steps"]
        guess = {
            "done": done,
            "global_step": steps,
            "period": done[-1] if done else None,
            "phase": "done" if done else "new",
        }
        return (
            f"write it again by hand; by the periods' train_summary.json files it holds {json.dumps(guess)} "
            "(a period that was under way resumes from its checkpoint)"
        )

    def save_state(self, **changes) -> dict:
        state = self.state()
        state.update(changes)
        atomic_write_json(self.path("state.json"), state)
        return state

    def next_period(self, n_windows: int) -> int:
        done = set(self.state()["done"])
        for t in range(n_windows):
            if t not in done:
                return t
        raise ValueError(f"every period of this run is done ({n_windows} windows); nothing to train")

    # ---- what each period trained on --------------------------------------------------------

    def window_record_path(self, t: int) -> str:
        return os.path.join(self.period_dir(t), "window.json")

    def record_window(self, period: int, manifest: dict, data: str) -> None:
        """Keep the fingerprint of the window `period` trains on (rank 0, as the period starts)."""
        record = {"window": period, "fingerprint": window_fingerprint(manifest, period), "data": os.path.abspath(data)}
        if self.recorded_windows().get(period) != record["fingerprint"]:
            atomic_write_json(self.window_record_path(period), record)

    def recorded_windows(self) -> dict[int, str]:
        """period -> the fingerprint of the window it trained on, for each period that recorded one."""
        out = {}
        periods = self.path("periods")
        for name in os.listdir(periods) if os.path.isdir(periods) else ():
            if name.isdigit():
                path = self.window_record_path(int(name))
                record = read_json(
                    path,
                    what="the record of the dataset window a period trained on",
                    remedy=f"delete it to go on without checking period {name}'s window (a period records its "
                    "window again as it starts)",
                    missing=None,
                    fields={"fingerprint": str},
                )
                if record is not None:
                    out[int(name)] = record["fingerprint"]
        return out

    def check_windows(self, manifest: dict, data: str, restart: bool = False) -> None:
        """Raise DatasetChanged if a window that a period of this run trained on (finished, or
        started and to be resumed) is gone from the dataset or differs from what it was then.
        `restart` (--restart-period): a period that started but did not finish trains again from
        its start, so its window may have changed."""
        done = set(self.state()["done"])
        recorded = self.recorded_windows()
        n = len(manifest["windows"])
        for t in sorted(recorded):
            finished = t in done
            if restart and not finished:
                continue
            if t < n and window_fingerprint(manifest, t) == recorded[t]:
                continue
            if finished:
                advice = (
                    "a finished period never trains again: put back the dataset it trained on, or train on "
                    "this one in a new run folder"
                )
            else:
                advice = "add --restart-period to train it from its start on the new window, or put back the dataset"
            state = "finished" if finished else "started"
            if t >= n:
                raise DatasetChanged(
                    f"window {t} is gone from {data} (it has {n} windows), but period {t} of {self.root} {state} "
                    f"on it; {advice}"
                )
            raise DatasetChanged(
                f"window {t} of {data} has changed since period {t} of {self.root} {state} on it (its shards' "
                f"hashes differ); {advice}"
            )
