"""Command line: `python -m data_tools {convert,append,inspect,index} ...` (also installed as `peso-data`)."""

from __future__ import annotations

import argparse
import sys

from data_tools.accounting import InputError
from data_tools.atomic import WriteError
from data_tools.formats import FORMATS
from data_tools.help_format import HelpFormatter


def _convert(args) -> None:
    from data_tools.convert import ConvertOptions, convert
    from data_tools.inspect import window_table

    manifest = convert(
        ConvertOptions(
            format=args.format,
            reviews=args.reviews,
            meta=args.meta,
            index=args.index,
            out=args.out,
            split=args.split,
            min_interactions=args.min_interactions,
            max_history=args.max_history,
            min_rating=args.min_rating,
            kcore=args.kcore,
            shard_size=args.shard_size,
            seed=args.seed,
            collisions=args.collisions,
            strict=args.strict,
            force=args.force,
            progress=not args.no_progress,
            workers=args.workers,
            until=args.until,
        )
    )
    print(window_table(manifest))


def _append(args) -> None:
    from data_tools.append import AppendOptions, append
    from data_tools.inspect import window_table

    manifest = append(
        AppendOptions(
            data=args.dir,
            reviews=args.reviews,
            meta=args.meta,
            until=args.until,
            progress=not args.no_progress,
            workers=args.workers,
        )
    )
    print(window_table(manifest))


def _inspect(args) -> None:
    from data_tools.inspect import inspect

    print(inspect(args.dir, as_json=args.json))


def _index(args) -> None:
    from data_tools.index.build import index_main

    index_main(args)


def embedder_spec(text: str) -> str:
    """`--embedder`: minilm, hf:PATH or npy:PATH (a kind and its argument, so not plain choices)."""
    kind, colon, arg = text.partition(":")
    if text == "minilm" or (kind in ("hf", "npy") and colon and arg):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not one of minilm, hf:PATH, npy:PATH")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert_parser(sub)
    _add_append_parser(sub)
    _add_inspect_parser(sub)
    _add_index_parser(sub)
    return parser


def _add_convert_parser(sub) -> None:
    convert_parser = sub.add_parser(
        "convert", help="review stream -> dataset folder of per-window WebDataset shards", formatter_class=HelpFormatter
    )
    convert_parser.add_argument("--format", required=True, choices=FORMATS, help="the input's format (docs/data.md)")
    convert_parser.add_argument(
        "--reviews",
        required=True,
        help="reviews file (plain or .gz); for blocks, the folder of block_<k>.json; for movielens, ml-100k.inter",
    )
    convert_parser.add_argument(
        "--meta",
        help="item metadata file (plain or .gz); for movielens, ml-100k.item (default: none, items without text)",
    )
    convert_parser.add_argument(
        "--index", help="for --format blocks: the semantic-ID file (item_id -> tokens) (default: none)"
    )
    convert_parser.add_argument("--out", required=True, help="dataset folder to write")
    convert_parser.add_argument(
        "--split",
        default="paper",
        help="paper (60%% then 4 equal windows), paper:FRACTION:WINDOWS, or calendar:DAYS (a dataset that "
        "`append` can grow)",
    )
    convert_parser.add_argument(
        "--until",
        default=None,
        help="calendar: the stream is complete up to this UTC date (2026-12-05), date and time, or Unix "
        "second; windows that end by then are written (default: those the stream's last review has passed)",
    )
    convert_parser.add_argument(
        "--min-interactions", type=int, default=5, help="a user's interactions in a window to be eligible there"
    )
    convert_parser.add_argument("--max-history", type=int, default=20, help="history items kept per sample")
    convert_parser.add_argument(
        "--min-rating", type=float, default=None, help="drop interactions rated below this (default: keep every rating)"
    )
    convert_parser.add_argument(
        "--kcore",
        type=int,
        default=None,
        help="keep only users and items with at least K interactions, iterated (default: no filter)",
    )
    convert_parser.add_argument("--shard-size", type=int, default=20000, help="samples per shard")
    convert_parser.add_argument("--seed", type=int, default=0, help="seed of the training samples' order")
    convert_parser.add_argument(
        "--collisions", default="keep", choices=["keep", "extend", "error"], help="items sharing a code in --index"
    )
    convert_parser.add_argument("--strict", action="store_true", help="turn every counted skip into an error")
    convert_parser.add_argument("--force", action="store_true", help="convert even if the folder is up to date")
    convert_parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes writing shards; the bytes do not depend on it (default: all cores)",
    )
    convert_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    convert_parser.set_defaults(func=_convert)


def _add_append_parser(sub) -> None:
    append_parser = sub.add_parser(
        "append",
        help="add new reviews to a calendar dataset folder: writes only the windows they close",
        formatter_class=HelpFormatter,
    )
    append_parser.add_argument("dir", help="dataset folder (python -m data_tools convert --split calendar:DAYS)")
    append_parser.add_argument(
        "--reviews", help="the new reviews, in the dataset's format (plain or .gz) (default: none, only --until)"
    )
    append_parser.add_argument(
        "--meta", help="item metadata for the new items (plain or .gz) (default: none, new items without text)"
    )
    append_parser.add_argument(
        "--until",
        default=None,
        help="the stream is complete up to this UTC date (2026-12-05), date and time, or Unix second: windows "
        "that end by then close (default: those the last review has passed)",
    )
    append_parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes writing shards; the bytes do not depend on it (default: all cores)",
    )
    append_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    append_parser.set_defaults(func=_append)


def _add_inspect_parser(sub) -> None:
    inspect_parser = sub.add_parser(
        "inspect", help="print the per-window statistics of a dataset folder", formatter_class=HelpFormatter
    )
    inspect_parser.add_argument("dir", help="dataset folder")
    inspect_parser.add_argument("--json", action="store_true", help="the statistics as JSON (for machines)")
    inspect_parser.set_defaults(func=_inspect)


def _add_index_parser(sub) -> None:
    index_parser = sub.add_parser(
        "index", help="build (or import) the item index: semantic IDs per item", formatter_class=HelpFormatter
    )
    index_parser.add_argument("dir", help="dataset folder")
    index_parser.add_argument(
        "--embedder",
        default="minilm",
        type=embedder_spec,
        metavar="{minilm,hf:PATH,npy:PATH}",
        help="the bundled MiniLM, a local Hugging Face model (mean-pooled), or precomputed embeddings (row i = item i)",
    )
    index_parser.add_argument(
        "--import", dest="import_path", help="import an existing item_id -> tokens file instead (default: build)"
    )
    index_parser.add_argument(
        "--collisions", default="keep", choices=["keep", "extend", "error"], help="with --import: items sharing a code"
    )
    index_parser.add_argument("--levels", type=int, default=4, help="code levels per item (RQ-VAE depth)")
    index_parser.add_argument("--codes", type=int, default=256, help="codes per level")
    index_parser.add_argument("--seed", type=int, default=0, help="seed of the RQ-VAE (k-means init, training order)")
    index_parser.add_argument(
        "--epochs", type=int, default=None, help="RQ-VAE training epochs (default: sized to the catalog)"
    )
    index_parser.add_argument(
        "--device", default=None, help="where to embed: cpu, cuda, cuda:1 ... (default: cuda when present)"
    )
    index_parser.add_argument(
        "--force", action="store_true", help="rebuild from scratch even if an index exists (existing codes may change)"
    )
    index_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    index_parser.set_defaults(func=_index)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (InputError, WriteError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
