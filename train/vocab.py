"""The run's vocabulary: a tokenizer with one token per (level, code), the item codebook, and
the prompt encoder that turns a sample (history, target) into token ids and labels.

The tokenizer is made once per run, by rank 0, and saved in `<run>/tokenizer/`: from the
backbone's folder (a real model) or trained with SentencePiece on the prompt template and the
item texts (a model built from a shape). Every period and rank loads that same folder, so token
ids never change during a run.
"""

from __future__ import annotations

import json
import os
import shutil

from transformers import AutoTokenizer

from data_tools.dataset import ITEMS
from data_tools.index.codes import load_item_index
from data_tools.index.prompt import DEFAULT_TEMPLATE, PromptTemplate
from data_tools.index.tokenizer import ItemCodebook, add_code_tokens, train_sentencepiece_tokenizer


def _item_texts(data_root: str) -> list[str]:
    with open(os.path.join(data_root, ITEMS)) as f:
        return [t for t in (json.loads(line).get("text") or "" for line in f) if t]


def prepare_tokenizer(cfg, run, data_root: str, index: dict, template: PromptTemplate, strategy):
    if strategy.is_rank0 and not os.path.isfile(os.path.join(run.tokenizer_dir, "tokenizer_config.json")):
        tmp = run.tokenizer_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.model.path:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token  # left padding is masked out anyway
        else:
            tokenizer = train_sentencepiece_tokenizer(template.tokenizer_corpus(_item_texts(data_root)), tmp,
                                                      seed=cfg.model.seed)
        add_code_tokens(tokenizer, index["levels"], index["codes_per_level"])
        tokenizer.save_pretrained(tmp)
        os.makedirs(run.root, exist_ok=True)
        os.replace(tmp, run.tokenizer_dir)
    strategy.barrier()
    return AutoTokenizer.from_pretrained(run.tokenizer_dir)


class SampleEncoder:
    """sample dict (from the shards) -> {"input_ids", "labels"} with the last `max_history` items."""

    def __init__(self, tokenizer, codebook: ItemCodebook, template: PromptTemplate, max_history: int):
        self.tokenizer, self.codebook, self.template, self.max_history = tokenizer, codebook, template, max_history

    def __call__(self, sample: dict) -> dict:
        history = sample["history"][-self.max_history:]
        return self.template.encode(self.tokenizer, self.codebook, history, sample["target"])

    @property
    def response_len(self) -> int:
        return self.codebook.levels + 1  # the code tokens and EOS


def load_vocab(cfg, run, data_root: str, strategy) -> tuple:
    """(tokenizer, codebook, template) for this run."""
    index = load_item_index(data_root)
    template = PromptTemplate(cfg.data.template or DEFAULT_TEMPLATE, cfg.data.separator)
    tokenizer = prepare_tokenizer(cfg, run, data_root, index, template, strategy)
    return tokenizer, ItemCodebook(index, tokenizer), template
