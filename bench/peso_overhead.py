"""What PESO's proximal term and the cumulative baseline cost per training step.

    python bench/peso_overhead.py [--shape small] [--steps 30] [--device cuda --dtype bf16]

One process, the same model, batch and optimizer; interleaved measurements of
- single: LoRA (+ the code tokens' rows) trained on cross-entropy;
- peso: the same plus the KL proximal term over every LoRA matrix (train/regularizers.py);
- cumulative with k = 1..4 earlier adapters frozen and summed into the forward;
and the disk size of what each method needs to go on after 4 periods (single: the last adapter;
peso: it and its anchor; cumulative: every adapter). Prints one JSON line
(goal: peso <= 1.03x single, flat over periods).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools.help_format import HelpFormatter
from train.config import load_config
from train.model import adapter_state_keys, apply_lora
from train.regularizers import ProximalTerm, attach_frozen_adapters, lora_factors
from train.shapes import SHAPES, shape_config

VOCAB, CODES = 1000, 4 * 256


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(shape: str, frozen_dirs: list[str] | None = None, device: str = "cpu", dtype: str = "fp32"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape_config(shape, VOCAB + CODES, 1, 2, 3)).to(DTYPES[dtype])
    cfg = load_config(None, [f"model.shape={shape}"])
    model = apply_lora(model, cfg, list(range(VOCAB, VOCAB + CODES)), seed=0)
    if frozen_dirs:
        attach_frozen_adapters(model, frozen_dirs)
    return model.to(device)


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so a step's wall time is its real time."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batch(size: int, length: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB + CODES, (size, length), generator=g)
    return ids


def step_time(model, ids, prox, steps: int, warmup: int = 3) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    device = str(ids.device)
    for i in range(warmup + steps):
        synchronize(device)
        t0 = time.perf_counter()
        with prox.collect() if prox else _null():
            logits = model(input_ids=ids, logits_to_keep=6).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, -5:].reshape(-1))
        if prox:
            loss = loss + prox.term()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--shape", default="small", choices=list(SHAPES), help="the random-weight model (train/shapes.py)")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per method")
    ap.add_argument("--batch", type=int, default=16, help="rows per step")
    ap.add_argument("--length", type=int, default=160, help="tokens per row")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu.sh)")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="the model's weights (bf16 on a GPU)")
    a = ap.parse_args()
    ids = batch(a.batch, a.length).to(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        single = build(a.shape, device=a.device, dtype=a.dtype)
        state = {k: p.detach().clone() for k, p in adapter_state_keys(single).items()}
        anchor = {k: v + 0.01 * torch.randn_like(v) for k, v in lora_factors(state).items()}  # on the model's device
        dirs = []
        for k in range(4):
            d = os.path.join(tmp, f"adapter{k}")
            os.makedirs(d)
            save_file(
                {key: (v + 0.01 * k).cpu().contiguous() for key, v in state.items()},
                os.path.join(d, "adapter_model.safetensors"),
            )
            dirs.append(d)
        peso = build(a.shape, device=a.device, dtype=a.dtype)
        prox = ProximalTerm(peso, anchor, "kl", "sum")
        # Interleave, three rounds each, to spread drift of the machine over both.
        single_t, peso_t = [], []
        for _ in range(3):
            single_t.append(step_time(single, ids, None, a.steps))
            peso_t.append(step_time(peso, ids, prox, a.steps))
        cumulative = {}
        for k in range(1, 5):
            cumulative[k] = step_time(build(a.shape, dirs[:k], a.device, a.dtype), ids, None, a.steps)
        adapter_bytes = os.path.getsize(os.path.join(dirs[0], "adapter_model.safetensors"))
        save_file({k: v.cpu().contiguous() for k, v in anchor.items()}, os.path.join(tmp, "anchor.safetensors"))
        anchor_bytes = os.path.getsize(os.path.join(tmp, "anchor.safetensors"))
    s, p = statistics.median(single_t), statistics.median(peso_t)
    print(
        json.dumps(
            {
                "bench": "peso_overhead",
                "shape": a.shape,
                "device": a.device,
                "dtype": a.dtype,
                "batch": a.batch,
                "tokens_per_sample": a.length,
                "single_step_s": round(s, 4),
                "peso_step_s": round(p, 4),
                "ratio_peso_to_single": round(p / s, 4),
                "cumulative_step_s_by_frozen_adapters": {k: round(v, 4) for k, v in cumulative.items()},
                "ratio_cumulative4_to_single": round(cumulative[4] / s, 4),
                # What a method needs to go on after 4 periods: single the last adapter; peso also its
                # anchor (LoRA factors only); cumulative every adapter.
                "needed_mb_after_4_periods": {
                    "single": round(adapter_bytes / 2**20, 3),
                    "peso": round((adapter_bytes + anchor_bytes) / 2**20, 3),
                    "cumulative": round(4 * adapter_bytes / 2**20, 3),
                },
                "threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
