"""The run folder (docs/folders.md, "Run folder"): where each period's outputs live, and state.json.

<run>/state.json              {"done": [...], "global_step": ..., "period": t, "phase": ...}
<run>/tokenizer/              the run's tokenizer (with the item code tokens)
<run>/base/                   a random-weight backbone built from a named shape
<run>/periods/<t>/config.json the period's resolved configuration and ds_config
<run>/periods/<t>/ds_ckpt/    DeepSpeed checkpoints inside the period
<run>/periods/<t>/adapter/    the exported adapter (PEFT, safetensors)
<run>/periods/<t>/model/      the exported full model (period 0 with model.period0=full)
<run>/periods/<t>/anchor.safetensors   the previous period's LoRA factors (peso, l2)
<run>/periods/<t>/metrics.json evaluation of this period
<run>/periods/<t>/recommendations.jsonl   window t's test users: their top items (evaluation)
<run>/tb/                     TensorBoard
"""

from __future__ import annotations

import json
import os

from data_tools.atomic import atomic_write_json


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
        try:
            with open(self.path("state.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {"done": [], "global_step": 0, "period": None, "phase": "new"}

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
