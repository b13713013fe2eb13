"""`python -m launcher recommend` and `python -m launcher export`: a trained run's recommendations,
and a self-contained folder of one period's recommender (train/serve/recommender.py,
train/serve/export.py do the work; this is the command line around them)."""

from __future__ import annotations

import json
import sys

from data_tools.help_format import HelpFormatter

USAGE_EXIT = 2  # nothing could be answered (bad arguments, no such run or period)
PARTIAL_EXIT = 1  # some users or histories were unknown; the others were answered


def add_parsers(sub) -> None:
    _add_recommend_parser(sub)
    _add_export_parser(sub)


def _add_recommend_parser(sub) -> None:
    recommend_parser = sub.add_parser(
        "recommend",
        help="top-K items for users of the dataset or for histories of items",
        formatter_class=HelpFormatter,
        description="Top-K items from one period of a trained run, decoded like the evaluation "
        "(beam search over real item codes). Exit 0: all answered; 1: some users or "
        "items were unknown (named on stderr), the rest answered; 2: nothing answered.",
    )
    recommend_parser.add_argument("run", help="run folder (python -m launcher run ... --run RUN)")
    recommend_parser.add_argument(
        "--period", type=int, help="period whose model answers (default: the last finished one)"
    )
    who = recommend_parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--user",
        nargs="+",
        metavar="ID",
        help="source user ids of the dataset: their items up to the end of the period are the history",
    )
    who.add_argument("--users", metavar="FILE", help="a file of source user ids, one per line")
    who.add_argument(
        "--history",
        action="append",
        metavar="ITEM,ITEM,...",
        help="source item ids, oldest first (repeat for several histories)",
    )
    recommend_parser.add_argument("--k", type=int, default=10, help="items per answer")
    recommend_parser.add_argument(
        "--exclude-seen",
        action="store_true",
        help="leave out the items of the history (the evaluation keeps them, as the paper does)",
    )
    recommend_parser.add_argument("--out", help="write JSON lines here (default: a readable list on stdout)")
    recommend_parser.add_argument(
        "--data", help="the dataset folder, if it moved since training (default: the run's data.path)"
    )
    recommend_parser.add_argument(
        "--device",
        help="cpu, cuda, cuda:1 ..., or auto: spread over the GPUs there are (a model larger than one GPU) "
        "(default: cuda if available)",
    )
    recommend_parser.add_argument("--batch-size", type=int, default=64, help="histories decoded together")


def _add_export_parser(sub) -> None:
    export_parser = sub.add_parser(
        "export",
        help="a self-contained folder of one period's recommender (PEFT adapter or merged)",
        formatter_class=HelpFormatter,
        description="Backbone + adapter (or, with --merged, one plain Hugging Face model), the "
        "tokenizer with the code tokens, the item index and the items table.",
    )
    export_parser.add_argument("run", help="run folder")
    export_parser.add_argument("--period", type=int, help="period to export (default: the last finished one)")
    export_parser.add_argument("--out", required=True, help="the folder to write (replaced if it is an earlier export)")
    export_parser.add_argument(
        "--merged", action="store_true", help="merge the adapter into the backbone (merge_and_unload)"
    )
    export_parser.add_argument(
        "--data", help="the dataset folder, if it moved since training (default: the run's data.path)"
    )
    export_parser.add_argument(
        "--device",
        help="where the model is loaded and merged: cpu, cuda, or auto (spread over the GPUs there are); "
        "the host holds one shard at a time (default: cuda if available)",
    )


def _read_users(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _quiet_loading() -> None:
    """No "Loading weights" bars from transformers, no DeepSpeed accelerator warning."""
    from transformers.utils import logging as hf_logging

    from train.dist.strategy import _quiet_cpu_accelerator

    hf_logging.disable_progress_bar()
    _quiet_cpu_accelerator()  # an export's merge imports DeepSpeed, which would warn that it guessed the CPU


def recommend_command(args) -> int:
    from train.serve.recommender import Recommender, UnknownIdError

    _quiet_loading()
    if args.k < 1:
        print(f"error: --k must be at least 1, got {args.k}", file=sys.stderr)
        return USAGE_EXIT
    try:
        users = args.user or (_read_users(args.users) if args.users else None)
        recommender = Recommender.from_run(args.run, args.period, device=args.device, data=args.data)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    answers, failed = [], 0
    if users is not None:
        histories = recommender.user_histories(users)
        unknown = [u for u in users if u not in histories]
        if unknown:
            failed += len(unknown)
            print(
                f"error: {UnknownIdError('users', unknown)}: not in the dataset, or no items by the end of period "
                f"{recommender.period}; the other {len(users) - len(unknown)} users are answered",
                file=sys.stderr,
            )
        known = [u for u in users if u in histories]
        bar = _progress(len(known), args.batch_size)
        ranked = recommender.top_items(
            [histories[u] for u in known],
            args.k,
            args.batch_size,
            progress=bar.update if bar else None,
            exclude_seen=args.exclude_seen,
        )
        if bar:
            bar.close()
        answers = [
            {"user": user, "history_length": len(histories[user]), "recommendations": recommender.named(items)}
            for user, items in zip(known, ranked)
        ]
    else:
        for text in args.history:
            items = [s.strip() for s in text.split(",") if s.strip()]
            try:
                (ranked,) = recommender.recommend([items], args.k, exclude_seen=args.exclude_seen)
            except UnknownIdError as e:
                failed += 1
                print(f"error: history {text!r}: {e}", file=sys.stderr)
                continue
            answers.append({"history": items, "recommendations": ranked})
    _write(answers, recommender.period, args.out)
    if not answers:
        return USAGE_EXIT
    return PARTIAL_EXIT if failed else 0


def _progress(n: int, batch: int):
    if n <= batch:
        return None
    from tqdm import tqdm

    return tqdm(
        total=n, unit="user", desc="recommend", file=sys.stderr, mininterval=5 if not sys.stderr.isatty() else 0.1
    )


def _write(answers: list[dict], period: int, out: str | None) -> None:
    def record(answer):
        return {
            **{k: v for k, v in answer.items() if k != "recommendations"},
            "period": period,
            "recommendations": [
                {"item": choice.item, "title": choice.title, "score": choice.score}
                for choice in answer["recommendations"]
            ],
        }

    if out:
        from data_tools.atomic import atomic_write_bytes

        atomic_write_bytes(out, "".join(json.dumps(record(answer)) + "\n" for answer in answers).encode())
        print(f"{len(answers)} answers (period {period}) written to {out}")
        return
    for answer in answers:
        who = (
            f"user {answer['user']} (history: {answer['history_length']} items)"
            if "user" in answer
            else f"history {','.join(answer['history'])}"
        )
        width = max((len(choice.item) for choice in answer["recommendations"]), default=0)
        print(f"{who}, period {period}:")
        for rank, choice in enumerate(answer["recommendations"], 1):
            print(f"  {rank:>2}. {choice.item:<{width}}  {choice.score:7.3f}  {choice.title}".rstrip())


def export_command(args) -> int:
    from data_tools.atomic import WriteError
    from train.serve.export import export_recommender

    _quiet_loading()
    try:
        info = export_recommender(args.run, args.out, args.period, args.merged, args.data, args.device)
    except (FileNotFoundError, FileExistsError, ValueError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    print(f"period {info['period']} ({info['method']}) exported to {args.out} ({info['kind']})")
    if info["kind"] == "adapter":
        print(
            f"  load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{args.out}/base'), '{args.out}/adapter')"
        )
    else:
        print(f"  load: AutoModelForCausalLM.from_pretrained('{args.out}')")
    print(
        f"  or:   Recommender.from_export('{args.out}').recommend([[item, ...]], k=10)   (train/serve/recommender.py)"
    )
    return 0
