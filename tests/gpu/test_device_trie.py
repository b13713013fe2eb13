"""The beam search's trie masks on a GPU (marked `gpu`: skipped where there is no CUDA): built on
the device from the trie's tensors, equal to the host's `allowed_mask`, and without a single
device-to-host synchronization (the point of building them there)."""

from __future__ import annotations

import random

import pytest
import torch

from data_tools.index.trie import CodeTrie

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_trie_masks_on_the_gpu_equal_the_host_masks_without_a_sync():
    rng = random.Random(0)
    base, vocab = 128_000, 128_000 + 4 * 256  # code tokens after a Llama-3-sized vocabulary
    codes = {tuple(base + 256 * k + rng.randrange(256) for k in range(4)) for _ in range(40_000)}
    trie = CodeTrie(codes)
    device = torch.device("cuda")
    on_gpu = trie.on(device)
    catalog = sorted(codes)
    for depth in range(5):
        rows = [c[:depth] for c in rng.sample(catalog, 600)]
        rows += [tuple(base + 256 * k + rng.randrange(256) for k in range(depth)) for _ in range(40)]  # mostly not
        prefixes = torch.tensor(rows, dtype=torch.long).reshape(len(rows), depth).to(device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            mask = on_gpu.allowed_mask(prefixes, vocab)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert mask.device.type == "cuda"
        assert torch.equal(mask.cpu(), trie.allowed_mask(rows, vocab)), depth
