"""A rank's micro-batches in both objectives: the same with or without DataLoader workers, and a
resumed epoch continues with exactly the batches it would have trained on; each worker reads and
decodes only the samples of its own batches."""

from __future__ import annotations

import os

import pytest
import torch

from data_tools.dataset import load_manifest
from data_tools.index.codes import load_item_index
from data_tools.index.prompt import PromptTemplate
from data_tools.index.tokenizer import ItemCodebook, add_code_tokens, train_sentencepiece_tokenizer
from data_tools.reader import ReadOrder, epoch_order, read_split, window_split
from data_tools.sequences import ChunkFile, window_chunks, write_chunks
from train.common.config import load_config
from train.loop.data import RankEpoch, ResponseSamples, WindowData
from train.model.vocab import SampleEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def vocab(small_dataset, tmp_path_factory):
    tok = train_sentencepiece_tokenizer(PromptTemplate().tokenizer_corpus([]), str(tmp_path_factory.mktemp("tok")))
    add_code_tokens(tok, 4, 256)
    return tok, ItemCodebook(load_item_index(small_dataset), tok)


@pytest.mark.parametrize("objective", ["sequence", "response"])
def test_batches_do_not_depend_on_workers_and_resume_where_they_stopped(small_dataset, vocab, objective, tmp_path):
    tok, book = vocab
    cfg = load_config(
        None, ["model.shape=tiny", f"data.objective={objective}", "data.micro_batch_size=4", "data.shuffle_buffer=50"]
    )
    encoder = SampleEncoder(tok, book, PromptTemplate(), 20, objective)
    manifest = load_manifest(small_dataset)

    chunks = None
    if objective == "sequence":  # what rank 0 writes into the period folder (prepare_sequence_chunks)
        chunks = str(tmp_path / "chunks")
        write_chunks(window_chunks(read_split(small_dataset, 0, "train"), 20), chunks)

    def batches(workers: int, rank: int, start: int = 0) -> tuple[list, WindowData]:
        cfg.data.num_workers = workers
        data = WindowData(
            small_dataset,
            manifest,
            0,
            settings=cfg.data,
            encoder=encoder,
            rank=rank,
            world_size=2,
            accumulation=1,
            chunks=chunks,
        )
        return [(b["input_ids"], b["targets"]) for b in data.train(epoch=1, start=start)], data

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))

    plain, data = batches(0, rank=0)
    assert len(plain) == data.train_epoch.micro_batches > 5
    assert same(batches(2, rank=0)[0], plain)
    assert same(batches(2, rank=0, start=3)[0], plain[3:])
    assert not same(batches(0, rank=1)[0], plain)  # the other rank has its own slice
    labelled = sum(int((t != -100).sum()) for _, t in plain)
    assert labelled % encoder.response_len == 0 and labelled > 0  # whole targets: codes (and EOS)


class _RecordedSamples(ResponseSamples):
    """Real shards, real reads; each fetch also records which samples it decoded (one file per
    DataLoader worker process)."""

    def __init__(self, log_dir, *args):
        super().__init__(*args)
        self.log_dir = log_dir

    def fetch(self, wanted):
        info = torch.utils.data.get_worker_info()
        with open(os.path.join(self.log_dir, f"worker-{info.id if info else 'main'}"), "a") as f:
            for index, sample in super().fetch(wanted):
                f.write(f"{index}\n")
                yield index, sample


def test_each_worker_reads_and_decodes_only_its_own_batches(small_dataset, vocab, tmp_path):
    tok, book = vocab
    encoder = SampleEncoder(tok, book, PromptTemplate(), 20, "response")
    source = _RecordedSamples(str(tmp_path), small_dataset, load_manifest(small_dataset), 0, "train", 50)
    order = source.order(0, 1, 0, 1)
    epoch = RankEpoch(
        source=source, window=0, split="train", rank=0, world_size=1, seed=0, epoch=1, micro_batch_size=4,
        micro_batches=len(order) // 4, start=0, encode=encoder, pad_id=tok.pad_token_id, pad_with="wrap",
    )  # fmt: skip
    batches = list(torch.utils.data.DataLoader(epoch, batch_size=None, num_workers=2))
    assert len(batches) == len(order) // 4 > 10
    read = {w: [int(x) for x in (tmp_path / f"worker-{w}").read_text().split()] for w in (0, 1)}
    for w in (0, 1):  # worker w makes batches w, w + 2, ...: exactly their samples, each once
        assert sorted(read[w]) == sorted(order[p] for j in range(w, len(batches), 2) for p in range(4 * j, 4 * j + 4))
        assert read[w] == sorted(read[w])  # in stored order, one pass
    assert not (tmp_path / "worker-main").exists()


def test_the_epoch_order_is_the_streamed_order(small_dataset):
    """The trainer's indices without reading give the same samples as the streaming reader."""
    everything = read_split(small_dataset, 0, "train")
    for rank, epoch in [(0, 0), (1, 3)]:
        read = ReadOrder(rank=rank, world_size=2, seed=5, epoch=epoch, shuffle_buffer=16)
        streamed = [s["key"] for s in window_split(small_dataset, 0, "train", read)]
        order = epoch_order(len(everything), read)
        assert [everything[k]["key"] for k in order] == streamed
        assert streamed != sorted(streamed, key=[s["key"] for s in everything].index)  # it did shuffle


def test_sequence_chunks_written_once_are_read_back_by_position(small_dataset, tmp_path):
    """The chunk file that rank 0 writes gives any chunk by its position, exactly as built."""
    built = window_chunks(read_split(small_dataset, 0, "train"), 20)
    write_chunks(built, str(tmp_path / "chunks"))
    chunks = ChunkFile(str(tmp_path / "chunks"))
    assert len(chunks) == len(built) > 20
    wanted = {0, 3, len(built) - 1, 7}
    assert list(chunks.fetch(wanted)) == [(k, built[k]) for k in sorted(wanted)]
