"""Real example data that ships inside installed wheels (no network at run time)."""

from __future__ import annotations

import importlib.util
import os


def movielens_100k() -> tuple[str, str]:
    """(ml-100k.inter, ml-100k.item) from the `recbole` wheel's bundled example dataset.

    Installed with `pip install --no-deps recbole==1.2.1` (the setup does it); the package is
    located without importing it, since its own dependencies are not installed.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MovieLens-100K comes with the recbole wheel: pip install --no-deps recbole==1.2.1")
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "dataset_example", "ml-100k")
    inter, item = os.path.join(folder, "ml-100k.inter"), os.path.join(folder, "ml-100k.item")
    if not (os.path.isfile(inter) and os.path.isfile(item)):
        raise FileNotFoundError(f"{folder} lacks ml-100k.inter / ml-100k.item; reinstall recbole==1.2.1")
    return inter, item
