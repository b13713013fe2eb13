"""`python -m launcher recommend` and `python -m launcher export`: a trained run's recommendations,
and a self-contained folder of one period's recommender (train/recommender.py,
train/export_recommender.py do the work; this is the command line around them)."""

from __future__ import annotations

import json
import sys

from data_tools.help_format import HelpFormatter

USAGE_EXIT = 2  # nothing could be answered (bad arguments, no such run or period)
PARTIAL_EXIT = 1  # some users or histories were unknown; the others were answered


def add_parsers(sub) -> None:
    r = sub.add_parser(
        "recommend",
        help="top-K items for users of the dataset or for histories of items",
        formatter_class=HelpFormatter,
        description="Top-K items from one period of a trained run, decoded like the evaluation "
        "(beam search over real item codes). Exit 0: all answered; 1: some users or "
        "items were unknown (named on stderr), the rest answered; 2: nothing answered.",
    )
    r.add_argument("run", help="run folder (python -m launcher run ... --run RUN)")
    r.add_argument("--period", type=int, help="period whose model answers (default: the last finished one)")
    who = r.add_mutually_exclusive_group(required=True)
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
    r.add_argument("--k", type=int, default=10, help="items per answer")
    r.add_argument(
        "--exclude-seen",
        action="store_true",
        help="leave out the items of the history (the evaluation keeps them, as the paper does)",
    )
    r.add_argument("--out", help="write JSON lines here (default: a readable list on stdout)")
    r.add_argument("--data", help="the dataset folder, if it moved since training (default: the run's data.path)")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--batch-size", type=int, default=64, help="histories decoded together")

    e = sub.add_parser(
        "export",
        help="a self-contained folder of one period's recommender (PEFT adapter or merged)",
        formatter_class=HelpFormatter,
        description="Backbone + adapter (or, with --merged, one plain Hugging Face model), the "
        "tokenizer with the code tokens, the item index and the items table.",
    )
    e.add_argument("run", help="run folder")
    e.add_argument("--period", type=int, help="period to export (default: the last finished one)")
    e.add_argument("--out", required=True, help="the folder to write (replaced if it is an earlier export)")
    e.add_argument("--merged", action="store_true", help="merge the adapter into the backbone (merge_and_unload)")
    e.add_argument("--data", help="the dataset folder, if it moved since training (default: the run's data.path)")


def _read_users(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _quiet_loading() -> None:
    """No "Loading weights" bars from transformers, no DeepSpeed accelerator warning."""
    from transformers.utils import logging as hf_logging

    from train.strategy import _quiet_cpu_accelerator

    hf_logging.disable_progress_bar()
    _quiet_cpu_accelerator()  # an export's merge imports DeepSpeed, which would warn that it guessed the CPU


def recommend_command(a) -> int:
    from train.recommender import Recommender, UnknownIdError

    _quiet_loading()
    if a.k < 1:
        print(f"error: --k must be at least 1, got {a.k}", file=sys.stderr)
        return USAGE_EXIT
    try:
        users = a.user or (_read_users(a.users) if a.users else None)
        rec = Recommender.from_run(a.run, a.period, device=a.device, data=a.data)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    answers, failed = [], 0
    if users is not None:
        histories = rec.user_histories(users)
        unknown = [u for u in users if u not in histories]
        if unknown:
            failed += len(unknown)
            print(
                f"error: {UnknownIdError('users', unknown)}: not in the dataset, or no items by the end of period "
                f"{rec.period}; the other {len(users) - len(unknown)} users are answered",
                file=sys.stderr,
            )
        known = [u for u in users if u in histories]
        bar = _progress(len(known), a.batch_size)
        ranked = rec.top_items(
            [histories[u] for u in known],
            a.k,
            a.batch_size,
            progress=bar.update if bar else None,
            exclude_seen=a.exclude_seen,
        )
        if bar:
            bar.close()
        answers = [
            {"user": u, "history_length": len(histories[u]), "recommendations": rec.named(r)}
            for u, r in zip(known, ranked)
        ]
    else:
        for text in a.history:
            items = [s.strip() for s in text.split(",") if s.strip()]
            try:
                (ranked,) = rec.recommend([items], a.k, exclude_seen=a.exclude_seen)
            except UnknownIdError as e:
                failed += 1
                print(f"error: history {text!r}: {e}", file=sys.stderr)
                continue
            answers.append({"history": items, "recommendations": ranked})
    _write(answers, rec.period, a.out)
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
    def record(a):
        return {
            **{k: v for k, v in a.items() if k != "recommendations"},
            "period": period,
            "recommendations": [{"item": r.item, "title": r.title, "score": r.score} for r in a["recommendations"]],
        }

    if out:
        from data_tools.dataset import atomic_write_bytes

        atomic_write_bytes(out, "".join(json.dumps(record(a)) + "\n" for a in answers).encode())
        print(f"{len(answers)} answers (period {period}) written to {out}")
        return
    for a in answers:
        who = (
            f"user {a['user']} (history: {a['history_length']} items)"
            if "user" in a
            else f"history {','.join(a['history'])}"
        )
        width = max((len(r.item) for r in a["recommendations"]), default=0)
        print(f"{who}, period {period}:")
        for n, r in enumerate(a["recommendations"], 1):
            print(f"  {n:>2}. {r.item:<{width}}  {r.score:7.3f}  {r.title}".rstrip())


def export_command(a) -> int:
    from data_tools.dataset import WriteError
    from train.export_recommender import export_recommender

    _quiet_loading()
    try:
        info = export_recommender(a.run, a.out, a.period, a.merged, a.data)
    except (FileNotFoundError, FileExistsError, ValueError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    print(f"period {info['period']} ({info['method']}) exported to {a.out} ({info['kind']})")
    if info["kind"] == "adapter":
        print(
            f"  load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{a.out}/base'), '{a.out}/adapter')"
        )
    else:
        print(f"  load: AutoModelForCausalLM.from_pretrained('{a.out}')")
    print(f"  or:   Recommender.from_export('{a.out}').recommend([[item, ...]], k=10)   (train/recommender.py)")
    return 0
