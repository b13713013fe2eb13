"""`convert`: a review stream (plus item metadata) -> a dataset folder of per-window shards.

One sample's path: a review line -> `formats` parses and validates it -> `stream` orders and
re-numbers it -> `windows` labels its window and makes it a target (with its history) -> here it
is serialized into a shard under windows/NN/, and the manifest counts it.

The folder is built in a staging directory next to `--out` and renamed into place at the end,
so an interrupted conversion never leaves a half-written dataset behind; a rerun whose inputs
(sha256) and parameters match the existing manifest does nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import orjson

from data_tools import __version__
from data_tools.accounting import InputError, Ledger, Skip
from data_tools.atomic import atomic_write_json, written_aside
from data_tools.blocks import read_blocks
from data_tools.dataset import ITEMS, MANIFEST, SCHEMA_VERSION, USERS, load_manifest, window_dir
from data_tools.formats import FORMATS, METAS, REVIEWS, default_max_seconds
from data_tools.progress import progress_bar
from data_tools.shards import write_tar
from data_tools.stream import IdCollector, Stream, first_windows, normalize
from data_tools.textio import LineStream, sha256_file
from data_tools.windows import GROUPS, SPLITS, SplitRule, UserMajor, label_windows, plan_windows


@dataclass
class ConvertOptions:
    format: str
    reviews: str
    out: str
    meta: str | None = None
    index: str | None = None
    split: str = "paper"
    min_interactions: int = 5
    max_history: int = 20
    min_rating: float | None = None
    kcore: int | None = None
    shard_size: int = 20000
    seed: int = 0
    collisions: str = "keep"
    strict: bool = False
    force: bool = False
    progress: bool = True
    workers: int | None = None  # processes writing shards (default: all cores); bytes do not depend on it
    log: object = field(default=sys.stderr, repr=False)

    def parameters(self) -> dict:
        """What determines the output bytes (with the input hashes); a rerun compares these."""
        keep = (
            "format",
            "split",
            "min_interactions",
            "max_history",
            "min_rating",
            "kcore",
            "shard_size",
            "seed",
            "collisions",
            "strict",
        )
        return {k: getattr(self, k) for k in keep}


def _say(opts: ConvertOptions, msg: str) -> None:
    print(msg, file=opts.log, flush=True)


def _validate(opts: ConvertOptions) -> SplitRule:
    if opts.format not in FORMATS:
        raise InputError(f"unknown format {opts.format!r}; choose one of {', '.join(FORMATS)}")
    if opts.format == "blocks":
        if opts.meta:
            raise InputError("--meta is not used with --format blocks (block files carry no item text)")
    else:
        if opts.index:
            raise InputError("--index is only for --format blocks; build an index with `python -m data_tools index`")
        if opts.meta and opts.format not in METAS:
            raise InputError(f"--format {opts.format} has no metadata format")
    for name, v, lo in (
        ("min_interactions", opts.min_interactions, 3),
        ("max_history", opts.max_history, 1),
        ("shard_size", opts.shard_size, 1),
    ):
        if v < lo:
            raise InputError(f"--{name.replace('_', '-')} must be at least {lo}, got {v}")
    return SplitRule("blocks") if opts.format == "blocks" else SplitRule.parse(opts.split)


def _source_paths(opts: ConvertOptions) -> list[str]:
    if opts.format == "blocks":
        from data_tools.blocks import block_files

        return block_files(opts.reviews) + ([opts.index] if opts.index else [])
    return [opts.reviews] + ([opts.meta] if opts.meta else [])


def up_to_date(opts: ConvertOptions) -> dict | None:
    """The existing manifest, if it was made from these very inputs and parameters."""
    try:
        m = load_manifest(opts.out)
    except (FileNotFoundError, ValueError):
        return None
    if m.get("parameters") != opts.parameters():
        return None
    recorded = {os.path.abspath(s["path"]): s for s in m["sources"]}
    paths = _source_paths(opts)
    if set(map(os.path.abspath, paths)) != set(recorded):
        return None
    for p in paths:
        s = recorded[os.path.abspath(p)]
        if os.path.getsize(p) != s["bytes"] or sha256_file(p) != s["sha256"]:
            return None
    for t in range(len(m["windows"])):
        for split in SPLITS:
            for shard in m["windows"][t]["shards"][split]:
                if not os.path.isfile(os.path.join(window_dir(opts.out, t), shard["name"])):
                    return None
    return m


def _read_stream(opts: ConvertOptions, reviews: Ledger, max_seconds: float) -> tuple[Stream, list[dict]]:
    fmt = REVIEWS[opts.format]
    lines = LineStream(opts.reviews, desc="reviews", progress=opts.progress)
    collector = IdCollector()
    collector.read(lines, fmt, reviews, max_seconds)
    if reviews.read == 0:
        raise InputError("the reviews file holds no records", opts.reviews)
    if reviews.kept == 0:
        raise InputError(f"no usable records: {reviews.summary()}", opts.reviews)
    source = {
        "role": "reviews",
        "path": os.path.abspath(opts.reviews),
        "sha256": lines.sha256,
        "bytes": lines.size,
        "format": opts.format,
    }
    stream = normalize(collector, reviews, opts.min_rating, opts.kcore)
    if len(stream) == 0:
        raise InputError(f"no interactions left after filtering: {reviews.summary()}", opts.reviews)
    return stream, [source]


def _read_meta(opts: ConvertOptions, stream: Stream, meta: Ledger) -> tuple[dict, dict]:
    """item dense id -> (title, text), only for items of the stream."""
    parse = METAS[opts.format]
    wanted = {src: i for i, src in enumerate(stream.item_ids)}
    found: dict[int, tuple[str, str]] = {}
    lines = LineStream(opts.meta, desc="metadata", progress=opts.progress)
    for lineno, line in lines:
        if opts.format == "movielens" and lineno == 1:
            continue  # the column header of the atomic file
        meta.read += 1
        try:
            src, title, text = parse(line)
            i = wanted.get(src)
            if i is None:
                raise Skip("unknown_item", src[:40])
            if i in found:
                raise Skip("duplicate_item", src[:40])
        except Skip as s:
            meta.skip(s, opts.meta, lineno)
            continue
        found[i] = (title, text)
        meta.kept += 1
    return found, {
        "role": "meta",
        "path": os.path.abspath(opts.meta),
        "sha256": lines.sha256,
        "bytes": lines.size,
        "format": opts.format,
    }


def _write_id_maps(folder: str, stream: Stream, texts: dict) -> None:
    """items.jsonl (with text and first window) and users.jsonl: dense ids back to source ids."""
    with open(os.path.join(folder, USERS), "wb") as f:
        for u, src in enumerate(stream.user_ids):
            f.write(orjson.dumps({"user_id": u, "source_id": src}) + b"\n")
    with open(os.path.join(folder, ITEMS), "wb") as f:
        for i, src in enumerate(stream.item_ids):
            title, text = texts.get(i, ("", ""))
            f.write(
                orjson.dumps(
                    {
                        "item_id": i,
                        "source_id": src,
                        "title": title,
                        "text": text,
                        "first_window": int(stream.item_first_window[i]),
                    }
                )
                + b"\n"
            )


SAMPLE = b'{"user":%d,"history":%b,"target":%d,"ts":%d,"group":"%b"}'
GROUP_BYTES = [g.encode() for g in GROUPS]


@dataclass(frozen=True)
class _Shard:
    """One shard to write: samples [lo, hi) of window t's split, in stored order."""

    t: int
    split: str
    index: int
    lo: int
    hi: int


# What the shard writers read: set before the worker processes fork, so they share it.
_WRITING: dict = {}


def _write_shard(job: _Shard) -> dict:
    """Serialize one shard. The scalars of all its samples are gathered with numpy first and the
    JSON is formatted directly (the same bytes orjson gives for the dict), so the cost per
    sample stays near a microsecond."""
    by_user, order = _WRITING["by_user"], _WRITING["order"]
    folder, max_history = _WRITING["folder"], _WRITING["max_history"]
    positions, groups = order[(job.t, job.split)]
    targets, target_groups = positions[job.lo : job.hi], groups[job.lo : job.hi]  # user-major positions
    users = by_user.user[targets]
    user_starts = by_user.start[users]
    history_starts = np.maximum(user_starts, targets - max_history)
    # Every history of the shard gathered in one numpy step into one Python list, which each
    # sample then slices: half the cost of slicing the array and converting per sample.
    lengths = targets - history_starts
    ends = np.cumsum(lengths)
    histories = by_user.item[np.repeat(history_starts - (ends - lengths), lengths) + np.arange(ends[-1])].tolist()
    dumps, t = orjson.dumps, job.t
    members = (
        (
            b"%d_%d_%d" % (user, t, target - user_start),
            SAMPLE % (user, dumps(histories[end - length : end]), item, ts, GROUP_BYTES[group]),
        )
        for target, user, user_start, length, end, ts, item, group in zip(
            targets.tolist(),
            users.tolist(),
            user_starts.tolist(),
            lengths.tolist(),
            ends.tolist(),
            by_user.ts[targets].tolist(),
            by_user.item[targets].tolist(),
            target_groups.tolist(),
        )
    )
    return write_tar(os.path.join(window_dir(folder, t), f"{job.split}-{job.index:06d}.tar"), members)


def _default_sigterm() -> None:
    """A writer's first act: SIGTERM back to its default, then no longer blocked (it was blocked
    across the fork, see _shard_writers), so a SIGTERM already sent ends the worker now."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


@contextmanager
def _shard_writers(workers: int):
    """`imap` over `workers` forked processes (the plain `map` for one). Leaving stops them, so
    after a failed shard none is still writing into the folder that is about to be removed."""
    if workers == 1:
        yield map
        return
    # Leaving terminates the pool, which stops its workers with SIGTERM: they must not run a
    # caller's Python SIGTERM handler (a test session's, a trainer's). One that arrives between the
    # fork and the worker's initializer would run it in the child: the SLURM test fixture's raises
    # KeyboardInterrupt, which escapes the child's bootstrap, and the child goes on running the
    # parent's code (seen: a forked copy of pytest waiting on the pool's queue lock forever, and
    # pytest waiting for it in `terminate`). So SIGTERM is blocked across the fork; each worker
    # resets it to the default before unblocking it.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_default_sigterm)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    with pool:
        yield pool.imap


def _write_samples(folder: str, by_user: UserMajor, plans: list, opts: ConvertOptions) -> list[dict]:
    """All shards of all windows, on `opts.workers` processes; training samples in a seeded
    random order (so any contiguous slice a reader takes is a random subset)."""
    order, jobs = {}, []
    for t, plan in enumerate(plans):
        os.makedirs(window_dir(folder, t), exist_ok=True)
        for split in SPLITS:
            positions, groups = plan.targets[split], plan.groups[split]
            if split == "train":
                shuffle = np.random.default_rng([opts.seed, t]).permutation(len(positions))
                positions, groups = positions[shuffle], groups[shuffle]
            order[(t, split)] = (positions, groups)
            jobs += [
                _Shard(t, split, k, lo, min(lo + opts.shard_size, len(positions)))
                for k, lo in enumerate(range(0, len(positions), opts.shard_size))
            ]
    _WRITING.update(by_user=by_user, order=order, folder=folder, max_history=opts.max_history)
    shards = [{split: [] for split in SPLITS} for _ in plans]
    total = sum(j.hi - j.lo for j in jobs)
    workers = max(1, min(opts.workers or os.cpu_count() or 1, len(jobs)))
    if workers > 1 and (threads := threading.active_count()) > 1:
        # fork() copies only the calling thread: a lock that another Python thread holds at that
        # moment (tqdm's, logging's, the import lock) stays held forever in the child, which then
        # hangs (https://github.com/python/cpython/issues/84559). The CLI runs one Python thread
        # (native pools such as OpenBLAS's handle fork themselves); a caller with Python threads
        # (a notebook, a test session) gets the same bytes written here, by one process.
        _say(opts, f"this process runs {threads} threads: writing the shards in it, not in {workers} forked ones")
        workers = 1
    try:
        with (
            progress_bar(total=total, desc="samples", unit="sample", enabled=opts.progress) as bar,
            _shard_writers(workers) as imap,
        ):
            for job, info in zip(jobs, imap(_write_shard, jobs)):
                shards[job.t][job.split].append(info)
                bar.update(info["samples"])
    finally:
        _WRITING.clear()
    return shards


def convert(opts: ConvertOptions) -> dict:
    rule = _validate(opts)
    if not opts.force:
        existing = up_to_date(opts)
        if existing is not None:
            _say(opts, f"{opts.out} is up to date with these inputs and parameters; nothing to do (--force redoes it)")
            return existing
    out = os.path.abspath(opts.out)
    # Inputs are read as InputError, so an OSError here is the output's: a full disk, say.
    with written_aside("cannot write the dataset folder", out) as staging:
        return _build(opts, rule, staging, time.time())


def convert_blocks(blocks: str, out: str, log=sys.stderr) -> str:
    """A folder of PESO-format blocks with its `semantic_ids.json` (the paper's CDs blocks, or a
    slice of them) as a dataset folder at `out`; nothing is redone when `out` is up to date.
    Returns `out`."""
    index = os.path.join(blocks, "semantic_ids.json")
    convert(ConvertOptions(format="blocks", reviews=blocks, index=index, out=out, progress=False, log=log))
    return out


def _build(opts: ConvertOptions, rule: SplitRule, folder: str, t0: float) -> dict:
    max_seconds = default_max_seconds()
    reviews = Ledger("reviews" if opts.format != "blocks" else "block interactions", strict=opts.strict)
    ledgers = [reviews]
    if opts.format == "blocks":
        stream, sources = read_blocks(opts.reviews, reviews, progress=opts.progress)
        spans = [{} for _ in range(int(stream.window.max()) + 1)]
    else:
        stream, sources = _read_stream(opts, reviews, max_seconds)
        stream.window, spans = label_windows(stream.ts, rule)
        stream.item_first_window = first_windows(stream)
    _say(
        opts,
        f"{len(stream):,} interactions, {len(stream.user_ids):,} users, {len(stream.item_ids):,} items, {len(spans)} windows",
    )

    texts: dict = {}
    if opts.meta:
        meta = Ledger("metadata", strict=opts.strict)
        texts, src = _read_meta(opts, stream, meta)
        sources.append(src)
        ledgers.append(meta)
    _write_id_maps(folder, stream, texts)

    index_info = None
    if opts.index:
        from data_tools.index.codes import import_codes, write_item_index

        codes, method = import_codes(opts.index, {s: i for i, s in enumerate(stream.item_ids)}, opts.collisions)
        sources.append(
            {
                "role": "index",
                "path": method["path"],
                "sha256": method["sha256"],
                "bytes": os.path.getsize(opts.index),
                "format": "semantic_ids",
                "items_not_in_data": method["items_not_in_data"],
            }
        )
        if method["items_not_in_data"]:
            _say(opts, f"{opts.index} codes {method['items_not_in_data']:,} items that the data lacks; left out")
        write_item_index(folder, codes, method, codes_per_level=max(256, 1 + max(max(c) for c in codes.values())))
        index_info = method["collisions"]

    by_user = UserMajor(stream)
    plans = plan_windows(by_user, len(spans), stream.item_first_window, opts.min_interactions)
    warnings = []
    for t, plan in enumerate(plans):
        if plan.stats["users"] == 0:
            msg = f"window {t} has no user with at least {opts.min_interactions} interactions: it has no samples"
            if opts.strict:
                raise InputError(msg + " [--strict]")
            warnings.append(msg)
    shards = _write_samples(folder, by_user, plans, opts)
    windows = []
    for t, plan in enumerate(plans):
        atomic_write_json(os.path.join(window_dir(folder, t), "stats.json"), plan.stats)
        windows.append({"index": t, **spans[t], "stats": plan.stats, "shards": shards[t]})
    total = sum(sum(p.stats["samples"].values()) for p in plans)

    for ledger in ledgers:
        ledger.check()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"data_tools {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": sources,
        "parameters": opts.parameters(),
        "split": rule.to_json(),
        "timestamp_unit": "ordinal" if opts.format == "blocks" else "s",
        "future_cutoff": int(max_seconds),
        "accounting": {lg.name: lg.to_json() for lg in ledgers},
        "counts": {
            "interactions": len(stream),
            "users": len(stream.user_ids),
            "items": len(stream.item_ids),
            "items_without_text": len(stream.item_ids) - len(texts),
            "history_only_interactions": stream.notes.get("history_only_interactions", 0),
            "samples": {s: sum(w["stats"]["samples"][s] for w in windows) for s in SPLITS},
        },
        "index_collisions": index_info,
        "warnings": warnings,
        "windows": windows,
    }
    atomic_write_json(os.path.join(folder, MANIFEST), manifest)
    for ledger in ledgers:
        _say(opts, ledger.summary())
    for w in warnings:
        _say(opts, "warning: " + w)
    _say(opts, f"wrote {total:,} samples in {len(windows)} windows to {opts.out} in {time.time() - t0:.1f} s")
    return manifest
