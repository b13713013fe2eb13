"""A rank's micro-batches in both objectives: the same with or without DataLoader workers, and a
resumed epoch continues with exactly the batches it would have trained on."""

from __future__ import annotations

import os

import pytest
import torch

from data_tools.dataset import load_manifest
from data_tools.index.codes import load_item_index
from data_tools.index.prompt import PromptTemplate
from data_tools.index.tokenizer import ItemCodebook, add_code_tokens, train_sentencepiece_tokenizer
from train.config import load_config
from train.data import WindowData
from train.vocab import SampleEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def vocab(small_dataset, tmp_path_factory):
    tok = train_sentencepiece_tokenizer(PromptTemplate().tokenizer_corpus([]), str(tmp_path_factory.mktemp("tok")))
    add_code_tokens(tok, 4, 256)
    return tok, ItemCodebook(load_item_index(small_dataset), tok)


@pytest.mark.parametrize("objective", ["sequence", "response"])
def test_batches_do_not_depend_on_workers_and_resume_where_they_stopped(small_dataset, vocab, objective):
    tok, book = vocab
    cfg = load_config(
        None, ["model.shape=tiny", f"data.objective={objective}", "data.micro_batch_size=4", "data.shuffle_buffer=50"]
    )
    encoder = SampleEncoder(tok, book, PromptTemplate(), 20, objective)
    manifest = load_manifest(small_dataset)

    def batches(workers: int, rank: int, start: int = 0) -> tuple[list, WindowData]:
        cfg.data.num_workers = workers
        data = WindowData(small_dataset, manifest, 0, cfg=cfg, encoder=encoder, rank=rank, world_size=2, accumulation=1)
        return [(b["input_ids"], b["targets"]) for b in data.train(epoch=1, start=start)], data

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))

    plain, data = batches(0, rank=0)
    assert len(plain) == data.train_plan.micro_batches > 5
    assert same(batches(2, rank=0)[0], plain)
    assert same(batches(2, rank=0, start=3)[0], plain[3:])
    assert not same(batches(0, rank=1)[0], plain)  # the other rank has its own slice
    labelled = sum(int((t != -100).sum()) for _, t in plain)
    assert labelled % encoder.response_len == 0 and labelled > 0  # whole targets: codes (and EOS)
