"""Recommendations out of a trained run, without DeepSpeed: one period's model exactly as it was
evaluated, and the top-K items for histories of items or for users of the dataset.

    from train.serve.recommender import Recommender

    rec = Recommender.from_run("runs/cds-peso", period=4)      # or Recommender.from_export("export/cds-peso")
    rec.recommend([["B00004T9W9", "B000002O7D"]], k=10)        # histories of source item ids
    rec.recommend_users(["A2SUAM1J3GNN3B"], k=10)                # users of the dataset (from_run only)

Each answer is a list of `Recommendation(item, title, score)`, best first: the source item id,
its title where the data has one, and the beam's log-probability. Decoding is the evaluation's
(train/evaluation/beam_search.py): batched beam search over the prefix trie of real item codes, with
`eval.beams` beams (or k, if larger), so the first item of a test user's answer is the
evaluation's.

The model of a period (`load_period_model`): the backbone (period 0's exported model after a full
period 0, else the base or `model.path`), the period's adapter, and its model add-ons
(train/model/addons/): the item vectors with `model.item_vectors`, and for `cumulative` and
`cumulative_all` the frozen, normalized sum of the earlier adapters that the period trained and
was evaluated with. For people who call Hugging Face `generate` themselves, `TrieLogitsProcessor`
applies the same constraint there.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

from data_tools.dataset import ITEM_INDEX, ITEMS, USERS, dataset_remedy, load_manifest
from data_tools.index.codes import load_item_index
from data_tools.index.tokenizer import ItemCodebook
from data_tools.readback import iter_jsonl, read_json
from data_tools.reader import read_split
from train.common.config import Config, config_from_dict
from train.common.run_folder import RunFolder
from train.evaluation.beam_search import NEG, constrained_beam_search, decoding_forward
from train.model import addons as model_addons
from train.model.build import DTYPES
from train.model.vocab import Vocabulary, prompt_template
from train.period.inputs import check_adapter, check_model_folder, check_period_export, check_tokenizer, finished_remedy
from train.period.plan import evaluated_model_dir, trains_in_full

EXPORT_INFO = "recommender.json"  # what an export folder is (train/serve/export.py writes it)


class UnknownIdError(KeyError):
    """Source ids (users or items) that the run's data does not know."""

    def __init__(self, kind: str, ids: list[str]):
        self.kind, self.ids = kind, ids
        shown = ", ".join(repr(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        super().__init__(f"unknown {kind} {shown}")

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Recommendation:
    item: str  # the source item id (as in the input data)
    title: str  # "" where the data has none
    score: float  # log-probability of the item's code under the model (beam score)


class ItemCatalog:
    """Source item ids <-> the dataset's item ids, and titles (items.jsonl)."""

    def __init__(self, path: str):
        self.source_of: dict[int, str] = {}
        self.title_of: dict[int, str] = {}
        rows = iter_jsonl(
            path,
            what="the items",
            remedy=f"put the dataset's {ITEMS} back from a copy",
            fields={"item_id": int, "source_id": (str, int)},
        )
        for row in rows:
            self.source_of[row["item_id"]] = str(row["source_id"])
            self.title_of[row["item_id"]] = row.get("title") or ""
        self.item_of = {source: item for item, source in self.source_of.items()}

    def items(self, sources: list[str]) -> list[int]:
        unknown = [s for s in sources if s not in self.item_of]
        if unknown:
            raise UnknownIdError("items", unknown)
        return [self.item_of[s] for s in sources]


def saved_config(run: RunFolder, period: int) -> Config:
    """The configuration the period was trained with (periods/<t>/config.json)."""
    path = os.path.join(run.period_dir(period), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run.root} has no trained period {period} ({path} is missing)")
    return config_from_dict(read_json(path, **_config_file(run, period), fields={"config": dict})["config"])


def _config_file(run: RunFolder, period: int) -> dict:
    path = os.path.join(run.period_dir(period), "config.json")
    return {"what": f"period {period}'s config", "remedy": finished_remedy(run, period, path)}


def _check_export(folder: str, kind: str, remedy: str) -> None:
    """An export's files whole: its tokenizer, and its model (merged) or backbone and adapter."""
    check_tokenizer(folder, remedy)
    if kind == "adapter":
        check_model_folder(os.path.join(folder, "base"), "the export's backbone", remedy)
        check_adapter(os.path.join(folder, "adapter"), "the export's adapter", remedy)
    else:
        check_model_folder(folder, "the export's model", remedy)


def period_compute_dtype(run: RunFolder, period: int) -> str | None:
    """The compute dtype ("bf16", "fp32", ...) a period trained and was evaluated in (its
    config.json); None for a period recorded before that was written down."""
    recorded = read_json(os.path.join(run.period_dir(period), "config.json"), **_config_file(run, period))
    precision = recorded.get("precision") or {}
    return precision.get("compute") if isinstance(precision, dict) else None


def torch_dtype(name: str | None):
    """A compute dtype's torch dtype; "auto" (the saved dtypes) for None."""
    return DTYPES[name] if name else "auto"


def last_done_period(run: RunFolder) -> int:
    done = run.state()["done"]
    if not done:
        raise FileNotFoundError(f"{run.root} has no finished period (state.json lists none)")
    return max(done)


def plain_backbone(
    source: str, vocab_size: int, dtype="auto", device=None, attn_implementation: str | None = None
) -> torch.nn.Module:
    """A backbone folder as a plain model with a row for every token of the run's tokenizer (a
    real backbone gets rows for the code tokens; the adapter holds their trained values). With
    `device`, loaded straight onto it (accelerate's device_map: no whole copy in host memory), or
    with "auto" over the devices there are."""
    kwargs = {}
    if device is not None:  # "auto": accelerate spreads the model over the GPUs there are (then the host)
        kwargs["device_map"] = "auto" if device == "auto" else {"": torch.device(device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


def load_period_model(
    run: RunFolder,
    cfg: Config,
    period: int,
    vocab_size: int,
    dtype="auto",
    addons: bool = True,
    device=None,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """A plain (no DeepSpeed) model that computes what period `period` was evaluated with
    (without its model add-ons if not `addons`: for a plain Hugging Face save).

    `dtype` "auto" keeps the saved dtypes, and the adapters take the backbone's; a torch dtype
    puts every parameter in it (the training's precision policy, docs/precision.md: the
    evaluation's replica, train/evaluation/replica.py; a served period, `period_compute_dtype`). `device`: built
    there (the backbone loaded straight onto it), or "auto" over the devices there are."""
    from peft import PeftModel

    from train.dist.placement import move_to

    source = evaluated_model_dir(cfg, run, period)
    model = plain_backbone(source, vocab_size, dtype, device, attn_implementation)
    extras = model_addons.for_run(cfg, run, period) if addons else []
    model_addons.attach(extras, model, model_addons.BACKBONE)
    if not trains_in_full(cfg, period):
        adapter = run.adapter_dir(period)
        if not os.path.isfile(os.path.join(adapter, "adapter_model.safetensors")):
            raise FileNotFoundError(f"period {period} of {run.root} has no exported adapter ({adapter})")
        with warnings.catch_warnings():  # peft asks a deprecated transformers property (FutureWarning, harmless)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            # No fp32 upcast: the adapters compute in the backbone's dtype, as they trained.
            model = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False)
    model_addons.attach(extras, model, model_addons.LORA)
    if device not in (None, "auto"):  # a buffer made on the host (the modules added above follow their layers)
        move_to(model, torch.device(device))
    if isinstance(dtype, torch.dtype):  # parameters only: buffers (rotary inv_freq) keep theirs, as DeepSpeed does
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model.eval()


class TrieLogitsProcessor(LogitsProcessor):
    """Hugging Face `generate` with real items only: each new token must continue the code of a
    catalog item (the trie), and after a whole code only EOS may follow. Give it the width of the
    (left-padded) prompt batch; use with `num_beams` and `max_new_tokens = levels (+ 1 for EOS)`.
    Beam search masks the log-softmax of the logits, as train/evaluation/beam_search.py does."""

    def __init__(self, trie, prompt_width: int, eos_token_id: int | None = None):
        self.trie, self.prompt_width, self.eos_token_id = trie, prompt_width, eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] >= self.trie.depth:
            mask = torch.zeros_like(scores, dtype=torch.bool)
            if self.eos_token_id is not None:
                mask[:, self.eos_token_id] = True
        else:
            mask = self.trie.allowed_mask(generated, scores.shape[-1], scores.device)
        return scores.masked_fill(~mask, NEG)


class Recommender:
    """One period's model with its vocabulary, item catalog and decoding settings."""

    def __init__(
        self,
        model,
        vocab: Vocabulary,
        catalog: ItemCatalog,
        *,
        beams: int,
        device,
        data_root: str | None = None,
        period: int | None = None,
    ):
        self.model = model
        self.tokenizer, self.codebook, self.encoder = vocab.tokenizer, vocab.codebook, vocab.encoder
        self.catalog, self.beams = catalog, beams
        self.data_root, self.period = data_root, period
        if device == "auto":  # placed by accelerate, perhaps over several devices: inputs go to the embedding's
            self.device = next(model.get_input_embeddings().parameters()).device
        else:
            self.device = torch.device(device)
            self.model.to(self.device)
        self._users: dict[str, int] | None = None

    # ---- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_run(cls, run_dir: str, period: int | None = None, device=None, data: str | None = None) -> Recommender:
        """Period `period` (default: the last finished one) of a run folder; `data` overrides the
        dataset folder the run was trained on (data.path of its config)."""
        run = RunFolder(run_dir)
        period = last_done_period(run) if period is None else period
        cfg = saved_config(run, period)
        data_root = data or cfg.data.path
        if not os.path.isfile(os.path.join(data_root, ITEM_INDEX)):
            raise FileNotFoundError(
                f"the run's dataset {data_root} has no {ITEM_INDEX}; pass the dataset folder (--data)"
            )
        check_period_export(cfg, run, period)
        tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
        codebook = ItemCodebook(load_item_index(data_root), tokenizer)
        device = device or default_device()
        model = load_period_model(
            run,
            cfg,
            period,
            len(tokenizer),
            dtype=torch_dtype(period_compute_dtype(run, period)),
            device=device,
            attn_implementation=cfg.model.attn_implementation,
        )
        vocab = Vocabulary.of(
            tokenizer,
            codebook,
            prompt_template(cfg.data.template, cfg.data.separator),
            max_history=cfg.data.max_history,
            objective=cfg.data.objective,
        )
        return cls(
            model,
            vocab,
            ItemCatalog(os.path.join(data_root, ITEMS)),
            beams=cfg.eval.beams,
            device=device,
            data_root=data_root,
            period=period,
        )

    @classmethod
    def from_export(cls, folder: str, device=None) -> Recommender:
        """A folder written by `python -m launcher export` (merged model, or backbone + adapter),
        loaded straight onto `device` (default: cuda if there is one), or with "auto" spread over
        the GPUs there are by accelerate (a model larger than one GPU)."""
        info_path = os.path.join(folder, EXPORT_INFO)
        if not os.path.isfile(info_path):
            raise FileNotFoundError(
                f"{folder} is not a recommender export (no {EXPORT_INFO}); "
                "make one with `python -m launcher export RUN --out DIR`"
            )
        remedy = "make it again with `python -m launcher export RUN --out DIR`"
        info = read_json(
            info_path, what="the export's description", remedy=remedy, fields={"kind": str, "prompt": dict}
        )
        _check_export(folder, info["kind"], remedy)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        codebook = ItemCodebook(load_item_index(folder), tokenizer)
        device = device or default_device()
        dtype = torch_dtype(info.get("dtype"))  # the period's compute dtype
        extras = model_addons.from_export(folder)  # its model add-ons (the item vectors)
        if info["kind"] == "adapter":
            from peft import PeftModel

            model = plain_backbone(os.path.join(folder, "base"), len(tokenizer), dtype, device)
            model_addons.attach(extras, model, model_addons.BACKBONE)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                # No fp32 upcast: the adapter computes in the backbone's dtype, as it trained.
                model = PeftModel.from_pretrained(model, os.path.join(folder, "adapter"), autocast_adapter_dtype=False)
        else:
            model = plain_backbone(folder, len(tokenizer), dtype, device)
            model_addons.attach(extras, model, model_addons.BACKBONE)
        model_addons.attach(extras, model, model_addons.LORA)
        prompt = info["prompt"]
        vocab = Vocabulary.of(
            tokenizer,
            codebook,
            prompt_template(prompt["template"], prompt["separator"]),
            max_history=prompt["max_history"],
            objective=prompt["objective"],
        )
        return cls(
            model.eval(),
            vocab,
            ItemCatalog(os.path.join(folder, ITEMS)),
            beams=info["beams"],
            device=device,
            period=info["period"],
        )

    # ---- recommending -----------------------------------------------------------------------------

    @torch.no_grad()
    def top_items(
        self, histories: list[list[int]], k: int = 10, batch_size: int = 64, progress=None, exclude_seen: bool = False
    ) -> list[list[tuple[int, float]]]:
        """The top `k` (item id, log-probability) for each history of dataset item ids, best first.
        `exclude_seen` leaves out the items of the history (the evaluation keeps them: the paper's
        protocol); the beam is widened by the longest history so that k items remain.
        `progress(n)` is called after each batch with the number of histories done."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        beams = max(k + (max(map(len, histories), default=0) if exclude_seen else 0), self.beams)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        forward = decoding_forward(self.model)
        # flash_attention_2 takes no 4D mask: the search then repeats the prompt's cache per beam
        shared = getattr(getattr(self.model, "config", None), "_attn_implementation", None) != "flash_attention_2"

        out = []
        for start in range(0, len(histories), batch_size):
            part = histories[start : start + batch_size]
            prompts = [self.encoder.prompt(list(h)) for h in part]
            seqs, scores = constrained_beam_search(
                forward, prompts, self.codebook.trie, self.codebook.levels, beams, pad_id, self.device, shared
            )
            for i in range(len(part)):
                seen = set(part[i]) if exclude_seen else set()
                ranked = []
                for j in range(beams):
                    if scores[i, j] == NEG:
                        continue
                    item = self.codebook.item_of(seqs[i, j].tolist())
                    if item is not None and item not in seen:
                        ranked.append((item, float(scores[i, j])))
                out.append(ranked[:k])
            if progress:
                progress(len(part))
        return out

    def named(self, ranked: list[tuple[int, float]]) -> list[Recommendation]:
        return [
            Recommendation(self.catalog.source_of[i], self.catalog.title_of.get(i, ""), round(s, 6)) for i, s in ranked
        ]

    def recommend(self, histories: list[list[str]], k: int = 10, **kw) -> list[list[Recommendation]]:
        """Top `k` items for each history of source item ids (oldest first); keywords as for
        `top_items`. Raises UnknownIdError naming every item that the catalog lacks."""
        unknown = sorted({s for h in histories for s in h if s not in self.catalog.item_of})
        if unknown:
            raise UnknownIdError("items", unknown)
        return [self.named(r) for r in self.top_items([self.catalog.items(list(h)) for h in histories], k, **kw)]

    def user_histories(self, users: list[str]) -> dict[str, list[int]]:
        """Each known source user id's items (dataset ids, oldest first) up to the end of this
        period's window: the history and target of their latest sample in windows 0..period.
        Users the dataset does not know, or who have no sample by then, are left out."""
        if self.data_root is None:
            raise ValueError("users need the run's dataset: load with Recommender.from_run")
        if self._users is None:
            rows = iter_jsonl(
                os.path.join(self.data_root, USERS),
                what="the dataset's users",
                remedy=dataset_remedy(self.data_root),
                fields={"user_id": int, "source_id": (str, int)},
            )
            self._users = {str(r["source_id"]): r["user_id"] for r in rows}
        wanted = {self._users[u]: u for u in users if u in self._users}
        manifest = load_manifest(self.data_root)
        latest: dict[int, tuple[tuple[int, int], list[int]]] = {}
        for window in range(self.period + 1):
            for split in ("train", "valid", "test"):
                for s in read_split(self.data_root, window, split, manifest):
                    if s["user"] in wanted:
                        order = (window, int(s["key"].rsplit("_", 1)[1]))
                        if s["user"] not in latest or order > latest[s["user"]][0]:
                            latest[s["user"]] = (order, list(s["history"]) + [s["target"]])
        return {wanted[u]: items for u, (_, items) in latest.items()}

    def recommend_users(self, users: list[str], k: int = 10, **kw) -> dict[str, list[Recommendation]]:
        """Top `k` items for users of the dataset, by source user id, from their items up to the
        end of this period. Raises UnknownIdError naming users with no history by then."""
        histories = self.user_histories(users)
        unknown = [u for u in users if u not in histories]
        if unknown:
            raise UnknownIdError("users", unknown)
        ranked = self.top_items([histories[u] for u in users], k, **kw)
        return {u: self.named(r) for u, r in zip(users, ranked)}

    def evaluate_window(
        self,
        data_root: str,
        window: int,
        ks: list[int],
        max_users: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> tuple[dict, list[dict]]:
        """Hit@K and NDCG@K on a window's test users (all, or the evaluation's seeded sample of
        `max_users`), and each user's list, as train/evaluation/ranking.py computes them during training:
        the figures of a period's metrics.json, from this model alone."""
        from train.evaluation.ranking import rank_metrics
        from train.evaluation.users import test_users

        users = test_users(data_root, load_manifest(data_root), window, max_users, seed)
        ranked = self.top_items([u["history"] for u in users], max(ks), batch_size)
        lists, ranks = [], []
        for u, r in zip(users, ranked):
            items = [i for i, _ in r]
            target = tuple(self.codebook.item_token_ids(u["target"]))
            rank = next((n for n, i in enumerate(items) if tuple(self.codebook.item_token_ids(i)) == target), None)
            ranks.append(rank)
            lists.append(
                {"user": u["user"], "target": u["target"], "rank": rank, "items": items, "scores": [s for _, s in r]}
            )
        return rank_metrics(ranks, ks), sorted(lists, key=lambda x: x["user"])

    def logits_processor(self, prompt_width: int) -> TrieLogitsProcessor:
        return TrieLogitsProcessor(self.codebook.trie, prompt_width, self.tokenizer.eos_token_id)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
