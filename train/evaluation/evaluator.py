"""Evaluation of one period's model, per window, for the R[i][j] matrix of forgetting: Hit@K and
NDCG@K overall and by user group (train/evaluation/ranking.py) of the trie-constrained beam
search (train/evaluation/beam_search.py), and the test loss; beside them, the two references
scored on the same users (train/evaluation/references.py). `eval.max_users` takes a seeded
random sample of a window's test users, the same for every method, period and rank count
(train/evaluation/users.py). A prediction is a hit when its code equals the target's code.

Under ZeRO-3 every forward is a collective, so every rank runs the same number of batches of the
same number of steps: ranks pad with masked copies that count for nothing. Where the whole model
fits a rank's device, `eval.replica` evaluates with a plain copy per rank built from the period's
export instead (no collective inside the forward; train/evaluation/replica.py, docs/zero3.md,
"Evaluating with a replica").

What each rank reads: its own users' test samples only; rank 0 also reads the window's training
split once (both references) and every evaluated user's test sample, and scores the references
for all of them, while the other ranks compute only the model's metrics. The device is read back
once per batch (the beams' codes and scores) and the test loss once per window.

A stop request (train/dist/stop.py) is honoured before any batch; each finished window is kept in
`periods/<t>/eval/window-<j>.json` (rank 0, atomically), so a rerun evaluates only the windows
left, as long as the export and the evaluation's settings are those the file was computed with
(train/evaluation/windows.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field

import torch

from data_tools.atomic import atomic_write_bytes, atomic_write_json
from data_tools.progress import progress_bar
from data_tools.reader import split_size
from train.evaluation.beam_search import decode_batch, decoding_forward
from train.evaluation.ranking import averages, group_sums, recommendation_list
from train.evaluation.references import reference_ranks
from train.evaluation.replica import build_replica, release_memory, use_replica
from train.evaluation.users import read_test_samples, test_indices
from train.evaluation.windows import FinishedWindows
from train.loop.data import collate
from train.loop.loss import IGNORE, lm_loss
from train.loop.telemetry import Pace
from train.model.build import DTYPES

log = logging.getLogger(__name__)

REPORT_EVERY_S = 60.0  # without a terminal: one progress line per minute of a window's evaluation


class EvaluatedUsersReporter:
    """How many of a window's users are evaluated so far: a bar on a terminal; in a log file (no
    terminal, or logging.progress false), a line every REPORT_EVERY_S seconds, so a long
    evaluation is not mistaken for a hung job. Counted by this rank's batches (ranks share the
    users evenly)."""

    def __init__(self, window: int, users: int, batches: int, show_bar: bool):
        self.window, self.users, self.batches = window, users, batches
        self.bar = progress_bar(total=users, desc=f"evaluating window {window}", unit="user", enabled=show_bar)
        self.pace = Pace(0, batches)
        self.next_report = REPORT_EVERY_S

    def batch_done(self, k: int) -> None:
        """Batch `k` (0-based) of this rank is done."""
        done = min(self.users, round((k + 1) / self.batches * self.users))
        self.bar.update(done - self.bar.n)
        if self.bar.disable and self.pace.elapsed() >= self.next_report:
            log.info(f"evaluating window {self.window}: {done:,} of {self.users:,} users, {self.pace.summary(k + 1)}")
            self.next_report += REPORT_EVERY_S

    def close(self) -> None:
        self.bar.close()


@dataclass
class _WindowTally:
    """One rank's results for its users of a window so far: each user's rank of the target and
    group, their recommendation lists, the invalid outputs, and the test loss's sums (on the
    device, float64 as the host's floats were, read once at the window's end)."""

    loss_sum: torch.Tensor
    loss_count: torch.Tensor
    ranks: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    lists: list = field(default_factory=list)
    invalid: int = 0

    @classmethod
    def on(cls, device) -> _WindowTally:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(loss_sum=zero, loss_count=zero.clone())

    def add(self, sample: dict, items: list[int], scores: list[float], rank: int | None, invalid: int) -> None:
        """One user's recommendation list (`recommendation_list`)."""
        self.ranks.append(rank)
        self.lists.append(
            {
                "user": sample["user"],
                "group": sample["group"],
                "target": sample["target"],
                "rank": rank,
                "items": items,
                "scores": scores,
            }
        )
        self.groups.append(sample["group"])
        self.invalid += invalid


@dataclass(frozen=True)
class EvalOptions:
    """What the evaluation reads of the config: the `eval` section (beams, ks, max_users, seed,
    replica) and five values of others."""

    settings: object  # the config's eval section
    data_path: str  # data.path: the dataset folder
    batch_size: int  # data.eval_batch_size
    temperature: float  # method.temperature, of the test loss
    method_name: str  # method.name, written into metrics.json
    attn_implementation: str  # model.attn_implementation: no shared-prompt search with flash_attention_2
    show_progress: bool  # logging.progress

    @classmethod
    def of(cls, cfg, *, show_progress: bool | None = None) -> EvalOptions:
        return cls(
            settings=cfg.eval,
            data_path=cfg.data.path,
            batch_size=cfg.data.eval_batch_size,
            temperature=cfg.method.temperature,
            method_name=cfg.method.name,
            attn_implementation=cfg.model.attn_implementation,
            show_progress=cfg.logging.progress if show_progress is None else show_progress,
        )


class Evaluator:
    """The evaluation of one period's model, built once per period: after period i, the test sets
    of windows 0..i (row i of R), written to metrics.json; and each of window i's test users' top
    items (internal item ids, best first, with their beam log-probabilities and the target's rank)
    to recommendations.jsonl.

    What it depends on, besides the period's model and data: `options` (EvalOptions: the config's
    eval section and the few other values it reads).
    `model_folders`: the folders whose files the evaluated model is loaded from (the export, then
    the frozen earlier adapters it adds), which a finished window's file must match;
    `load_replica(dtype=, device=)`: the period's model as a plain module (train/serve/recommender.py
    `load_period_model`), for `eval.replica`; None: never a replica.

    `stop`: a StopRequest (train/dist/stop.py), checked before every batch (a collective: every rank
    runs the same number of batches); `dtype`: the run's compute dtype (a replica's);
    `reuse_windows`: take the windows a stopped evaluation of the same export finished from
    their files (False with --eval_only, which evaluates from scratch)."""

    def __init__(
        self,
        *,
        options: EvalOptions,
        model_folders: list[str],
        strategy,
        engine,
        encoder,
        manifest: dict,
        period: int,
        run,
        logger,
        load_replica=None,
        stop=None,
        dtype: str | torch.dtype | None = None,
        reuse_windows: bool = True,
    ):
        self.settings, self.data_path, self.batch_size = options.settings, options.data_path, options.batch_size
        self.temperature, self.method_name = options.temperature, options.method_name
        self.attn_implementation, self.show_progress = options.attn_implementation, options.show_progress
        self.model_folders, self.load_replica = model_folders, load_replica
        self.strategy, self.engine, self.encoder = strategy, engine, encoder
        self.manifest, self.period, self.run, self.logger = manifest, period, run, logger
        self.stop, self.reuse_windows = stop, reuse_windows
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or _float_dtype(engine)
        self.model = engine  # what the forwards run: the engine, or a replica inside `evaluate`

    def _forward(self, ids, mask, position, cache, keep):
        return decoding_forward(self.model)(ids, mask, position, cache, keep)

    # ---- one window ---------------------------------------------------------------------------

    def evaluate_window(self, window: int) -> dict:
        """One window's test users (all, or the seeded sample of eval.max_users), shared round-robin
        by the ranks, combined across ranks; with both references on the same users."""
        strategy, settings = self.strategy, self.settings
        users_in_window = split_size(self.data_path, window, "test", self.manifest)
        chosen = test_indices(users_in_window, settings.max_users, settings.seed, window)
        log.info(f"period {self.period}: evaluating window {window} ({len(chosen):,} users)")
        if strategy.is_rank0:  # its own users, and both references for everyone
            samples, references = self._references(window, chosen)
        else:
            own = chosen[strategy.rank :: strategy.world_size]
            samples, references = read_test_samples(self.data_path, self.manifest, window, own), None
        tally = self._score_users(window, samples, len(chosen))
        out = self._combine(group_sums(tally.ranks, tally.groups, tally.invalid, settings.ks))
        references = strategy.broadcast_object(references)  # each rank adds its own users' share
        for name in ("popularity", "transitions"):
            reference = self._combine(references[name][strategy.rank])
            out[name] = {"overall": reference["overall"], "groups": reference["groups"]}
        out["recommendations"] = tally.lists  # this rank's users; `evaluate` gathers the current window's
        out["users_in_window"] = users_in_window
        loss_sum, loss_count = strategy.all_reduce_sum([float(tally.loss_sum), float(tally.loss_count)])
        out["overall"]["test_loss"] = loss_sum / max(loss_count, 1.0)
        return out

    def _score_users(self, window: int, samples: list[dict], users: int) -> _WindowTally:
        """This rank's `samples` of the window's `users`, batch by batch: every rank runs the same
        number of batches (a collective forward under ZeRO-3), the last ones padded."""
        batches = math.ceil(math.ceil(users / self.strategy.world_size) / self.batch_size)
        tally = _WindowTally.on(self.strategy.device)
        padding = self._padding()
        model = self.model
        model.eval()
        reporter = EvaluatedUsersReporter(window, users, batches, self.strategy.is_rank0 and self.show_progress)
        try:
            for k in range(batches):
                self._stop_point(window, k)
                self._score_batch(samples[k * self.batch_size : (k + 1) * self.batch_size], padding, tally)
                reporter.batch_done(k)
        finally:
            reporter.close()
            if model is self.engine:
                self.engine.train()
        return tally

    def _padding(self) -> tuple[list[int], dict]:
        """What fills a short batch for the collective, its results ignored: a prompt, and a test
        loss example without a labelled token."""
        masked = self.encoder.target([0], 0)
        return self.encoder.prompt([0]), {"input_ids": masked["input_ids"], "labels": [IGNORE] * len(masked["labels"])}

    def _score_batch(self, chunk: list[dict], padding: tuple[list[int], dict], tally: _WindowTally) -> None:
        """One batch of users (`chunk`, padded to the batch size): their beams decoded into
        recommendation lists, and the test loss (cross-entropy of the target's tokens,
        teacher-forced): a finer signal of forgetting than the hit rates."""
        encoder, device, fill = self.encoder, self.strategy.device, self.batch_size - len(chunk)
        codebook, pad_id = encoder.codebook, encoder.tokenizer.pad_token_id
        prompts = [encoder.prompt(sample["history"]) for sample in chunk] + [padding[0]] * fill
        shared_prompt = self.attn_implementation != "flash_attention_2"  # no 4D masks there
        codes, values = decode_batch(
            self._forward, prompts, codebook, self.settings.beams, pad_id, device, shared_prompt, users=len(chunk)
        )
        examples = [encoder.target(sample["history"], sample["target"]) for sample in chunk] + [padding[1]] * fill
        with torch.no_grad():
            total, count = lm_loss(self.model, self.strategy.to_device(collate(examples, pad_id)), self.temperature)
        tally.loss_sum += total
        tally.loss_count += count
        for sample, user_codes, user_scores in zip(chunk, codes, values):
            target = tuple(codebook.item_token_ids(sample["target"]))
            tally.add(sample, *recommendation_list(user_codes, user_scores, target, codebook))

    def _references(self, window: int, chosen: list[int]) -> tuple[list[dict], dict]:
        """Rank 0: its own users' test samples, and both references scored for every evaluated
        user from one pass over the training split and one over the chosen test samples. The
        references come as the sums each rank adds to the window's totals for its own users
        (`group_sums` of its round-robin share), so the totals are exactly those of every rank
        scoring its own users."""
        world, ks, n = self.strategy.world_size, self.settings.ks, len(chosen)
        popularity, transitions, groups, own = [None] * n, [None] * n, [None] * n, {}
        codebook = self.encoder.codebook
        for p, sample, popularity_rank, transitions_rank in reference_ranks(
            self.data_path, self.manifest, window, chosen, codebook, max(ks)
        ):
            popularity[p], transitions[p], groups[p] = popularity_rank, transitions_rank, sample["group"]
            if p % world == 0:
                own[p] = sample
        sums = {
            name: [group_sums(ranks[r::world], groups[r::world], 0, ks) for r in range(world)]
            for name, ranks in (("popularity", popularity), ("transitions", transitions))
        }
        return [own[p] for p in range(0, n, world)], sums

    def _combine(self, sums: list[float]) -> dict:
        """Every rank's `group_sums` added up across ranks (collective), then averaged."""
        return averages(self.strategy.all_reduce_sum(sums), self.settings.ks)

    def _stop_point(self, window: int, batch: int) -> None:
        """Before each batch: stop if any rank got a stop request (collective). Tests name the
        point "eval:<window>:<batch>" in PESO_FAULT_SIGNAL_AT (train/dist/stop.py) to signal rank 0 there."""
        if self.stop is None:
            return
        self.stop.fault_point(f"eval:{window}:{batch}")
        self.stop.check()

    # ---- windows 0..t -------------------------------------------------------------------------

    def evaluate(self, *, step: int) -> dict:
        """Windows 0..period, written to the period's metrics.json and recommendations.jsonl and to
        TensorBoard at `step`; returns metrics.json's content. Windows that a stopped evaluation
        of the same export finished are taken from their files; StopRequested passes through
        (what is finished is kept)."""
        strategy, period = self.strategy, self.period
        todo = [j for j in range(period + 1) if self.manifest["windows"][j]["stats"]["samples"]["test"] > 0]
        finished = FinishedWindows(self.run, period, self.model_folders, self._window_settings())
        key = finished.key(self.dtype, strategy.world_size) if strategy.is_rank0 else None
        saved = finished.saved(key, todo) if strategy.is_rank0 and self.reuse_windows else {}
        windows, recommendations = self._evaluate_windows(todo, saved, finished, key)
        current = windows.get(str(period))
        result = {
            "period": period,
            "method": self.method_name,
            "ks": self.settings.ks,
            "windows": windows,
            "overall": current["overall"] if current else {},
            "groups": current["groups"] if current else {},
        }
        if strategy.is_rank0:
            self._write(result, recommendations, step)
            finished.clear()  # metrics.json holds them now
        return result

    def _window_settings(self) -> dict:
        """The evaluation's settings that a finished window's result depends on (its file's key)."""
        return {
            "eval": dataclasses.asdict(self.settings),
            "data": os.path.abspath(self.data_path),
            "eval_batch_size": self.batch_size,
            "attn_implementation": self.attn_implementation,
            "temperature": self.temperature,
        }

    def _evaluate_windows(self, todo: list[int], saved: dict, finished: FinishedWindows, key) -> tuple[dict, list]:
        """The windows `todo`, those in `saved` (rank 0's finished files) taken from there: their
        results by window, and (rank 0) every rank's recommendation lists of the period's window."""
        strategy, period = self.strategy, self.period
        reused = strategy.broadcast_object({j: w["result"] for j, w in saved.items()})
        windows, recommendations = {}, None
        replica = self._replica() if len(reused) < len(todo) else None
        self.model = replica or self.engine
        try:
            for j in todo:
                if j in reused:
                    log.info(f"period {period}: window {j} was evaluated before a stop; its result is reused")
                    windows[str(j)] = reused[j]
                    if j == period and strategy.is_rank0:
                        recommendations = [saved[j]["recommendations"]]
                    continue
                windows[str(j)], lists = self._evaluate_and_keep(j, finished, key)
                if j == period:
                    recommendations = lists
        finally:
            if replica is not None:
                self.model = replica = None
                release_memory(strategy)
            self.model = self.engine
        return windows, recommendations

    def _replica(self) -> torch.nn.Module | None:
        """A replica of the period's model on every rank, if eval.replica says so and every rank
        could build one; else None (collective)."""
        if self.load_replica is None:
            return None
        if not use_replica(self.settings.replica, self.strategy, self.engine, self.dtype, self.period):
            return None
        return build_replica(self.load_replica, self.dtype, self.period, self.strategy)

    def _evaluate_and_keep(self, window: int, finished: FinishedWindows, key) -> tuple[dict, list | None]:
        """Window `window` evaluated, checked for invalid outputs and kept in its file (rank 0):
        its result, and for the period's own window every rank's recommendation lists (rank 0)."""
        result = self.evaluate_window(window)
        lists = result.pop("recommendations")
        gathered = self.strategy.gather_to_rank0(lists) if window == self.period else None
        if result["invalid_outputs"]:
            raise RuntimeError(
                f"constrained decoding produced {result['invalid_outputs']} invalid items in window {window}"
            )
        if self.strategy.is_rank0:
            finished.save(window, key, result, gathered)
        return result, gathered

    def _write(self, result: dict, recommendations: list | None, step: int) -> None:
        """Rank 0: metrics.json, recommendations.jsonl, the eval/* scalars and the log lines."""
        period, logger, windows = self.period, self.logger, result["windows"]
        current = windows.get(str(period))
        atomic_write_json(self.run.metrics_path(period), result)
        if recommendations is not None:
            rows = sorted((r for part in recommendations for r in part), key=lambda r: r["user"])
            atomic_write_bytes(
                self.run.recommendations_path(period), "".join(json.dumps(r) + "\n" for r in rows).encode()
            )
        for j, w in windows.items():
            logger.scalars({f"eval/window{j}/{k}": v for k, v in w["overall"].items()}, step)
        if current:
            logger.scalars({f"eval/current/{k}": v for k, v in current["overall"].items()}, step)
            for g, vals in current["groups"].items():
                logger.scalars({f"eval/current_{g}/{k}": v for k, v in vals.items() if k != "users"}, step)
        log.info(
            f"period {period} test (window {period}, {current['users'] if current else 0} users): "
            + ", ".join(f"{k} {v:.4f}" for k, v in result["overall"].items())
        )
        if current:
            log.info(
                "   most popular items of the window (reference): "
                + ", ".join(f"{k} {v:.4f}" for k, v in current["popularity"]["overall"].items())
            )
            log.info(
                "   items that followed the users' last items (reference, no model): "
                + ", ".join(f"{k} {v:.4f}" for k, v in current["transitions"]["overall"].items())
            )


def _float_dtype(engine) -> torch.dtype:
    """The dtype of the model's first floating parameter (when no compute dtype is given)."""
    module = getattr(engine, "module", engine)
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
