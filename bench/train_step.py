"""Training throughput: tokens per second per rank and MFU, ZeRO-2 against ZeRO-3, and the two
training objectives, side by side.

    python bench/train_step.py [--steps 60] [--nproc 2] [--backbone DIR] [--only-backbone]

CPU (always): the tiny model trained in full (period 0) on 2 ranks with configs/tiny.yaml
(objective: sequence), under ZeRO-2 and under ZeRO-3 (its default persistence threshold), and
under ZeRO-2 with the response objective (one sample per target, same template) with 0 and with
2 DataLoader workers per rank (their data-wait shares side by side), each for
--steps steps of 32 rows, through the real entry point (train/main.py); the figures are
TensorBoard's, averaged over the log points after the first (start-up excluded). The objectives
compare by target tokens per second: how many targets' code tokens the model learns from per
second. MFU on the CPU is against a nominal peak (train/loop/flops.py).
The CPU runs stay on the CPU where there is a GPU too (CUDA_VISIBLE_DEVICES="").
`--backbone DIR` (a converted real model, e.g. `python -m train.model.backbone convert-gguf smollm2 --out
DIR`) adds configs/smollm2.yaml's LoRA period (on the GPU where there is one, one rank per GPU at
most; on a slice of the CDs blocks, 200 users a block, so that its closing validation pass is
short) under ZeRO-3 with DIR as model.path against the tiny shape in the same config (its own
tokenizer, random weights), side by side: step time, tokens/s per rank and peak memory (the
process's RSS on the CPU, allocated GPU memory on a GPU). `--only-backbone`: that comparison alone.
GPU (where one is lent, unless --only-backbone): the shapes of --gpu-shapes (default: 1b alone,
as bench/gpu.sh runs it; 8b only when asked, since building and stepping it takes far longer)
under ZeRO-3 with LoRA, bf16, --gpu-steps steps: tokens/s per GPU, MFU and peak memory.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CDS = os.path.join(os.path.dirname(REPO), "shared", "data", "amazon-cds-blocks")


def dataset(cache: str) -> str:
    """The paper's CDs blocks (real codes) when present, else MovieLens-100K with random codes."""
    from data_tools.convert import ConvertOptions, convert

    out = os.path.join(cache, "cds" if os.path.isdir(CDS) else "ml")
    if os.path.isdir(CDS):
        from data_tools.convert import convert_blocks

        return convert_blocks(CDS, out)
    import random

    from data_tools.examples import movielens_100k
    from data_tools.index.build import import_index

    inter, item = movielens_100k()
    convert(ConvertOptions(format="movielens", reviews=inter, meta=item, out=out, progress=False))
    if not os.path.exists(os.path.join(out, "item_index.json")):
        rng = random.Random(0)
        codes = os.path.join(cache, "codes.json")
        with open(os.path.join(out, "items.jsonl")) as f, open(codes, "w") as g:
            json.dump(
                {
                    json.loads(line)["source_id"]: [f"<{'abcd'[k]}_{rng.randrange(256)}>" for k in range(4)]
                    for line in f
                },
                g,
            )
        import_index(out, codes, collisions="extend")
    return out


def scalars(run: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        values = [e.value for e in acc.Scalars(tag)]
        out[tag] = statistics.mean(values[1:] if len(values) > 1 else values)
    return out


def train(
    data: str, ds: str, run: str, nproc: int, overrides: list[str], config: str = "tiny.yaml", cpu: bool = False
) -> dict:
    """One period through the real entry point; TensorBoard's scalars. `cpu`: hide the GPUs."""
    from launcher.periods import RunSettings, local_command

    overrides = ["eval.every_period=false", "logging.progress=false", *overrides]
    settings = RunSettings(os.path.join(REPO, "configs", config), data, run, ds, overrides)
    cmd = local_command(nproc, settings.train_args())
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    return scalars(run)


def memory(s: dict) -> dict:
    """The peak memory a run logged: train/loop/telemetry.py writes the process's RSS on the CPU and the
    allocated and reserved GPU memory on a GPU."""
    keys = {
        "memory/cpu_max_rss_gib": "max_rss_gib",
        "memory/gpu_max_allocated_gib": "max_allocated_gib",
        "memory/gpu_max_reserved_gib": "max_reserved_gib",
    }
    return {name: round(s[key], 2) for key, name in keys.items() if key in s}


def sliced(data: str, cache: str, users: int = 200) -> str:
    """A slice of the CDs blocks (each block's first `users` users, data_tools.blocks.slice_blocks),
    so that the period's closing validation pass stays short with a 135M-parameter model; `data`
    itself where the blocks are not here."""
    if not os.path.isdir(CDS):
        return data
    from data_tools.blocks import slice_blocks
    from data_tools.convert import convert_blocks

    blocks = slice_blocks(
        CDS, os.path.join(cache, f"cds-{users}-blocks"), users, os.path.join(CDS, "semantic_ids.json")
    )
    return convert_blocks(blocks, os.path.join(cache, f"cds-{users}"))


def backbone_vs_tiny(data: str, backbone: str, tmp: str, nproc: int, steps: int) -> dict:
    """configs/smollm2.yaml's LoRA period under ZeRO-3: the real model against the tiny shape."""
    out, step_s, rows = {"backbone_dataset": os.path.basename(data)}, {}, 16  # rows: per optimizer step
    cuda = torch.cuda.is_available()
    nproc = min(nproc, torch.cuda.device_count()) if cuda else nproc  # one rank per GPU
    for name, model in {
        "backbone": [f"model.path={os.path.abspath(backbone)}"],
        "tiny": ["model.path=null", "model.shape=tiny"],
    }.items():
        s = train(
            data,
            os.path.join(REPO, "ds_configs", "zero3.json"),
            os.path.join(tmp, f"lora-{name}"),
            nproc,
            [
                *model,
                f"schedule.global_batch_size={rows}",
                f"schedule.max_steps={steps}",
                "logging.every_steps=5",
                "checkpoint.every_steps=100000",
            ],
            config="smollm2.yaml",
        )
        step_s[name] = rows / nproc / s["perf/samples_per_s_per_rank"]
        out[f"{'gpu' if cuda else 'cpu'}_zero3_lora_{name}"] = {
            "model": os.path.basename(os.path.normpath(backbone)) if name == "backbone" else "tiny (random weights)",
            "ranks": nproc,
            "step_s": round(step_s[name], 2),
            "input_tokens_per_s_per_rank": round(s["perf/input_tokens_per_s_per_rank"], 1),
            "samples_per_s_per_rank": round(s["perf/samples_per_s_per_rank"], 2),
            **memory(s),
        }
    out["ratio_backbone_to_tiny_step_time"] = round(step_s["backbone"] / step_s["tiny"], 1)
    return out


def main() -> None:
    from data_tools.help_format import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps per CPU variant")
    ap.add_argument("--nproc", type=int, default=2, help="CPU ranks")
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU runs (bench/gpu.sh)")
    ap.add_argument("--backbone", help="a converted real model folder: its LoRA step against the tiny shape's")
    ap.add_argument(
        "--only-backbone",
        action="store_true",
        help="with --backbone: only that comparison (no CPU runs, no GPU shapes)",
    )
    ap.add_argument("--backbone-steps", type=int, default=20, help="steps of each --backbone variant")
    # 1b alone by default: with the 8B shape a run no longer fits bench/gpu.sh's 8 minutes.
    ap.add_argument(
        "--gpu-shapes",
        nargs="*",
        default=["1b"],
        choices=["1b", "8b"],
        help="the shapes measured on a GPU (ZeRO-3, LoRA, bf16 where supported); 8b takes several minutes",
    )
    ap.add_argument("--gpu-steps", type=int, default=30, help="training steps of each GPU shape")
    ap.add_argument(
        "--cache",
        default=os.environ.get("PESO_BENCH_CACHE", "/tmp/peso-bench"),
        help="where the dataset is kept between runs ($PESO_BENCH_CACHE)",
    )
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    data = dataset(a.cache)
    result = {"bench": "train_step", "dataset": os.path.basename(data), "steps": a.steps, "ranks": a.nproc}
    with tempfile.TemporaryDirectory() as tmp:
        cpu = {}
        variants = {
            2: ("zero2", []),
            3: ("zero3", []),
            "response": ("zero2", ["data.objective=response", "data.num_workers=0"]),
            "response_2_workers": ("zero2", ["data.objective=response", "data.num_workers=2"]),
        }
        for key, (stage, extra) in variants.items() if not (a.gpu_only or a.only_backbone) else ():
            s = train(
                data,
                os.path.join(REPO, "ds_configs", f"{stage}.json"),
                os.path.join(tmp, f"run-{key}"),
                a.nproc,
                [f"schedule.max_steps={a.steps}", "logging.every_steps=10", "checkpoint.every_steps=100000", *extra],
                cpu=True,
            )
            cpu[key] = s
            result[f"cpu_{stage}" if isinstance(key, int) else f"cpu_zero2_{key}"] = {
                "input_tokens_per_s_per_rank": round(s["perf/input_tokens_per_s_per_rank"], 1),
                "target_tokens_per_s_per_rank": round(s["perf/target_tokens_per_s_per_rank"], 1),
                "samples_per_s_per_rank": round(s["perf/samples_per_s_per_rank"], 2),
                "tflops_per_rank": round(s["perf/tflops_per_rank"], 4),
                "mfu_cpu_nominal": round(s["perf/mfu_cpu_nominal"], 4),
                "data_wait_share": round(s["perf/data_wait_share"], 4),
                **memory(s),
            }
        if cpu:
            result["ratio_zero3_to_zero2_tokens_per_s"] = round(
                cpu[3]["perf/input_tokens_per_s_per_rank"] / cpu[2]["perf/input_tokens_per_s_per_rank"], 3
            )
            result["ratio_sequence_to_response_target_tokens_per_s"] = round(
                cpu[2]["perf/target_tokens_per_s_per_rank"] / cpu["response"]["perf/target_tokens_per_s_per_rank"], 3
            )
            result["ratio_response_2_workers_to_0_samples_per_s"] = round(
                cpu["response_2_workers"]["perf/samples_per_s_per_rank"]
                / cpu["response"]["perf/samples_per_s_per_rank"],
                3,
            )
        if a.backbone and not a.gpu_only:
            result.update(backbone_vs_tiny(sliced(data, a.cache), a.backbone, tmp, a.nproc, a.backbone_steps))
        if torch.cuda.is_available() and not a.only_backbone:
            for shape in a.gpu_shapes:
                s = train(
                    data,
                    os.path.join(REPO, "ds_configs", "zero3.json"),
                    os.path.join(tmp, shape),
                    torch.cuda.device_count(),
                    [
                        f"model.shape={shape}",
                        "model.period0=lora",
                        "model.gradient_checkpointing=true",
                        f"schedule.max_steps={a.gpu_steps}",
                        "logging.every_steps=5",
                        "checkpoint.every_steps=100000",
                        "data.micro_batch_size=8",
                        f"schedule.global_batch_size={8 * torch.cuda.device_count()}",
                    ],
                )
                result[f"gpu_{shape}_zero3_lora"] = {
                    "steps": a.gpu_steps,
                    "input_tokens_per_s_per_gpu": round(s["perf/input_tokens_per_s_per_rank"], 1),
                    "mfu": round(s.get("perf/mfu", 0.0), 4),
                    **memory(s),
                }
        elif not torch.cuda.is_available():
            result["gpu"] = "no GPU here: the 1B/8B figures need a GPU machine"
    result.update(machine=f"{platform.machine()} {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
