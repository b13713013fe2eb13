"""The run's vocabulary: a tokenizer with one token per (level, code), the item codebook, and
the prompt encoder that turns a sample (history, target) into token ids and labels.

The tokenizer is made once per run, by rank 0, and saved in `<run>/tokenizer/`: from the
backbone's folder (a real model) or trained with SentencePiece on the prompt template and the
item texts (a model built from a shape). Every period and rank loads that same folder, so token
ids never change during a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data_tools.atomic import written_aside
from data_tools.dataset import ITEMS, dataset_remedy
from data_tools.index.codes import load_item_index
from data_tools.index.prompt import DEFAULT_TEMPLATE, IGNORE, PromptTemplate
from data_tools.index.tokenizer import ItemCodebook, add_code_tokens, train_sentencepiece_tokenizer
from data_tools.readback import iter_jsonl


def _item_texts(data_root: str) -> list[str]:
    items = iter_jsonl(os.path.join(data_root, ITEMS), what="the dataset's items", remedy=dataset_remedy(data_root))
    return [t for t in (item.get("text") or "" for item in items) if t]


def prepare_tokenizer(cfg, run, data_root: str, index: dict, template: PromptTemplate, strategy):
    """Rank 0 writes the run's tokenizer once (aside, then renamed into place: the folder exists
    only whole); every rank then loads it."""
    if strategy.is_rank0 and not os.path.isfile(os.path.join(run.tokenizer_dir, "tokenizer_config.json")):
        backbone = _backbone_tokenizer(cfg.model.path) if cfg.model.path else None
        with written_aside("cannot write the run's tokenizer", run.tokenizer_dir) as tmp:
            tokenizer = backbone if backbone is not None else _trained_tokenizer(cfg, data_root, template, tmp)
            add_code_tokens(tokenizer, index["levels"], index["codes_per_level"])
            tokenizer.save_pretrained(tmp)
    strategy.barrier()
    return AutoTokenizer.from_pretrained(run.tokenizer_dir)


def _backbone_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # left padding is masked out anyway
    return tokenizer


def _trained_tokenizer(cfg, data_root: str, template: PromptTemplate, out_dir: str):
    corpus = template.tokenizer_corpus(_item_texts(data_root))
    if corpus:
        return train_sentencepiece_tokenizer(corpus, out_dir, seed=cfg.model.seed)
    # A template without words (items alone): the special tokens and the byte fallback are all it
    # needs, and every row of the vocabulary costs the output layer on every position of the
    # sequence objective (a 1,000-piece vocabulary doubles a tiny model's step).
    return train_sentencepiece_tokenizer(["items"], out_dir, vocab_size=300, seed=cfg.model.seed)


class SampleEncoder:
    """Token ids and labels for the training objective (`data.objective`):

    - response: one sample per target, `{"history", "target"}` -> the template's prompt, then the
      target's codes and EOS (the labels);
    - sequence: a chunk `{"items", "first_target"}` -> the items as one list, the codes of every
      target in it labelled; a single target (validation, test) -> its list prompt and codes.

    `prompt(history)` is what evaluation decodes from, the same for training and test."""

    def __init__(
        self, tokenizer, codebook: ItemCodebook, template: PromptTemplate, max_history: int, objective: str = "response"
    ):
        if objective not in ("response", "sequence"):
            raise ValueError(f"unknown objective {objective!r}")
        self.tokenizer, self.codebook, self.template = tokenizer, codebook, template
        self.max_history, self.objective = max_history, objective

    def prompt(self, history: list[int]) -> list[int]:
        history = history[-self.max_history :]
        if self.objective == "sequence":
            return self.template.encode_list_prompt(self.tokenizer, self.codebook, history)
        return self.template.encode_prompt(self.tokenizer, self.codebook, history)

    def target(self, history: list[int], target: int) -> dict:
        """One target with its history (validation, test loss)."""
        if self.objective == "sequence":
            prompt = self.prompt(history)
            codes = self.codebook.item_token_ids(target)
            return {"input_ids": prompt + codes, "labels": [IGNORE] * len(prompt) + codes}
        return self.template.encode(self.tokenizer, self.codebook, history[-self.max_history :], target)

    def __call__(self, sample: dict) -> dict:
        if "items" in sample:  # a chunk of the sequence objective
            return self.template.encode_sequence(self.tokenizer, self.codebook, sample["items"], sample["first_target"])
        return self.target(sample["history"], sample["target"])

    @property
    def response_len(self) -> int:
        """Labelled tokens per target: the code tokens, and EOS in the response objective."""
        return self.codebook.levels + (1 if self.objective == "response" else 0)


@dataclass(frozen=True)
class Vocabulary:
    """What turns items into tokens for a run: the tokenizer (with the code tokens), the item
    codebook, the prompt template, and the sample encoder made of them."""

    tokenizer: PreTrainedTokenizerBase
    codebook: ItemCodebook
    template: PromptTemplate
    encoder: SampleEncoder

    @classmethod
    def of(cls, tokenizer, codebook: ItemCodebook, template: PromptTemplate, *, max_history: int, objective: str):
        return cls(tokenizer, codebook, template, SampleEncoder(tokenizer, codebook, template, max_history, objective))

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def prompt_template(template: str | None, separator: str) -> PromptTemplate:
    """`data.template` (None: the default) and `data.separator` as a PromptTemplate."""
    return PromptTemplate(template or DEFAULT_TEMPLATE, separator)


def load_vocab(cfg, run, data_root: str, strategy) -> Vocabulary:
    """The run's vocabulary (its tokenizer is made once, by rank 0: `prepare_tokenizer`)."""
    index = load_item_index(data_root)
    template = prompt_template(cfg.data.template, cfg.data.separator)
    tokenizer = prepare_tokenizer(cfg, run, data_root, index, template, strategy)
    return Vocabulary.of(
        tokenizer,
        ItemCodebook(index, tokenizer),
        template,
        max_history=cfg.data.max_history,
        objective=cfg.data.objective,
    )
