"""The demo: real data (MovieLens-100K from the recbole wheel), end to end on the CPU."""

from __future__ import annotations

import os

from data_tools.convert import ConvertOptions, convert
from data_tools.examples import movielens_100k
from data_tools.inspect import inspect


def run_demo(workdir: str) -> None:
    inter, item = movielens_100k()
    data = os.path.join(workdir, "data", "ml-100k")
    convert(ConvertOptions(format="movielens", reviews=inter, meta=item, out=data))
    print(inspect(data))
