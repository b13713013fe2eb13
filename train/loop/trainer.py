"""The training loop of one period: epochs of micro-batches, validation after each epoch, the
best epoch exported, checkpoints, and everything reported to TensorBoard.

The loss is the cross-entropy of the labelled tokens (train/loop/loss.py), plus `method.lam` times
the regularizer's proximal term when there is one (train/methods/proximal.py). An epoch ends with the
validation loss; the best epoch so far is exported, and with `schedule.patience` the period
stops after that many epochs without a better one (`schedule.epochs`, or
`schedule.period0_epochs` in period 0, is the cap). A micro-batch whose loss is not finite on any rank
is skipped on every rank (no backward, and it does not count toward the accumulation window,
so the optimizer step waits for the next good micro-batch), counted, and too many in a row stop
the run with an error.

A stop request (SIGUSR1 or SIGTERM: a SLURM time limit or preemption, train/dist/stop.py) is honoured
at the next optimizer step, between validation batches and before an export: every rank saves a
checkpoint of where it stands (a validation loss already computed is kept in it, so a resumed
run goes on with the export) and the period exits with EXIT_REQUEUE (train/common/exit_codes.py).

One read-back from the device per micro-batch: a single all-reduce of [non-finite?, stop
requested?, cross-entropy, proximal term] tells every rank whether to step and carries what the
log averages; validation losses stay on the device until the pass ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from data_tools.progress import progress_bar
from train.dist.checkpoint import Checkpointer
from train.dist.stop import StopRequest, StopRequested
from train.loop.loss import IGNORE, lm_loss
from train.loop.telemetry import Pace, Throughput, memory_stats
from train.methods.proximal import pull_and_data_norms

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainingState:
    """Where a period's training stands; saved in every checkpoint (DeepSpeed restores the step
    count)."""

    epoch: int = 0
    micro: int = 0  # next micro-batch of `epoch`
    samples_seen: int = 0  # by all ranks together
    nonfinite_skipped: int = 0
    best_val: float | None = None
    best_epoch: int | None = None
    val_losses: list = field(default_factory=list)
    stopped_early: bool = False  # `schedule.patience` epochs without a better validation loss
    finished: bool = False  # the last epoch's end (validation, export) is done
    epoch_val: float | None = None  # the validation loss of `epoch`, once computed (before its export)
    pull_ratios: list = field(default_factory=list)  # the proximal pull / the data's, at each logged step


STOP_CHECK_EVERY = 8  # validation batches between two looks at a stop request (each is a collective)


@dataclass(frozen=True)
class MicroStep:
    """What one micro-batch leaves for the loop, the same on every rank."""

    ce: float  # cross-entropy, mean over ranks
    proximal: float | None  # the proximal term (mean over ranks), or None without a regularizer
    skipped: bool  # a non-finite loss on some rank: no backward, no step
    stop: bool  # some rank got a stop request
    # At a logged step of a regularized period: (norm of lam x the term's gradient, norm of the
    # data loss's gradient) on the LoRA factors (train/methods/proximal.py, pull_and_data_norms).
    pull: tuple[float, float] | None = None


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads of the config and of the period's plan: nothing else of either."""

    period: int
    epochs: int  # the cap (with patience)
    total_steps: int  # the period's optimizer steps (or schedule.max_steps)
    step_offset: int  # the run's step at this period's start: TensorBoard's x axis goes on across periods
    temperature: float  # method.temperature
    lam: float  # method.lam
    log_every: int  # logging.every_steps
    progress_bar: bool  # logging.progress
    max_nonfinite_in_a_row: int  # optim.max_nonfinite_in_a_row
    checkpoint_every: int  # checkpoint.every_steps
    patience: int | None  # schedule.patience

    @classmethod
    def of(cls, cfg, plan, *, total_steps: int, step_offset: int) -> LoopSettings:
        return cls(
            period=plan.period,
            epochs=plan.epochs,
            total_steps=total_steps,
            step_offset=step_offset,
            temperature=cfg.method.temperature,
            lam=cfg.method.lam,
            log_every=cfg.logging.every_steps,
            progress_bar=cfg.logging.progress,
            max_nonfinite_in_a_row=cfg.optim.max_nonfinite_in_a_row,
            checkpoint_every=cfg.checkpoint.every_steps,
            patience=cfg.schedule.patience,
        )


@dataclass(frozen=True)
class Reporting:
    """Where the loop reports: TensorBoard (train/loop/telemetry.py), the FLOPs of a micro-batch
    (train/loop/flops.py) and the device's peak, for the utilization."""

    logger: object
    flops: object
    peak_flops: tuple[float, str]  # (FLOP/s, what it is)


class Trainer:
    def __init__(
        self,
        *,
        settings: LoopSettings,
        strategy,
        engine,
        data,
        checkpointer: Checkpointer,
        export,
        reporting: Reporting,
        regularizer=None,
        stop: StopRequest,
    ):
        self.settings, self.strategy, self.engine, self.data = settings, strategy, engine, data
        self.checkpointer, self.export, self.regularizer, self.stop = checkpointer, export, regularizer, stop
        self.logger, self.flops = reporting.logger, reporting.flops
        self.peak_flops, self.peak_label = reporting.peak_flops
        self.step_offset, self.period, self.epochs = settings.step_offset, settings.period, settings.epochs
        self.total_steps = settings.total_steps
        self._nan_at = {
            int(x) for x in os.environ.get("PESO_FAULT_NAN_AT", "").split(",") if x
        }  # fault injection for tests

    # ---- one micro-batch --------------------------------------------------------------------

    def _micro_step(self, batch: dict, micro_index: int) -> MicroStep:
        self.stop.fault_point(f"train:{micro_index}")
        batch = self.strategy.to_device(batch)
        with self.regularizer.collect() if self.regularizer is not None else contextlib.nullcontext():
            ce_sum, count = lm_loss(self.engine, batch, self.settings.temperature)
        ce = ce_sum / count.clamp(min=1)
        loss, proximal = ce, None
        if self.regularizer is not None:
            proximal = self.regularizer.term()
            loss = ce + self.settings.lam * proximal
        if micro_index in self._nan_at and self.strategy.is_rank0:
            loss = loss * float("nan")
        # The one read-back of the micro-batch: summed over ranks, in one collective.
        zero = ce.new_zeros(())
        nonfinite, stop, ce_sum_ranks, proximal_sum_ranks = self.strategy.all_reduce_sum_tensor(
            torch.stack(
                [
                    (~torch.isfinite(loss.detach())).to(ce.dtype),
                    zero + float(self.stop.signalled),
                    ce.detach(),
                    zero if proximal is None else proximal.detach().to(ce.dtype),
                ]
            )
        ).tolist()
        skip = nonfinite > 0
        pull = None
        if not skip:
            self.engine.backward(loss)
            if proximal is not None and self._logs_after_this_step():
                # the gradients are whole (reduced) now, before the step uses and clears them
                grads = self.strategy.full_grads(self.regularizer.params)
                pull = pull_and_data_norms(self.regularizer, self.settings.lam, grads)
            self.engine.step()
        world = self.strategy.world_size
        return MicroStep(
            ce=ce_sum_ranks / world,
            proximal=None if proximal is None else proximal_sum_ranks / world,
            skipped=skip,
            stop=stop > 0,
            pull=pull,
        )

    def _logs_after_this_step(self) -> bool:
        """Whether this micro-batch ends an optimizer step that is logged."""
        return self.engine.is_gradient_accumulation_boundary() and self._is_log_step(self.engine.global_steps + 1)

    def _is_log_step(self, step: int) -> bool:
        return step % self.settings.log_every == 0 or step == self.total_steps

    # ---- validation -------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, progress: TrainingState) -> float:
        """The validation loss over every rank's share of the split. A stop request is looked at
        every STOP_CHECK_EVERY batches (a collective: the same batches on every rank); the
        checkpoint then holds the finished epoch, whose end a resumed run does again."""
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.strategy.device)
        count = torch.zeros((), dtype=torch.float64, device=self.strategy.device)
        for k, batch in enumerate(self.data.valid()):
            if k and k % STOP_CHECK_EVERY == 0 and self.stop.agreed():
                self.engine.train()
                self._stop_here(progress)
            loss_sum, labelled = lm_loss(self.engine, self.strategy.to_device(batch), self.settings.temperature)
            total += loss_sum
            count += labelled
        self.engine.train()
        total, count = self.strategy.all_reduce_sum_tensor(torch.stack([total, count])).tolist()
        return total / max(count, 1.0)

    def _stop_here(self, progress: TrainingState) -> None:
        """Every rank agreed to stop: checkpoint where the period stands, then StopRequested."""
        self.checkpointer.save(self.engine, self.engine.global_steps, self._client_state(progress))
        raise StopRequested()

    # ---- the loop ---------------------------------------------------------------------------

    def _client_state(self, progress: TrainingState) -> dict:
        return dict(progress.__dict__)

    def fit(self) -> TrainingState:
        engine, strategy = self.engine, self.strategy
        saved = self.checkpointer.load(engine)
        progress = TrainingState(**saved) if saved else TrainingState()
        if saved:
            log.info(
                f"resumed period {self.period} at epoch {progress.epoch}, micro-batch {progress.micro}, "
                f"step {engine.global_steps}"
            )
        self.pace = Pace(engine.global_steps, self.total_steps)
        engine.train()  # from_pretrained returns eval mode and deepspeed.initialize keeps it
        epoch_size = self.data.train_epoch
        bar = progress_bar(
            total=self.total_steps,
            initial=engine.global_steps,
            desc=f"period {self.period}",
            unit="step",
            enabled=strategy.is_rank0 and self.settings.progress_bar,
            dynamic_ncols=True,
            leave=True,
        )
        self.bar_shown = not bar.disable
        try:
            while not progress.finished:
                if progress.micro < epoch_size.micro_batches and engine.global_steps < self.total_steps:
                    self._train_epoch(progress, bar)
                self._end_epoch(progress)
        finally:
            bar.close()
        return progress

    def _train_epoch(self, progress: TrainingState, bar) -> None:
        """Micro-batches from progress.micro to the epoch's end (or the step cap)."""
        engine, strategy, epoch_size = self.engine, self.strategy, self.data.train_epoch
        meter = Throughput()
        losses, proximals, bad_in_a_row, pull = [], [], 0, None
        loader = iter(self.data.train(progress.epoch, start=progress.micro))
        while progress.micro < epoch_size.micro_batches and engine.global_steps < self.total_steps:
            t0 = time.perf_counter()
            batch = next(loader)
            waited = time.perf_counter() - t0
            steps_before = engine.global_steps
            micro = self._micro_step(batch, progress.epoch * epoch_size.micro_batches + progress.micro)
            progress.micro += 1
            progress.samples_seen += batch["input_ids"].shape[0] * strategy.world_size  # equal batches on every rank
            if micro.skipped:
                progress.nonfinite_skipped += 1
                bad_in_a_row += 1
                if bad_in_a_row > self.settings.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"{bad_in_a_row} micro-batches in a row had a non-finite loss (period {self.period}, "
                        f"epoch {progress.epoch}, step {engine.global_steps}); lower optim.lr or check the data"
                    )
            else:
                bad_in_a_row = 0
                losses.append(micro.ce)
                if micro.proximal is not None:
                    proximals.append(micro.proximal)
                pull = micro.pull or pull
            tokens = int(batch["attention_mask"].sum())
            meter.add(
                tokens,
                int((batch["targets"] != IGNORE).sum()),
                batch["input_ids"].shape[0],
                self.flops.micro_batch(tokens, batch["input_ids"].shape[1], batch["targets"].numel()),
                waited,
            )
            if engine.global_steps == steps_before:
                continue  # inside an accumulation window
            bar.update(1)
            step = engine.global_steps
            if self._is_log_step(step):
                self._log(step, losses, proximals, pull, meter, progress)
                losses, proximals, pull = [], [], None
                meter.reset()
            if micro.stop or step % self.settings.checkpoint_every == 0:
                self.checkpointer.save(engine, step, self._client_state(progress))
            if micro.stop:
                raise StopRequested()

    def _end_epoch(self, progress: TrainingState) -> None:
        if progress.epoch_val is None:
            progress.epoch_val = self.validate(progress)
            if self.stop.agreed():  # before the export: a resumed run keeps this validation loss
                self._stop_here(progress)
        val, progress.epoch_val = progress.epoch_val, None
        progress.val_losses.append(val)
        step = self.engine.global_steps
        self.logger.scalars({"val/loss": val, "val/epoch": progress.epoch}, self.step_offset + step)
        improved = progress.best_val is None or val < progress.best_val
        if improved:
            progress.best_val, progress.best_epoch = val, progress.epoch
            self.export()
        patience = self.settings.patience
        progress.stopped_early = bool(patience) and progress.epoch - progress.best_epoch >= patience
        log.info(
            f"period {self.period} epoch {progress.epoch}: validation loss {val:.4f}"
            + (
                " (best so far, exported)"
                if improved
                else f" (best: epoch {progress.best_epoch}, {progress.best_val:.4f})"
            )
            + (f"; no better epoch in {patience}, stopping" if progress.stopped_early else "")
        )
        progress.epoch += 1
        progress.micro = 0
        progress.finished = progress.epoch >= self.epochs or step >= self.total_steps or progress.stopped_early
        self.checkpointer.save(self.engine, step, self._client_state(progress))

    def _log(self, step: int, losses: list, proximals: list, pull, meter: Throughput, progress: TrainingState) -> None:
        """`losses`, `proximals`: the micro-batches' values since the last log point, already
        averaged over ranks; `pull`: this step's (pull, data) gradient norms, or None."""
        n_proximal = len(proximals)
        values = {
            "train/loss_ce": sum(losses) / len(losses) if losses else math.nan,
            "train/lr": self.engine.get_lr()[0],
            "train/grad_norm": self.engine.get_global_grad_norm(),
            "train/nonfinite_skipped": progress.nonfinite_skipped,
            "train/samples_seen": progress.samples_seen,
            "train/epoch": progress.epoch,
            "period": self.period,
            **meter.report(self.peak_flops, self.peak_label),
            **memory_stats(self.strategy.cuda),
        }
        if n_proximal:
            values["train/proximal"] = sum(proximals) / n_proximal
            values["train/loss"] = values["train/loss_ce"] + self.settings.lam * values["train/proximal"]
        if pull is not None:
            # How hard the proximal term pulls the LoRA factors, against the data: the number to
            # read when choosing method.lam (docs/methods.md).
            pull_norm, data_norm = pull
            values["pull/proximal_grad_norm"], values["pull/data_grad_norm"] = pull_norm, data_norm
            values["pull/ratio"] = pull_norm / data_norm if data_norm > 0 else math.nan
            progress.pull_ratios.append(values["pull/ratio"])
        else:
            values["train/loss"] = values["train/loss_ce"]
        grad_norm = values["train/grad_norm"]
        if isinstance(grad_norm, torch.Tensor):
            values["train/grad_norm"] = float(grad_norm)
        self.logger.scalars(values, self.step_offset + step)
        if not self.bar_shown:  # no terminal (a SLURM log): one line per log step instead of a bar
            log.info(
                f"period {self.period} step {step}/{self.total_steps}: loss {values['train/loss']:.4f}"
                + (f" (proximal {values['train/proximal']:.3g})" if n_proximal else "")
                + (f", pull/data {values['pull/ratio']:.3g}" if pull is not None else "")
                + f", lr {values['train/lr']:.3g}, {values['perf/input_tokens_per_s_per_rank']:.0f} tokens/s/rank, "
                + self.pace.summary(step)
            )
