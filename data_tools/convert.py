"""`convert`: a review stream (plus item metadata) -> a dataset folder of per-window shards.

One sample's path: a review line -> `formats` parses and validates it -> `stream` orders and
re-numbers it -> `windows` labels its window and makes it a target -> here its history is cut to
`--max-history` items and it is serialized into a shard under windows/NN/ (by forked worker
processes; the bytes do not depend on how many), and the manifest counts it. `--format blocks`
reads data already cut into windows (`blocks`) instead, with its `--index` imported as the
dataset's item_index.json.

The folder is built in a staging directory next to `--out` and renamed into place at the end,
so an interrupted conversion never leaves a half-written dataset behind; a rerun whose inputs
(sha256) and parameters match the existing manifest does nothing, and one whose inputs or
parameters differ is refused without `--force` (`append` adds reviews to a calendar dataset).

Calendar windows close by rule: a window is written once the stream has passed its end (or the
`--until` time has); the interactions of the windows still open are held back, counted, in the
folder (data_tools/history.py) until an append closes them.
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
from data_tools.history import UserState, write_pending
from data_tools.progress import progress_bar
from data_tools.shards import write_tar
from data_tools.stream import IdCollector, Stream, first_windows, normalize
from data_tools.textio import LineStream, sha256_file
from data_tools.windows import (
    GROUPS,
    SPLITS,
    SplitRule,
    UserMajor,
    WindowTargets,
    closed_windows,
    label_windows,
    parse_until,
    targets_per_window,
    utc,
)


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
    until: str | None = None  # calendar split: the stream is complete up to this time (default: its last review)
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
        params = {k: getattr(self, k) for k in keep}
        if self.until is not None:  # only when given: manifests written before --until existed still compare
            params["until"] = parse_until(self.until)
        return params


def _say(opts: ConvertOptions, msg: str) -> None:
    print(msg, file=opts.log, flush=True)


def _validate(opts: ConvertOptions) -> SplitRule:
    if opts.format not in FORMATS:
        raise InputError(f"unknown format {opts.format!r}; choose one of {', '.join(FORMATS)}")
    if opts.until is not None and not opts.split.startswith("calendar"):
        raise InputError("--until is for calendar windows (--split calendar:DAYS): paper and blocks splits are fixed")
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
    return m if _difference(opts, m) is None else None


def _difference(opts: ConvertOptions, m: dict) -> tuple[str, str] | None:
    """How the dataset of manifest `m` differs from what `opts` would make: None (the same),
    ("refuse", why) when its inputs or parameters differ (a rebuild would lose what it holds, or
    move its windows under a run that trained on them), or ("rebuild", why) when only its
    parameters differ (a deliberate other dataset), it is incomplete, or it was made by an
    earlier version of these rules."""
    if m.get("appends"):
        return "refuse", f"{len(m['appends'])} append(s) added reviews to it"
    recorded = {os.path.abspath(s["path"]): s for s in m["sources"]}
    paths = _source_paths(opts)
    if set(map(os.path.abspath, paths)) != set(recorded):
        return "refuse", "other input files"
    for p in paths:
        s = recorded[os.path.abspath(p)]
        if os.path.getsize(p) != s["bytes"] or sha256_file(p) != s["sha256"]:
            return "refuse", f"{p} has changed since it was converted (sha256)"
    params = opts.parameters()
    if m.get("parameters") != params:
        old = m.get("parameters", {})
        changed = sorted(k for k in set(params) | set(old) if params.get(k) != old.get(k))
        what = ", ".join(f"{k} {old.get(k)!r} -> {params.get(k)!r}" for k in changed)
        return "rebuild", f"other parameters ({what})"
    if m["split"]["rule"] == "calendar" and "closed_until" not in m:
        return "rebuild", "its last calendar window was written before windows closed by rule"
    for t in range(len(m["windows"])):
        for split in SPLITS:
            for shard in m["windows"][t]["shards"][split]:
                if not os.path.isfile(os.path.join(window_dir(opts.out, t), shard["name"])):
                    return "rebuild", f"shard {shard['name']} of window {t} is missing"
    return None


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


def _read_meta(opts: ConvertOptions, wanted: dict[str, int], known=frozenset()) -> tuple[dict, dict, Ledger]:
    """`wanted[source id]` -> (title, text) for the items of the stream that `wanted` names; the
    metadata file's source record and its ledger. Items in `known` (an append: items that have
    their text already) are skipped as `known_item`, the others as `unknown_item`."""
    meta = Ledger("metadata", strict=opts.strict)
    parse = METAS[opts.format]
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
                raise Skip("known_item" if src in known else "unknown_item", src[:40])
            if i in found:
                raise Skip("duplicate_item", src[:40])
        except Skip as s:
            meta.skip(s, opts.meta, lineno)
            continue
        found[i] = (title, text)
        meta.kept += 1
    source = {
        "role": "meta",
        "path": os.path.abspath(opts.meta),
        "sha256": lines.sha256,
        "bytes": lines.size,
        "format": opts.format,
    }
    return found, source, meta


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
    folder, max_history, before = _WRITING["folder"], _WRITING["max_history"], _WRITING["before"]
    positions, groups = order[(job.t, job.split)]
    targets, target_groups = positions[job.lo : job.hi], groups[job.lo : job.hi]  # user-major positions
    users = by_user.user[targets]
    user_starts = by_user.start[users]
    # A key's position counts the user's whole stream: an append's rows of a user start after
    # `before[user]` earlier interactions that it does not hold.
    key_starts = user_starts if before is None else user_starts - before[users]
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
            key_starts.tolist(),
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


def _write_samples(
    folder: str,
    by_user: UserMajor,
    per_window: list[WindowTargets],
    opts: ConvertOptions,
    first: int = 0,
    before: np.ndarray | None = None,
) -> list[dict]:
    """All shards of windows `first`.., on `opts.workers` processes; training samples in a seeded
    random order (so any contiguous slice a reader takes is a random subset). `before[user]`:
    the user's interactions before its rows in `by_user` (an append), for the samples' keys."""
    order, jobs = {}, []
    for t, targets in enumerate(per_window, first):
        os.makedirs(window_dir(folder, t), exist_ok=True)
        for split in SPLITS:
            positions, groups = targets.targets[split], targets.groups[split]
            if split == "train":
                shuffle = np.random.default_rng([opts.seed, t]).permutation(len(positions))
                positions, groups = positions[shuffle], groups[shuffle]
            order[(t, split)] = (positions, groups)
            jobs += [
                _Shard(t, split, k, lo, min(lo + opts.shard_size, len(positions)))
                for k, lo in enumerate(range(0, len(positions), opts.shard_size))
            ]
    _WRITING.update(by_user=by_user, order=order, folder=folder, max_history=opts.max_history, before=before)
    shards = [{split: [] for split in SPLITS} for _ in per_window]
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
                shards[job.t - first][job.split].append(info)
                bar.update(info["samples"])
    finally:
        _WRITING.clear()
    return shards


def convert(opts: ConvertOptions) -> dict:
    rule = _validate(opts)
    if not opts.force:
        try:
            existing = load_manifest(opts.out)
        except (FileNotFoundError, ValueError):  # none yet, or one of an older schema: rebuilt
            existing = None
        if existing is not None:
            difference = _difference(opts, existing)
            if difference is None:
                _say(
                    opts,
                    f"{opts.out} is up to date with these inputs and parameters; nothing to do (--force redoes it)",
                )
                return existing
            kind, why = difference
            if kind == "refuse":
                raise InputError(
                    f"{opts.out} already holds a dataset made from other inputs or parameters ({why}); "
                    f"`python -m data_tools append {opts.out} --reviews NEW` adds new reviews to a calendar "
                    "dataset, --force rebuilds it from these inputs alone"
                )
            _say(opts, f"{opts.out}: {why}; rebuilding it")
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
    stream, spans, sources, reviews = _read_interactions(opts, rule, max_seconds)
    ledgers = [reviews]
    texts: dict = {}
    if opts.meta:
        texts, source, meta = _read_meta(opts, {src: i for i, src in enumerate(stream.item_ids)})
        sources.append(source)
        ledgers.append(meta)
    held = None
    if rule.kind == "calendar":
        stream, spans, texts, held = _hold_back(opts, stream, spans, texts)
    _write_id_maps(folder, stream, texts)
    index_info = None
    if opts.index:
        source, index_info = _import_index(opts, stream, folder)
        sources.append(source)

    by_user = UserMajor(stream)
    per_window = targets_per_window(by_user, len(spans), stream.item_first_window, opts.min_interactions)
    warnings = _empty_window_warnings(per_window, opts)
    shards = _write_samples(folder, by_user, per_window, opts)
    windows = _write_window_stats(folder, per_window, spans, shards)
    for ledger in ledgers:
        ledger.check()
    split = rule.to_json()
    if held is not None:
        state = UserState.empty(opts.max_history)
        state.grow(len(stream.user_ids))
        state.update(by_user, np.zeros(state.users, np.int64))
        state.save(folder)
        write_pending(folder, held.rows, held.meta)
        split["origin"] = held.origin
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"data_tools {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": sources,
        "parameters": opts.parameters(),
        "split": split,
        "timestamp_unit": "ordinal" if opts.format == "blocks" else "s",
        "future_cutoff": int(max_seconds),
        "accounting": {lg.name: lg.to_json() for lg in ledgers},
        "counts": _counts(stream, texts, windows),
        "index_collisions": index_info,
        "warnings": warnings,
        "windows": windows,
    }
    if held is not None:
        manifest.update(closed_until=held.closed_until, horizon=held.horizon, pending=held.summary())
        manifest["appends"] = []
    atomic_write_json(os.path.join(folder, MANIFEST), manifest)
    _say_done(opts, ledgers, warnings, windows, t0)
    if held is not None:
        _say(opts, held.message())
    return manifest


@dataclass
class HeldBack:
    """The interactions of the calendar windows still open: kept in the folder, not written."""

    rows: list  # [user source id, item source id, ts], in stream order
    meta: dict  # item source id -> (title, text), for items that appear only in them
    origin: int  # where window 0 starts
    closed_until: int  # the end of the last closed window: an earlier review is late
    horizon: int  # the time up to which the stream is known complete (--until, or its last review)
    days: int

    def summary(self) -> dict:
        """The manifest's `pending`."""
        users = {r[0] for r in self.rows}
        items = {r[1] for r in self.rows}
        first_open = (self.closed_until - self.origin) // (self.days * 86400)
        return {
            "interactions": len(self.rows),
            "users": len(users),
            "items": len(items),
            "first_open_window": int(first_open),
            "closes_at": self.closed_until + self.days * 86400,
        }

    def message(self) -> str:
        s = self.summary()
        if not s["interactions"]:
            return f"every window up to {utc(self.closed_until)} is closed; nothing held back"
        return (
            f"held back: {s['interactions']:,} interactions of window {s['first_open_window']} and later (open: the "
            f"stream has not passed {utc(s['closes_at'])}); `python -m data_tools append` writes them once it has"
        )


def _hold_back(opts: ConvertOptions, stream: Stream, spans: list[dict], texts: dict):
    """The stream cut after its last closed calendar window (a window is closed when its end is
    at or before the horizon: `--until`, or else the last review's time); the rest is held back.
    Dense ids follow first appearance, so the closed part's users and items are exactly ids
    0..n-1 of each: the cut keeps the numbering a conversion of the closed part alone gives."""
    until = parse_until(opts.until)
    horizon = until if until is not None else int(stream.ts[-1])
    closed = closed_windows(spans, horizon)
    if closed == 0:
        raise InputError(
            f"no calendar window has closed yet: the stream ends {utc(int(stream.ts[-1]))}, inside its first window "
            f"({utc(spans[0]['from_time'])} to {utc(spans[0]['to_time'])}); convert once the stream has passed "
            f"{utc(spans[0]['to_time'])}, or pass --until {utc(spans[0]['to_time'])} if it is complete up to then"
        )
    cut = spans[closed - 1]["end"]
    users, items = int(stream.user[:cut].max()) + 1, int(stream.item[:cut].max()) + 1
    uid, iid = stream.user_ids, stream.item_ids
    rows = [
        [uid[u], iid[i], t]
        for u, i, t in zip(stream.user[cut:].tolist(), stream.item[cut:].tolist(), stream.ts[cut:].tolist())
    ]
    held = HeldBack(
        rows=rows,
        meta={iid[i]: text for i, text in texts.items() if i >= items},
        origin=spans[0]["from_time"],
        closed_until=spans[closed - 1]["to_time"],
        horizon=horizon,
        days=(spans[0]["to_time"] - spans[0]["from_time"]) // 86400,
    )
    closed_stream = Stream(
        user=stream.user[:cut], item=stream.item[:cut], ts=stream.ts[:cut], user_ids=uid[:users], item_ids=iid[:items]
    )
    closed_stream.window = stream.window[:cut]
    closed_stream.item_first_window = stream.item_first_window[:items]
    return closed_stream, spans[:closed], {i: text for i, text in texts.items() if i < items}, held


def _read_interactions(
    opts: ConvertOptions, rule: SplitRule, max_seconds: float
) -> tuple[Stream, list[dict], list[dict], Ledger]:
    """The interaction stream with its windows labelled, each window's span, the sources read
    (the reviews file, or each block file) and their ledger."""
    reviews = Ledger("reviews" if opts.format != "blocks" else "block interactions", strict=opts.strict)
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
    return stream, spans, sources, reviews


def _import_index(opts: ConvertOptions, stream: Stream, folder: str) -> tuple[dict, dict]:
    """`--index` (blocks only) imported as the dataset's item_index.json; returns its source
    record and the collision report of the import."""
    from data_tools.index.codes import import_codes, write_item_index

    codes, method = import_codes(opts.index, {s: i for i, s in enumerate(stream.item_ids)}, opts.collisions)
    source = {
        "role": "index",
        "path": method["path"],
        "sha256": method["sha256"],
        "bytes": os.path.getsize(opts.index),
        "format": "semantic_ids",
        "items_not_in_data": method["items_not_in_data"],
    }
    if method["items_not_in_data"]:
        _say(opts, f"{opts.index} codes {method['items_not_in_data']:,} items that the data lacks; left out")
    write_item_index(folder, codes, method, codes_per_level=max(256, 1 + max(max(c) for c in codes.values())))
    return source, method["collisions"]


def _empty_window_warnings(per_window: list[WindowTargets], opts: ConvertOptions, first: int = 0) -> list[str]:
    """A warning per window (`first`..) without samples (an error with --strict)."""
    warnings = []
    for t, targets in enumerate(per_window, first):
        if targets.stats["users"] == 0:
            msg = f"window {t} has no user with at least {opts.min_interactions} interactions: it has no samples"
            if opts.strict:
                raise InputError(msg + " [--strict]")
            warnings.append(msg)
    return warnings


def _write_window_stats(
    folder: str, per_window: list[WindowTargets], spans: list[dict], shards: list[dict], first: int = 0
) -> list:
    """Each window's (`first`..) stats.json; returns the manifest's `windows` entries."""
    windows = []
    for k, targets in enumerate(per_window):
        t = first + k
        atomic_write_json(os.path.join(window_dir(folder, t), "stats.json"), targets.stats)
        windows.append({"index": t, **spans[k], "stats": targets.stats, "shards": shards[k]})
    return windows


def _counts(stream: Stream, texts: dict, windows: list[dict]) -> dict:
    """The manifest's `counts`: of the stream, and of the samples over all windows."""
    return {
        "interactions": len(stream),
        "users": len(stream.user_ids),
        "items": len(stream.item_ids),
        "items_without_text": len(stream.item_ids) - len(texts),
        "history_only_interactions": stream.notes.get("history_only_interactions", 0),
        "samples": {s: sum(w["stats"]["samples"][s] for w in windows) for s in SPLITS},
    }


def _say_done(opts: ConvertOptions, ledgers: list[Ledger], warnings: list[str], windows: list[dict], t0: float) -> None:
    total = sum(sum(w["stats"]["samples"].values()) for w in windows)
    for ledger in ledgers:
        _say(opts, ledger.summary())
    for w in warnings:
        _say(opts, "warning: " + w)
    _say(opts, f"wrote {total:,} samples in {len(windows)} windows to {opts.out} in {time.time() - t0:.1f} s")
