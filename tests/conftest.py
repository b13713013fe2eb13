"""Shared fixtures: real data (MovieLens-100K from the recbole wheel, the paper's CDs blocks)."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The team's shared folder sits next to the checkout (CI has it; the product never needs it).
SHARED = os.environ.get("PESO_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
CDS_BLOCKS = os.path.join(SHARED, "data", "amazon-cds-blocks")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
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
def ml_dataset(tmp_path_factory, movielens_files):
    """MovieLens-100K converted with the defaults (paper split), small shards."""
    from data_tools.convert import ConvertOptions, convert

    out = str(tmp_path_factory.mktemp("ml") / "ds")
    inter, item = movielens_files
    convert(ConvertOptions(format="movielens", reviews=inter, meta=item, out=out, shard_size=3000, progress=False,
                           log=sys.stdout))
    return out
