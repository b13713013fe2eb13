"""One period as a recipe (in torchtune's shape): `run()` is `setup()` (distributed set-up,
vocabulary, model and its add-ons, data, DeepSpeed engine, the method's term, the trainer and the
evaluator), then `fit_and_evaluate()` (train, resuming from a checkpoint, the best epoch
exported; the export evaluated on windows 0..t; `finish()`: the period's summary and state.json)
or, with --eval_only, `evaluate_export()`; and always `close()`. What the period does was decided
before any rank trains: its plan (train/period/plan.py).
"""

from __future__ import annotations

import logging
import math
import os
import shutil

from data_tools.atomic import atomic_write_json
from data_tools.readback import load_safetensors
from train.common.config import accumulation_steps
from train.common.exit_codes import EXIT_REQUEUE
from train.common.logs import configure_logging
from train.dist.checkpoint import Checkpointer
from train.dist.ds_config import fill_ds_config, resolve_dtype
from train.dist.params import whole_numel
from train.dist.stop import StopRequest, StopRequested
from train.dist.strategy import DeepSpeedStrategy
from train.evaluation.evaluator import EvalOptions, Evaluator
from train.loop.data import WindowData, prepare_sequence_chunks, sequence_chunks_dir
from train.loop.flops import FlopCounter, device_peak_flops
from train.loop.schedule import make_optimizer, make_scheduler
from train.loop.telemetry import MetricsLogger
from train.loop.trainer import LoopSettings, Reporting, Trainer, TrainingState
from train.methods.proximal import make_term, relative_distance
from train.model import addons
from train.model.build import (
    apply_lora,
    build_shape_backbone,
    hidden_size,
    hold_trainable_in,
    largest_lora_matrix,
    load_adapter_weights,
    load_backbone,
    load_full_weights,
    param_groups,
)
from train.model.export import export_adapter, export_full_model
from train.model.vocab import load_vocab
from train.period.inputs import check_rank_share
from train.period.plan import PeriodPlan

log = logging.getLogger(__name__)


class PeriodRecipe:
    """One period of a run folder, as its plan says: `run()` sets up, then trains and evaluates
    (or, with `plan.eval_only`, evaluates the period's export again) and returns the process's
    exit code."""

    def __init__(self, cfg, ds_template: dict, manifest: dict, run, plan: PeriodPlan):
        self.cfg, self.ds_template, self.manifest, self.run_folder, self.plan = cfg, ds_template, manifest, run, plan

    def run(self) -> int:
        """0, or EXIT_REQUEUE after a checkpoint on a signal."""
        ended = False
        try:
            self.setup()
            code = self.evaluate_export() if self.plan.eval_only else self.fit_and_evaluate()
            ended = True
            return code
        finally:
            self.close(ended)

    # ---- set-up ----------------------------------------------------------------------------------

    def setup(self) -> None:
        self._distributed()
        self.vocab = load_vocab(self.cfg, self.run_folder, self.cfg.data.path, self.strategy)
        self._model()
        self._engine()
        self._bookkeeping()

    def _distributed(self) -> None:
        """The process group, and the period's start in state.json (after --restart-period's
        discarded checkpoints)."""
        cfg, run, plan = self.cfg, self.run_folder, self.plan
        self.strategy = strategy = DeepSpeedStrategy()
        configure_logging(strategy.rank)
        # One decision for all before anything is written: each rank reads its share of the
        # period's shards whole (a rank that found an input damaged before the process group
        # meets the others here: train/main.py, `refuse`).
        with strategy.agreeing():
            check_rank_share(cfg.data.path, self.manifest, plan.period, strategy.rank, strategy.world_size)
        self.accumulation = accumulation_steps(cfg, strategy.world_size)
        self.dtype = resolve_dtype(cfg, strategy.cuda, strategy.bf16_supported)
        if strategy.is_rank0 and not plan.eval_only:
            os.makedirs(run.period_dir(plan.period), exist_ok=True)
            run.save_state(period=plan.period, phase="training")
        if plan.restart:
            if strategy.is_rank0 and os.path.isdir(run.ckpt_dir(plan.period)):
                shutil.rmtree(run.ckpt_dir(plan.period))
                log.info(
                    f"period {plan.period}: --restart-period: its checkpoints are discarded; training it from its start"
                )
            strategy.barrier()  # no rank may look for a checkpoint before they are gone

    def _model(self) -> None:
        """The backbone, in full or with LoRA (from the start adapter), its add-ons
        (train/model/addons/: the item vectors, the cumulative methods' frozen earlier adapters),
        and the method's proximal term."""
        cfg, plan, strategy, tokenizer = self.cfg, self.plan, self.strategy, self.vocab.tokenizer
        if cfg.model.shape and plan.period == 0:
            build_shape_backbone(cfg, self.run_folder, tokenizer, self.dtype, strategy)
        self.ds_config = fill_ds_config(
            self.ds_template,
            cfg,
            strategy.world_size,
            hidden_size(plan.backbone),
            self.dtype,
            plan.lr,
            lora_matrix=0 if plan.full else largest_lora_matrix(plan.backbone, cfg.lora.r),
            ranks_per_node=strategy.ranks_per_node,
        )
        strategy.use_ds_config(self.ds_config)  # before from_pretrained: ZeRO-3 loads partitioned
        model = load_backbone(strategy, plan.backbone, cfg, self.dtype, len(tokenizer))
        inputs = addons.TrainingInputs(cfg, self.run_folder, plan, strategy, self.manifest, self.vocab.codebook)
        self.addons = addons.for_training(inputs)
        addons.attach(self.addons, model, addons.BACKBONE)
        if plan.full:
            model.requires_grad_(True)
        else:
            model = apply_lora(model, cfg.lora, self.vocab.codebook.code_token_ids, seed=plan.lora_seed)
            addons.after_lora(self.addons, model)
            if plan.start_adapter:
                load_adapter_weights(strategy, model, plan.start_adapter)
        hold_trainable_in(model, self.dtype)
        addons.attach(self.addons, model, addons.LORA)
        self.regularizer = make_term(cfg, plan, self.run_folder, model, strategy)
        self.model = model

    def _engine(self) -> None:
        """The rank's data and the DeepSpeed engine."""
        cfg, plan, strategy = self.cfg, self.plan, self.strategy
        chunks = None
        if cfg.data.objective == "sequence":
            chunks = sequence_chunks_dir(self.run_folder.period_dir(plan.period), cfg.data.max_history)
            prepare_sequence_chunks(cfg.data.path, self.manifest, plan.period, cfg.data.max_history, chunks, strategy)
        self.data = WindowData(
            cfg.data.path,
            self.manifest,
            plan.period,
            settings=cfg.data,
            encoder=self.vocab.encoder,
            rank=strategy.rank,
            world_size=strategy.world_size,
            accumulation=self.accumulation,
            chunks=chunks,
        )
        self.total_steps = plan.total_steps(self.data.train_epoch.steps)
        groups = param_groups(self.model, cfg.optim.weight_decay)
        self.trainable = sum(whole_numel(param) for g in groups for param in g["params"])
        self.engine = strategy.initialize(
            self.model,
            groups,
            lambda g: make_optimizer(g, cfg.optim, plan.lr, strategy.cuda),
            lambda opt: make_scheduler(opt, cfg.schedule, self.total_steps),
        )

    def _bookkeeping(self) -> None:
        """Checkpoints, TensorBoard, the period's config.json, the trainer and the evaluator."""
        cfg, plan, run, strategy, engine = self.cfg, self.plan, self.run_folder, self.strategy, self.engine
        self.step_offset = run.state().get("global_step", 0)
        checkpointer = Checkpointer(strategy, run.ckpt_dir(plan.period), cfg.checkpoint.keep)
        # Training writes again from the step after the checkpoint it resumes from (or the period's
        # first step): whatever a killed run wrote from there on is hidden, not shown twice.
        # --eval_only writes only evaluation points, at a step that keeps its training points.
        purge_step = None if plan.eval_only else self.step_offset + checkpointer.latest_step() + 1
        self.logger = MetricsLogger(run.root, strategy.is_rank0, purge_step=purge_step)
        if strategy.is_rank0 and not plan.eval_only:
            self._record_config()
        self.stop = StopRequest(strategy)
        self.stop.install()
        self.trainer = Trainer(
            settings=LoopSettings.of(cfg, plan, total_steps=self.total_steps, step_offset=self.step_offset),
            strategy=strategy,
            engine=engine,
            data=self.data,
            checkpointer=checkpointer,
            export=self._export,
            reporting=Reporting(
                logger=self.logger,
                flops=FlopCounter(
                    engine.module.config,
                    None if plan.full else cfg.lora.r,
                    cfg.lora.targets,
                    plan.full,
                    cfg.model.gradient_checkpointing,
                ),
                peak_flops=device_peak_flops(strategy.cuda, self.dtype, cfg.logging.peak_tflops),
            ),
            regularizer=self.regularizer,
            stop=self.stop,
        )
        vocab_size = len(self.vocab.encoder.tokenizer)

        def load_replica(dtype, device):  # eval.replica: the period's export, whole on one rank
            from train.serve.recommender import load_period_model

            attn = cfg.model.attn_implementation
            return load_period_model(
                run, cfg, plan.period, vocab_size, dtype=dtype, device=device, attn_implementation=attn
            )

        self.evaluator = Evaluator(
            options=EvalOptions.of(cfg),
            model_folders=[plan.export_dir] + [run.adapter_dir(t) for t in plan.frozen_periods],
            load_replica=load_replica,
            strategy=strategy,
            engine=engine,
            encoder=self.vocab.encoder,
            manifest=self.manifest,
            period=plan.period,
            run=run,
            logger=self.logger,
            stop=self.stop,
            dtype=self.dtype,
            reuse_windows=not plan.eval_only,  # --eval_only evaluates from scratch
        )

    def _record_config(self) -> None:
        """Rank 0: periods/<t>/config.json (what a resume must match), TensorBoard's copy, a log line."""
        cfg, plan, strategy, train_epoch = self.cfg, self.plan, self.strategy, self.data.train_epoch
        trainable = sorted(
            {str(p.dtype).removeprefix("torch.") for p in self.engine.module.parameters() if p.requires_grad}
        )
        atomic_write_json(
            os.path.join(self.run_folder.period_dir(plan.period), "config.json"),
            {
                "config": cfg.to_dict(),
                "ds_config": self.ds_config,
                "world_size": strategy.world_size,
                # where and in what the period trained: a later period refuses another device type
                "device": strategy.device.type,
                "precision": {"compute": self.dtype, "trainable": trainable},
            },
        )
        self.logger.text(
            "config", {"period": plan.period, "config": cfg.to_dict(), "ds_config": self.ds_config}, self.step_offset
        )
        log.info(
            f"period {plan.period}: {'full training' if plan.full else f'LoRA r={cfg.lora.r}'} of {plan.backbone}, "
            f"{self.trainable:,} trainable parameters, {train_epoch.samples:,} "
            f"{'chunks of user sequences' if cfg.data.objective == 'sequence' else 'samples'}, "
            f"{train_epoch.steps} steps/epoch x {plan.epochs} epochs "
            f"(capped at {self.total_steps}), ZeRO-{strategy.zero_stage}, {strategy.world_size} ranks, {self.dtype}"
        )

    # ---- the period ------------------------------------------------------------------------------

    def _export(self) -> None:
        """The trainer's export of a better epoch."""
        module = self.engine.module
        if self.plan.full:
            export_full_model(self.strategy, module, self.vocab.tokenizer, self.plan.export_dir)
        else:
            export_adapter(self.strategy, module, self.plan.export_dir, {"period": self.plan.period})

    def evaluate_export(self) -> int:
        """--eval_only: the period's export evaluated again (a full period's model was loaded from it)."""
        if not self.plan.full:
            load_adapter_weights(self.strategy, self.engine.module, self.plan.export_dir)
        addons.load_states(self.strategy, self.engine.module, self.plan.export_dir)
        try:
            self.evaluator.evaluate(step=self.step_offset)
        except StopRequested:
            log.info(f"period {self.plan.period}: evaluation stopped on a signal; rerun to evaluate again")
            return EXIT_REQUEUE
        return 0

    def fit_and_evaluate(self) -> int:
        """Train (or resume), then evaluate the export. A stop request in either returns
        EXIT_REQUEUE: training has checkpointed where it stood; an evaluation resumes after its
        last finished window, since the rerun's trainer finds the period's training finished."""
        try:
            return self._fit_and_evaluate()
        except StopRequested:
            log.info(f"period {self.plan.period}: stopped on a signal, after a checkpoint; rerun to resume")
            if self.strategy.is_rank0:
                self.run_folder.save_state(phase="stopped")  # for a launcher that sees only torchrun's exit code (1)
            return EXIT_REQUEUE

    def _fit_and_evaluate(self) -> int:
        plan, strategy, engine = self.plan, self.strategy, self.engine
        progress = self.trainer.fit()
        # Evaluate what was exported: the best epoch's weights, not necessarily the last epoch's.
        if plan.full:
            load_full_weights(strategy, engine.module, plan.export_dir)
        else:
            load_adapter_weights(strategy, engine.module, plan.export_dir)
        addons.load_states(strategy, engine.module, plan.export_dir)
        if strategy.is_rank0:
            self.run_folder.save_state(phase="evaluating")
        metrics = None
        if self.cfg.eval.every_period:
            metrics = self.evaluator.evaluate(step=self.step_offset + engine.global_steps)
        if strategy.is_rank0:
            self.finish(progress, metrics)
        return 0

    def finish(self, progress: TrainingState, metrics: dict | None) -> None:
        """Rank 0: periods/<t>/train_summary.json, the period done in state.json, TensorBoard's hparams."""
        cfg, run, period, steps = self.cfg, self.run_folder, self.plan.period, self.engine.global_steps
        pull = self._pull_summary(progress)
        self.logger.scalars({f"pull/{k}": v for k, v in pull.items()}, self.step_offset + steps)
        summary = {
            "period": period,
            "steps": steps,
            "samples_seen": progress.samples_seen,
            "nonfinite_skipped": progress.nonfinite_skipped,
            "best_epoch": progress.best_epoch,
            "epochs_trained": progress.epoch,
            "stopped_early": progress.stopped_early,
            "val_losses": progress.val_losses,
            "world_size": self.strategy.world_size,
            **pull,
        }
        atomic_write_json(os.path.join(run.period_dir(period), "train_summary.json"), summary)
        state = run.state()
        run.save_state(done=sorted(set(state["done"]) | {period}), phase="done", global_step=self.step_offset + steps)
        self.logger.hparams(
            _flat(cfg.to_dict()),
            {
                "hparam/best_val_loss": progress.best_val or math.nan,
                **({f"hparam/{k}": v for k, v in metrics["overall"].items()} if metrics else {}),
            },
        )

    def _pull_summary(self, progress: TrainingState) -> dict:
        """How hard the proximal term pulled over the period (the mean of its logged pull / data
        gradient-norm ratios), and how far the period moved its adapter from where it started:
        ||theta - theta_start|| / ||theta_start|| over the LoRA factors (for peso: its anchor), and
        over the code-token rows."""
        out = {}
        ratios = [r for r in progress.pull_ratios if not math.isnan(r)]
        if ratios:
            out["pull_ratio_mean"] = sum(ratios) / len(ratios)
        plan = self.plan
        if not plan.full and plan.start_adapter:
            name = "adapter_model.safetensors"
            end, start = (
                load_safetensors(os.path.join(d, name), what="an adapter")
                for d in (plan.export_dir, plan.start_adapter)
            )
            out["adapter_relative_distance"] = relative_distance(end, start)
            # what method.pull=all also pulls: the code-token rows (docs/methods.md), where there are any
            rows = relative_distance(end, start, rows=True)
            if not math.isnan(rows):
                out["token_rows_relative_distance"] = rows
        return out

    def close(self, ended: bool) -> None:
        """After the period's end, a normal one or a checkpoint on a signal. After an error nothing
        is closed: the strategy's close is a barrier, which a rank that failed alone would wait in
        forever; main() reports the error and the process leaves."""
        if ended:
            self.logger.close()
            self.strategy.close()


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested dict's leaves under dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
