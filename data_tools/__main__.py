"""Command line: `python -m data_tools {convert,inspect,index} ...` (also installed as `peso-data`)."""

from __future__ import annotations

import argparse
import sys

from data_tools.accounting import InputError
from data_tools.formats import FORMATS


def _convert(a) -> None:
    from data_tools.convert import ConvertOptions, convert
    from data_tools.inspect import window_table

    manifest = convert(ConvertOptions(
        format=a.format, reviews=a.reviews, meta=a.meta, index=a.index, out=a.out, split=a.split,
        min_interactions=a.min_interactions, max_history=a.max_history, min_rating=a.min_rating,
        kcore=a.kcore, shard_size=a.shard_size, seed=a.seed, collisions=a.collisions,
        strict=a.strict, force=a.force, progress=not a.no_progress, workers=a.workers))
    print(window_table(manifest))


def _inspect(a) -> None:
    from data_tools.inspect import inspect

    print(inspect(a.dir, as_json=a.json))


def _index(a) -> None:
    from data_tools.index.build import index_main

    index_main(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="review stream -> dataset folder of per-window WebDataset shards")
    c.add_argument("--format", required=True, help=f"one of: {', '.join(FORMATS)}")
    c.add_argument("--reviews", required=True, help="reviews file (plain or .gz); for blocks, the folder of block_<k>.json; for movielens, ml-100k.inter")
    c.add_argument("--meta", help="item metadata file (plain or .gz); for movielens, ml-100k.item")
    c.add_argument("--index", help="for --format blocks: the semantic-ID file (item_id -> tokens)")
    c.add_argument("--out", required=True, help="dataset folder to write")
    c.add_argument("--split", default="paper", help="paper (60%% then 4 equal windows), paper:FRACTION:WINDOWS, or calendar:DAYS")
    c.add_argument("--min-interactions", type=int, default=5, help="a user's interactions in a window to be eligible there (default 5)")
    c.add_argument("--max-history", type=int, default=20, help="history items kept per sample (default 20)")
    c.add_argument("--min-rating", type=float, default=None, help="drop interactions rated below this")
    c.add_argument("--kcore", type=int, default=None, help="keep only users and items with at least K interactions (iterated)")
    c.add_argument("--shard-size", type=int, default=20000, help="samples per shard (default 20000)")
    c.add_argument("--seed", type=int, default=0, help="seed of the training samples' order")
    c.add_argument("--collisions", default="keep", choices=["keep", "extend", "error"], help="items sharing a code in --index")
    c.add_argument("--strict", action="store_true", help="turn every counted skip into an error")
    c.add_argument("--force", action="store_true", help="convert even if the folder is up to date")
    c.add_argument("--workers", type=int, default=None, help="processes writing shards (default: all cores; the bytes do not depend on it)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_convert)

    i = sub.add_parser("inspect", help="print the per-window statistics of a dataset folder")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)

    x = sub.add_parser("index", help="build (or import) the item index: semantic IDs per item")
    x.add_argument("dir", help="dataset folder")
    x.add_argument("--embedder", default="minilm", help="minilm, hf:PATH (local Hugging Face model) or npy:PATH")
    x.add_argument("--import", dest="import_path", help="import an existing item_id -> tokens file instead")
    x.add_argument("--collisions", default="keep", choices=["keep", "extend", "error"], help="with --import: items sharing a code")
    x.add_argument("--levels", type=int, default=4)
    x.add_argument("--codes", type=int, default=256)
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--epochs", type=int, default=None, help="RQ-VAE training epochs (default: sized to the catalog)")
    x.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    x.add_argument("--force", action="store_true")
    x.add_argument("--no-progress", action="store_true")
    x.set_defaults(func=_index)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
