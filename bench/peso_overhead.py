"""What PESO's proximal term and the cumulative baseline cost per training step, on the path
training takes.

    python bench/peso_overhead.py [--shape small] [--zero 2|3] [--dtype fp32|bf16] [--steps 10 --rounds 3]
    python bench/peso_overhead.py --shape 1b --device cuda --dtype bf16 --steps 10 --batch 8 --length 256 \
        --max-seconds 80                                                    (bench/gpu.sh)

One process, a world of one (train/dist/strategy.py sets it up for a plain `python` run). Each method
gets a DeepSpeed engine built the way train/period/recipe.py builds a period's: ds_configs/zero{2,3}.json
filled by fill_ds_config (gradient accumulation 1, so every micro-step is an optimizer step), a
random-weight shape (train/model/shapes.py; built on the device in the compute dtype as
build_shape_backbone does; under ZeRO-3 inside zero.Init, where `from_pretrained` loads), LoRA and
the code-token rows (apply_lora), every parameter in the compute dtype (hold_trainable_in), then the
method as make_term (train/methods/proximal.py) sets it up (before `deepspeed.initialize`): peso's anchor is written as
the previous period's adapter (adapter_model.safetensors, by export_adapter), loaded from that file
on the CPU and handed to ProximalTerm(..., device=strategy.device). Each timed step is the real
`Trainer._micro_step` (forward inside `regularizer.collect()`, lm_loss, the proximal term, the one
all-reduce read-back, engine.backward and engine.step) on a response-objective batch made by
train/loop/data.py's collate (a prompt, then 4 code tokens and EOS as the labels). Each method has its
own engine, with the same weights at the start:
- single: no regularizer;
- peso: the proximal term (train/methods/proximal.py, ProximalTerm);
- old: HEAD ce6b008's hooks (`HeadProximalTerm` below, kept for comparison): the anchor's targets on
  the CPU and copied to the device in every hook call (a no-op on a CPU run), and the term computed
  in every forward, no-grad ones included (`--no-old` leaves it out).
Rounds of `--steps` micro-steps of each in turn (single, peso, old, single, ...) spread the
machine's drift over all of them; each round also times `--steps` batches of each one's evaluation
forward (the real `Trainer.validate`: no_grad, eval mode, what validation and beam search run). The
figures are medians over all rounds. `first_proximal` is each engine's term at its first step (the
same weights there: old and new must agree). The aten operations of one micro-step and of one
evaluation batch, counted with a dispatch mode, and the transfers between devices among them, show
the same without the noise of a shared machine (on a GPU the old hooks' copies appear as transfers;
on the CPU they are no-ops). Then the cumulative method with k = 1..4 earlier adapters frozen and
summed into the forward (attach_frozen_adapters; one engine each, freed before the next, its steps
interleaved with single's as above; `--no-cumulative` leaves it out, `--max-seconds` the engines
that would not end in time), and the disk size of what each method needs to go on after 4 periods
(single: the last adapter; peso: it and its anchor; cumulative: every adapter). Prints one JSON line
(goals at the 1B shape on a GPU: peso <= 1.03x single; the evaluation forward 1.0x).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
import warnings

import psutil
import torch
from safetensors.torch import load_file, save, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools.help_format import HelpFormatter
from data_tools.index.prompt import IGNORE
from train.common.config import load_config
from train.dist.ds_config import fill_ds_config, load_ds_config, resolve_dtype
from train.dist.params import is_partitioned
from train.dist.stop import StopRequest
from train.dist.strategy import DeepSpeedStrategy
from train.loop.data import collate
from train.loop.schedule import make_optimizer, make_scheduler
from train.loop.trainer import LoopSettings, Reporting, Trainer, TrainingState
from train.methods.proximal import ProximalTerm
from train.model.addons.frozen_sum import attach_frozen_adapters
from train.model.build import DTYPES, apply_lora, hold_trainable_in, param_groups
from train.model.export import export_adapter
from train.model.lora import lora_factors
from train.model.shapes import SHAPES, shape_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD, BOS, EOS = 0, 1, 2
VOCAB, CODES = 1000, 4 * 256  # text tokens, then the item code tokens (4 levels of 256)
CODE_IDS = list(range(VOCAB, VOCAB + CODES))
TARGETS = 5  # the response objective's labels: 4 codes and EOS
TOTAL_STEPS = 100_000  # the scheduler's horizon: far beyond what is timed
# DeepSpeed's ZeRO collectives warn at every call on this torch (a FutureWarning per step).
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class HeadProximalTerm(ProximalTerm):
    """The hooks as HEAD ce6b008's train/methods/regularizers.py had them (for comparison only): the
    targets stay on the CPU and are copied to the weight's device in every hook call, and each
    matrix's term is computed in its hook in every forward (validation, beam search and
    recomputation too), kept only while collecting."""

    def __init__(self, model, anchor, kind, reduce, device=None):
        flat = {k: v.float().reshape(-1) for k, v in anchor.items()}  # on the CPU
        self.old_targets = {k: torch.log_softmax(v, 0) if kind == "kl" else v for k, v in flat.items()}
        self.old_terms = []
        super().__init__(model, anchor, kind, reduce)

    def _hook(self, key: str):
        target = self.old_targets[key]

        def hook(module, inputs, output):
            weight = module.weight
            if is_partitioned(weight):
                raise RuntimeError(
                    "a LoRA weight is partitioned inside its own forward; the proximal term would be wrong"
                )
            entries = weight.float().reshape(-1)  # vec M, in fp32
            reference = target.to(entries.device)
            if self.kind == "kl":
                logp = torch.log_softmax(entries, 0)
                distance = (logp.exp() * (logp - reference)).sum()
            else:
                distance = (entries - reference).pow(2).sum()
            if self.collecting:
                self.old_terms.append(distance)

        return hook

    @contextlib.contextmanager
    def collect(self):
        self.old_terms = []
        with super().collect():
            yield

    def distances(self) -> torch.Tensor:
        return torch.stack(self.old_terms)


class OpCount(TorchDispatchMode):
    """The aten operations run inside the block, and how many of them move a tensor between
    devices (on a GPU: host-to-device copies such as the old hooks' per-call target copy)."""

    COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)

    def __init__(self):
        super().__init__()
        self.ops = self.transfers = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if func in self.COPIES:
            src, dst = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
            self.transfers += int(src.device != dst.device)
        return out


class Batches:
    """The `data` a Trainer's validation reads: the same batch `count` times, with the time each
    was handed out (after the device's queued work), so `Trainer.validate` is timed per batch."""

    def __init__(self, batch: dict, count: int, cuda: bool):
        self.batch, self.count, self.cuda = batch, count, cuda
        self.marks: list[float] = []

    def valid(self):
        self.marks = []
        for _ in range(self.count):
            synchronize(self.cuda)
            self.marks.append(time.perf_counter())
            yield self.batch


def process_seconds() -> float:
    """Seconds since this process started (its imports included)."""
    return time.time() - psutil.Process().create_time()


def synchronize(cuda: bool) -> None:
    """Wait for the GPU's queued work, so a step's wall time is its real time."""
    if cuda:
        torch.cuda.synchronize()


def make_batch(size: int, length: int) -> dict:
    """A response-objective micro-batch through train/loop/data.py's collate: BOS, a prompt of text
    tokens, then an item's 4 code tokens and EOS, which are the labels."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for _ in range(size):
        prompt = torch.randint(3, VOCAB, (length - 1 - TARGETS,), generator=g).tolist()
        codes = [VOCAB + 256 * level + int(torch.randint(0, 256, (1,), generator=g)) for level in range(4)]
        examples.append(
            {
                "input_ids": [BOS, *prompt, *codes, EOS],
                "labels": [IGNORE] * (length - TARGETS) + [*codes, EOS],
            }
        )
    return collate(examples, PAD)


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        overrides = [
            f"model.shape={a.shape}",
            f"model.dtype={a.dtype}",
            "method.name=peso",
            "method.lam=2.0",  # configs/paper.yaml's
            f"data.micro_batch_size={a.batch}",
            f"schedule.global_batch_size={a.batch}",  # one rank: accumulation 1
        ]
        self.cfg = load_config(None, overrides)
        self.strategy = DeepSpeedStrategy()
        if a.device and torch.device(a.device).type != self.strategy.device.type:
            raise SystemExit(f"--device {a.device}: this process trains on {self.strategy.device} (the strategy's)")
        self.dtype = resolve_dtype(self.cfg, self.strategy.cuda, self.strategy.bf16_supported)
        self.template = load_ds_config(os.path.join(REPO, "ds_configs", f"zero{a.zero}.json"))
        self.config = shape_config(a.shape, VOCAB + CODES, BOS, EOS, PAD)

    def engine(self, method: str, anchor_dir: str | None = None, frozen_dirs: list[str] | None = None) -> Trainer:
        """A Trainer around a fresh engine, set up as train/period/recipe.py's _model and _engine do."""
        cfg, strategy, config = self.cfg, self.strategy, self.config
        ds = fill_ds_config(
            self.template,
            cfg,
            strategy.world_size,
            config.hidden_size,
            self.dtype,
            cfg.optim.lr,
            lora_matrix=cfg.lora.r * max(config.hidden_size, config.intermediate_size),
            ranks_per_node=strategy.ranks_per_node,
        )
        strategy.use_ds_config(ds)  # under ZeRO-3, _from_config builds inside zero.Init
        torch.manual_seed(cfg.model.seed)
        where = contextlib.nullcontext() if self.a.zero == 3 else torch.device(strategy.device)
        with where:
            model = LlamaForCausalLM._from_config(
                config, dtype=DTYPES[self.dtype], attn_implementation=cfg.model.attn_implementation
            )
        model.config.use_cache = False  # as load_backbone
        model = apply_lora(model, cfg.lora, CODE_IDS, seed=cfg.model.seed + 1)
        hold_trainable_in(model, self.dtype)
        regularizer = None
        if frozen_dirs:
            attach_frozen_adapters(model, frozen_dirs)
        if anchor_dir:  # as make_term: the previous adapter's LoRA factors, read on the CPU
            anchor = lora_factors(load_file(os.path.join(anchor_dir, "adapter_model.safetensors")))
            self.anchor_bytes = len(save(anchor))  # what make_term writes as the period's anchor
            term = ProximalTerm if method == "peso" else HeadProximalTerm
            regularizer = term(model, anchor, "kl", cfg.method.reduce, device=strategy.device)
            self.lora_matrices = len(regularizer.handles)
        engine = strategy.initialize(
            model,
            param_groups(model, cfg.optim.weight_decay),
            lambda g: make_optimizer(g, cfg.optim, cfg.optim.lr, strategy.cuda),
            lambda opt: make_scheduler(opt, cfg.schedule, TOTAL_STEPS),
        )
        engine.train()  # as Trainer.fit
        trainer = Trainer(
            settings=LoopSettings.of(
                cfg, types.SimpleNamespace(period=1, epochs=1), total_steps=TOTAL_STEPS, step_offset=0
            ),
            strategy=strategy,
            engine=engine,
            data=Batches(self.batch, self.a.warmup + self.a.steps, strategy.cuda),
            checkpointer=None,
            export=None,
            reporting=Reporting(logger=None, flops=None, peak_flops=(0.0, "none")),
            regularizer=regularizer,
            stop=StopRequest(self.strategy),
        )
        trainer.micro_index = 0
        return trainer

    def train_times(self, trainer: Trainer, count: int) -> list[float]:
        """Seconds of each of `count` calls of `Trainer._micro_step` (each an optimizer step)."""
        times = []
        for _ in range(count):
            synchronize(self.strategy.cuda)
            t0 = time.perf_counter()
            micro = trainer._micro_step(self.batch, trainer.micro_index)
            synchronize(self.strategy.cuda)
            times.append(time.perf_counter() - t0)
            if micro.skipped:
                raise RuntimeError("a non-finite loss in the benchmark")
            if trainer.micro_index == 0:  # the same weights in every engine then
                trainer.first_proximal = micro.proximal
            trainer.micro_index += 1
        return times

    def eval_times(self, trainer: Trainer) -> list[float]:
        """Seconds per batch of the real `Trainer.validate` (no_grad, eval mode), after its first
        `--warmup` batches."""
        trainer.validate(TrainingState())
        synchronize(self.strategy.cuda)
        marks = [*trainer.data.marks, time.perf_counter()]
        return [b - a for a, b in zip(marks[self.a.warmup :], marks[self.a.warmup + 1 :])]

    def count_ops(self, trainer: Trainer) -> dict:
        """The aten operations of one micro-step and of one evaluation batch, and the transfers
        between devices among them: the same for every run of the same model, unlike times."""
        with OpCount() as train:
            trainer._micro_step(self.batch, trainer.micro_index)
        trainer.micro_index += 1
        trainer.data.count, count = 1, trainer.data.count
        with OpCount() as evaluation:
            trainer.validate(TrainingState())
        trainer.data.count = count
        return {"train": (train.ops, train.transfers), "eval": (evaluation.ops, evaluation.transfers)}

    def free(self, trainer: Trainer) -> None:
        trainer.engine.destroy()
        if self.strategy.engine is trainer.engine:
            self.strategy.engine = None
        trainer.engine = trainer.regularizer = None
        gc.collect()
        if self.strategy.cuda:
            torch.cuda.empty_cache()

    def run(self) -> dict:
        a, strategy = self.a, self.strategy
        self.batch = make_batch(a.batch, a.length)
        started = time.perf_counter()
        methods = ["single", "peso"] + ([] if a.no_old else ["old"])
        with tempfile.TemporaryDirectory() as tmp:
            trainers = {"single": self.engine("single")}
            # Four earlier periods' adapters, written by the real export (the fresh adapter, moved
            # a little each period so the anchor is not the start): the last is peso's anchor.
            export_adapter(strategy, trainers["single"].engine.module, os.path.join(tmp, "export"))
            state = load_file(os.path.join(tmp, "export", "adapter_model.safetensors"))
            g = torch.Generator().manual_seed(2)
            dirs = []
            for k in range(4):
                d = os.path.join(tmp, f"period{k}")
                os.makedirs(d)
                moved = {
                    key: (v.float() + 0.01 * (k + 1) * torch.randn(v.shape, generator=g)).to(v.dtype)
                    for key, v in state.items()
                }
                save_file(moved, os.path.join(d, "adapter_model.safetensors"))
                dirs.append(d)
            adapter_bytes = os.path.getsize(os.path.join(dirs[-1], "adapter_model.safetensors"))
            for name in methods[1:]:
                trainers[name] = self.engine(name, anchor_dir=dirs[-1])
            built = time.perf_counter() - started
            # Interleaved rounds of a few steps spread the machine's drift over every method.
            train_t = {name: [] for name in methods}
            eval_t = {name: [] for name in methods}
            for name in methods:
                self.train_times(trainers[name], a.warmup)
            for _ in range(a.rounds):
                for name in methods:
                    train_t[name] += self.train_times(trainers[name], a.steps)
                    eval_t[name] += self.eval_times(trainers[name])
            proximal = {name: trainers[name].first_proximal for name in methods}
            ops = {name: self.count_ops(trainers[name]) for name in methods}
            for name in methods[1:]:
                self.free(trainers.pop(name))
            single = trainers.pop("single")  # kept: the cumulative engines are timed against it
            cumulative, cumulative_ratio, cut = {}, {}, None
            # One engine more per k: a guess of its time first, so that a run with a time limit
            # (bench/gpu.sh gives 90 s) still prints its line.
            guess = (
                built / len(methods) + (a.warmup + 2 * a.cumulative_steps) * statistics.median(train_t["single"]) * 1.2
            )
            for k in range(1, 0 if a.no_cumulative else 5):
                if a.max_seconds and process_seconds() + guess > a.max_seconds:
                    cut = f"k >= {k} left out: past --max-seconds {a.max_seconds}"
                    break
                t0 = time.perf_counter()
                trainer = self.engine("cumulative_all", frozen_dirs=dirs[:k])
                self.train_times(trainer, a.warmup)
                mine, theirs = [], []  # interleaved with single's steps, as above
                while len(mine) < a.cumulative_steps:
                    mine += self.train_times(trainer, min(a.steps, a.cumulative_steps - len(mine)))
                    theirs += self.train_times(single, a.steps)
                cumulative[k] = statistics.median(mine)
                cumulative_ratio[k] = cumulative[k] / statistics.median(theirs)
                self.free(trainer)
                guess = 1.1 * (time.perf_counter() - t0)
            self.free(single)
        train_s = {name: statistics.median(t) for name, t in train_t.items()}
        eval_s = {name: statistics.median(t) for name, t in eval_t.items()}
        s, e = train_s["single"], eval_s["single"]
        out = {
            "bench": "peso_overhead",
            "path": "DeepSpeedStrategy engine, Trainer._micro_step / Trainer.validate",
            "shape": a.shape,
            "device": str(strategy.device),
            "dtype": self.dtype,
            "zero_stage": strategy.zero_stage,
            "batch": a.batch,
            "tokens_per_sample": a.length,
            "labels_per_sample": TARGETS,
            "steps_x_rounds": f"{a.steps}x{a.rounds}",
            "lora_matrices": self.lora_matrices,
            "single_step_s": round(s, 4),
            "peso_step_s": round(train_s["peso"], 4),
            "ratio_peso_to_single": round(train_s["peso"] / s, 4),
            "eval_forward_s": {name: round(v, 4) for name, v in eval_s.items()},
            "ratio_eval_peso_to_single": round(eval_s["peso"] / e, 4),
            "first_proximal": {name: round(proximal[name], 7) for name in methods[1:]},
            # aten operations, and device transfers among them, of one micro-step and one eval batch
            "ops_per_train_step": {name: ops[name]["train"][0] for name in methods},
            "ops_per_eval_forward": {name: ops[name]["eval"][0] for name in methods},
            "transfers_per_train_step": {name: ops[name]["train"][1] for name in methods},
            "transfers_per_eval_forward": {name: ops[name]["eval"][1] for name in methods},
        }
        if "old" in train_s:
            out |= {
                "old_peso_step_s": round(train_s["old"], 4),
                "ratio_old_peso_to_single": round(train_s["old"] / s, 4),
                "ratio_eval_old_to_single": round(eval_s["old"] / e, 4),
            }
        if cumulative:
            out["cumulative_step_s_by_frozen_adapters"] = {k: round(v, 4) for k, v in cumulative.items()}
            # each against single's steps interleaved with its own
            out["ratio_cumulative_to_single_by_frozen_adapters"] = {k: round(v, 4) for k, v in cumulative_ratio.items()}
        if 4 in cumulative:
            out["ratio_cumulative4_to_single"] = round(cumulative_ratio[4], 4)
        if cut:
            out["cumulative_cut"] = cut
        out |= {
            # What a method needs to go on after 4 periods: single the last adapter; peso also its
            # anchor (LoRA factors only); cumulative every adapter.
            "needed_mb_after_4_periods": {
                "single": round(adapter_bytes / 2**20, 3),
                "peso": round((adapter_bytes + self.anchor_bytes) / 2**20, 3),
                "cumulative": round(4 * adapter_bytes / 2**20, 3),
            },
            "build_s": round(built, 1),
            "total_s": round(process_seconds(), 1),
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores"
            + (f", {torch.cuda.get_device_name(strategy.device)}" if strategy.cuda else ""),
            "date": time.strftime("%Y-%m-%d"),
        }
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--shape", default="small", choices=list(SHAPES), help="the random-weight model (train/model/shapes.py)"
    )
    ap.add_argument("--zero", type=int, default=2, choices=(2, 3), help="ds_configs/zero{2,3}.json")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the compute dtype (bf16 on a GPU)")
    ap.add_argument(
        "--steps", type=int, default=10, help="timed micro-steps (and validation batches) per method and round"
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds (single, peso, old, single, ...); medians over all"
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed micro-steps of each engine before the rounds, and untimed batches opening each validation",
    )
    ap.add_argument(
        "--cumulative-steps",
        type=int,
        default=10,
        help="timed micro-steps per cumulative engine (and of single beside)",
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=0,
        help="leave out the cumulative engines that would end the process after this many seconds (bench/gpu.sh: "
        "80 of its 90); 0: no limit",
    )
    ap.add_argument("--batch", type=int, default=16, help="rows per micro-batch")
    ap.add_argument("--length", type=int, default=160, help="tokens per row")
    ap.add_argument(
        "--device", default=None, help="cpu or cuda: only checked; the device is the strategy's (cuda:0 on a GPU)"
    )
    ap.add_argument("--no-old", action="store_true", help="leave out HEAD ce6b008's hooks (the old path)")
    ap.add_argument("--no-cumulative", action="store_true", help="leave out the cumulative method")
    a = ap.parse_args()
    if a.length <= TARGETS + 1:
        ap.error(f"--length must exceed {TARGETS + 1}")
    bench = Bench(a)
    print(json.dumps(bench.run()), flush=True)
    bench.strategy.close()


if __name__ == "__main__":
    main()
