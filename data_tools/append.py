"""`append`: new reviews into an existing calendar dataset, writing only the windows they close.

    python -m data_tools append DATA --reviews new.jsonl.gz [--meta new_meta.jsonl.gz] [--until 2026-12-05]

What it reads: the new files, the dataset's manifest, its id maps (users.jsonl, items.jsonl) and
what the folder keeps for appends (data_tools/history.py: each user's recent items, count and
last window; the held-back interactions of the open windows). It never reads the original
review files again, and never rewrites a closed window: the new folder links the old shards
(hard links; a copy where the file system has none) and the manifest keeps their sha256.

The rules (docs/data.md, "Keeping a dataset fresh"):
- the held-back interactions and the new reviews are ordered, de-duplicated and windowed as one
  conversion would; a window closes once the stream has passed its end (or `--until` has);
- a review dated before the end of the last closed window is late: dropped and counted as
  `late` in the accounting (with the dataset's --strict, an error), never written into a
  closed window;
- users and items get dense ids when their window closes, in stream order, so new users,
  returning (dormant) users and new items are numbered, grouped and given their histories
  exactly as a one-shot conversion of the whole stream would (tests/unit/test_append.py checks
  it byte for byte);
- an item's text comes from the first metadata that names it while it is new or held back;
  items already written keep theirs (`known_item`, counted): their codes were made from it.
- the paper split (fixed fractions of a complete stream) and pre-cut blocks cannot grow: an
  append to them is an error that says so; so is --kcore, which filters the whole stream.

The folder is rebuilt aside (links, the new windows, the rewritten maps and manifest) and renamed
into place, so an interrupted append leaves the dataset as it was. An input appended before
(same sha256) is not read twice; metadata is read each time (a whole catalog works: items that
have their text are counted as `known_item`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import orjson

from data_tools import __version__
from data_tools.accounting import InputError, Ledger
from data_tools.atomic import atomic_write_json, written_aside
from data_tools.convert import (
    ConvertOptions,
    _empty_window_warnings,
    _read_meta,
    _write_samples,
    _write_window_stats,
)
from data_tools.dataset import (
    ITEM_INDEX,
    ITEMS,
    MANIFEST,
    PENDING,
    PENDING_META,
    STREAM_STATE,
    USERS,
    dataset_remedy,
    load_manifest,
)
from data_tools.formats import METAS, REVIEWS, default_max_seconds
from data_tools.history import UserState, read_pending, write_pending
from data_tools.readback import DamagedFile, iter_jsonl
from data_tools.stream import IdCollector, normalize
from data_tools.textio import LineStream, sha256_file
from data_tools.windows import (
    DAY,
    SPLITS,
    UserMajor,
    closed_windows,
    label_calendar,
    parse_until,
    targets_per_window,
    utc,
)

# Rewritten by every append; everything else in the folder is linked as it is.
REWRITTEN = {MANIFEST, USERS, ITEMS, STREAM_STATE, PENDING, PENDING_META}


@dataclass
class AppendOptions:
    data: str
    reviews: str | None = None
    meta: str | None = None
    until: str | None = None
    progress: bool = True
    workers: int | None = None
    log: object = field(default=sys.stderr, repr=False)


def _say(opts: AppendOptions, msg: str) -> None:
    print(msg, file=opts.log, flush=True)


def appendable(manifest: dict, data: str) -> None:
    """Raise an InputError saying why reviews cannot be appended to this dataset, if they cannot."""
    rule = manifest["split"]["rule"]
    if rule == "paper":
        raise InputError(
            f"{data} uses the paper split (the first 60% of a complete stream, then equal-count windows): new "
            "reviews would move every window's boundary under the periods trained on them, so it cannot grow; "
            "a dataset that grows needs calendar windows: convert with --split calendar:DAYS"
        )
    if rule != "calendar":
        raise InputError(f"{data} was converted from pre-cut blocks ({rule}): it cannot grow; convert a review stream")
    if manifest["parameters"].get("kcore"):
        raise InputError(
            f"{data} was converted with --kcore, which filters the whole stream at once: new reviews would change "
            "the closed windows; convert without --kcore to append"
        )
    missing = [f for f in (STREAM_STATE, PENDING, PENDING_META) if not os.path.isfile(os.path.join(data, f))]
    if "closed_until" not in manifest or missing:
        raise InputError(
            f"{data} was converted before appends existed (no {', '.join(missing) or 'closed_until'}): "
            "convert it again with this version (--force), then append"
        )


def _options(manifest: dict, opts: AppendOptions) -> ConvertOptions:
    """The dataset's own conversion parameters, for the shard writers and the metadata reader."""
    p = manifest["parameters"]
    return ConvertOptions(
        format=p["format"],
        reviews=opts.reviews or "",
        out=opts.data,
        meta=opts.meta,
        split=p["split"],
        min_interactions=p["min_interactions"],
        max_history=p["max_history"],
        min_rating=p["min_rating"],
        kcore=None,
        shard_size=p["shard_size"],
        seed=p["seed"],
        collisions=p["collisions"],
        strict=p["strict"],
        progress=opts.progress,
        workers=opts.workers,
        log=opts.log,
    )


def append(opts: AppendOptions) -> dict:
    """Append new reviews (and metadata) to the calendar dataset `opts.data`; returns the new
    manifest. Inputs already appended (same sha256) are not read again."""
    m = load_manifest(opts.data)
    appendable(m, opts.data)
    if opts.meta and m["parameters"]["format"] not in METAS:
        raise InputError(f"--format {m['parameters']['format']} has no metadata format")
    if opts.reviews is None and opts.meta is None and opts.until is None:
        raise InputError("nothing to append: pass --reviews, --meta or --until")
    # Reviews already appended are not read twice (a scheduled job that runs again); metadata
    # always is: a whole catalog passed with every append names each new item.
    seen = {s["sha256"]: s for s in m["sources"] if s["role"] == "reviews"}
    fresh = {}
    for role, path in (("reviews", opts.reviews), ("meta", opts.meta)):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise InputError("no such file", path)
        digest = sha256_file(path) if role == "reviews" else None
        if digest in seen:
            _say(opts, f"{path} was already read into {opts.data} (sha256 of {seen[digest]['path']}); skipped")
        else:
            fresh[role] = path
    if "reviews" not in fresh and opts.until is None and ("meta" not in fresh or not m["pending"]["interactions"]):
        _say(opts, f"{opts.data}: nothing new to append")
        return m
    t0 = time.time()
    with written_aside("cannot write the dataset folder", os.path.abspath(opts.data)) as staging:
        manifest = _append(m, opts, fresh, staging)
    _say(opts, f"appended to {opts.data} in {time.time() - t0:.1f} s")
    return manifest


def _link_folder(src: str, dst: str) -> None:
    """Every file of the dataset `src` (but those an append rewrites, and hidden temporary ones)
    into `dst`: hard links, so closed windows cost nothing and keep their bytes; a copy where the
    file system cannot link."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            if name.startswith(".") or (rel == "." and name in REWRITTEN):
                continue
            a, b = os.path.join(root, name), os.path.join(dst, rel, name)
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)


def _read_map(path: str) -> tuple[dict[str, int], list[int]]:
    """source id -> dense id of users.jsonl or items.jsonl, and each item's first window."""
    ids, first = {}, []
    id_key = "user_id" if os.path.basename(path) == USERS else "item_id"
    how = {"what": f"the dataset's {id_key[:-3]}s", "remedy": dataset_remedy(os.path.dirname(path))}
    for rec in iter_jsonl(path, **how, fields={id_key: int, "source_id": (str, int)}):
        if rec[id_key] != len(ids):
            raise DamagedFile(path, f"has {id_key} {rec[id_key]} at line {len(ids) + 1} (hand-edited?)", **how)
        ids[rec["source_id"]] = len(ids)
        first.append(rec.get("first_window", 0))
    return ids, first


class _Either:
    """`in` either of two containers (the metadata reader's known items)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __contains__(self, key) -> bool:
        return key in self.a or key in self.b


def _read_new(m: dict, opts: AppendOptions, copts: ConvertOptions, fresh: dict, pending_rows: list):
    """The held-back rows and the new reviews as one time-ordered stream (local dense ids), the
    reviews' source record and ledger."""
    ledger = Ledger("reviews", strict=copts.strict)
    collector = IdCollector()
    inf = float("inf")  # held-back rows passed --min-rating when they were read
    for user, item, ts in pending_rows:
        collector.add(user, item, ts, inf)
    sources = []
    if "reviews" in fresh:
        lines = LineStream(fresh["reviews"], desc="reviews", progress=copts.progress)
        collector.read(lines, REVIEWS[copts.format], ledger, default_max_seconds())
        if ledger.read == 0:
            raise InputError("the reviews file holds no records", fresh["reviews"])
        if ledger.kept == 0:  # in the dataset's format? (`--format` is the dataset's own)
            raise InputError(f"no usable records in format {copts.format}: {ledger.summary()}", fresh["reviews"])
        sources.append(
            {
                "role": "reviews",
                "path": os.path.abspath(fresh["reviews"]),
                "sha256": lines.sha256,
                "bytes": lines.size,
                "format": copts.format,
            }
        )
    stream = normalize(collector, ledger, copts.min_rating, None, late_before=m["closed_until"])
    if ledger.dropped.get("late"):
        _say(
            opts,
            f"{ledger.dropped['late']:,} reviews are late (dated before {utc(m['closed_until'])}, the end of the last "
            "closed window): dropped and counted as `late`",
        )
    return stream, sources, ledger


def _global_ids(names: list[str], known: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    """Dense ids of `names` (local ids in order of first appearance): the known ones keep theirs,
    the others get the next ones, in that order. Returns the ids and the new names."""
    ids = np.fromiter((known.get(n, -1) for n in names), dtype=np.int64, count=len(names))
    new = np.flatnonzero(ids < 0)
    ids[new] = len(known) + np.arange(len(new))
    return ids, [names[k] for k in new.tolist()]


def _append(m: dict, opts: AppendOptions, fresh: dict, folder: str) -> dict:
    data = os.path.abspath(opts.data)
    copts = _options(m, opts)
    _link_folder(data, folder)
    user_map, _ = _read_map(os.path.join(data, USERS))
    item_map, item_first = _read_map(os.path.join(data, ITEMS))
    state = UserState.load(data)
    pending_rows, pending_meta = read_pending(data)

    stream, sources, reviews = _read_new(m, opts, copts, fresh, pending_rows)
    ledgers = [reviews] if "reviews" in fresh else []
    local_texts: dict = {}
    if "meta" in fresh:
        copts.meta = fresh["meta"]
        wanted = {src: i for i, src in enumerate(stream.item_ids) if src not in item_map and src not in pending_meta}
        local_texts, source, meta = _read_meta(copts, wanted, _Either(item_map, pending_meta))
        sources.append(source)
        ledgers.append(meta)
    texts = {src: pending_meta[src] for src in stream.item_ids if src in pending_meta}
    texts.update((stream.item_ids[i], text) for i, text in local_texts.items())

    split = m["split"]
    days, origin = split["days"], split["origin"]
    first = len(m["windows"])
    until = parse_until(opts.until)
    horizon = max(m["horizon"], until if until is not None else (int(stream.ts[-1]) if len(stream) else m["horizon"]))
    if len(stream):
        window, spans = label_calendar(stream.ts, origin, days, first, m["counts"]["interactions"])
    else:
        window, spans = np.zeros(0, np.int16), []
    closed = closed_windows(spans, horizon)
    cut = spans[closed - 1]["end"] - m["counts"]["interactions"] if closed else 0

    new_windows, warnings, new_users, new_items = [], [], [], []
    if closed:
        new_windows, warnings, new_users, new_items = _close(
            folder, copts, stream, window, spans[:closed], cut, first, state, user_map, item_map, item_first
        )
    state.save(folder)
    _write_maps(data, folder, new_users, new_items, texts, len(user_map), len(item_map))

    # What stays held back: the rows after the cut, and the metadata of their items.
    uid, iid = stream.user_ids, stream.item_ids
    rows = [
        [uid[u], iid[i], t]
        for u, i, t in zip(stream.user[cut:].tolist(), stream.item[cut:].tolist(), stream.ts[cut:].tolist())
    ]
    written = {src for src, _ in new_items}
    still = {r[1] for r in rows if r[1] not in item_map and r[1] not in written}  # items without an id yet
    closed_until = new_windows[-1]["to_time"] if new_windows else m["closed_until"]
    write_pending(folder, rows, {src: text for src, text in texts.items() if src in still})

    manifest = _updated_manifest(
        m, sources, ledgers, new_windows, warnings, rows, closed_until, horizon, len(new_users), new_items, texts
    )
    atomic_write_json(os.path.join(folder, MANIFEST), manifest)
    _report(opts, ledgers, new_windows, manifest, data)
    return manifest


def _close(folder, copts, stream, window, spans, cut, first, state, user_map, item_map, item_first):
    """Write the windows that closed: the rows [0, cut) of `stream`. Returns their manifest
    entries, warnings, and the new users' and items' source ids (new items with first window)."""
    n_users = int(stream.user[:cut].max()) + 1  # local ids follow first appearance: the closed part's are 0..n-1
    n_items = int(stream.item[:cut].max()) + 1
    user_ids, new_users = _global_ids(stream.user_ids[:n_users], user_map)
    item_ids, new_item_names = _global_ids(stream.item_ids[:n_items], item_map)
    user = user_ids[stream.user[:cut]].astype(np.int32)
    item = item_ids[stream.item[:cut]].astype(np.int32)
    win = window[:cut]
    # A new item's first window: where it first appears (local ids follow first appearance).
    _, first_pos = np.unique(stream.item[:cut], return_index=True)
    local_first = win[first_pos]
    new_local = np.flatnonzero(item_ids >= len(item_map))
    item_first_window = np.concatenate(
        [np.asarray(item_first, dtype=np.int16), local_first[new_local].astype(np.int16)]
    )
    new_items = [(name, int(w)) for name, w in zip(new_item_names, local_first[new_local].tolist())]

    # Each returning user's recent items first, labelled with the window the user was last
    # active in, then the new rows: histories, groups and keys as a one-shot conversion's.
    old_state_users = state.users
    state.grow(old_state_users + len(new_users))
    active = np.unique(user)
    returning = active[active < old_state_users]
    pu, pi, pw = state.prefix(returning)
    rows = SimpleNamespace(
        user=np.concatenate([pu, user]),
        item=np.concatenate([pi, item]),
        ts=np.concatenate([np.zeros(len(pu), np.int64), stream.ts[:cut]]),
        window=np.concatenate([pw, win]),
        user_ids=range(state.users),
    )
    by_user = UserMajor(rows)
    before = state.count - np.minimum(state.count, copts.max_history)
    last = first + len(spans)
    per_window = targets_per_window(by_user, last, item_first_window, copts.min_interactions, first=first)
    warnings = _empty_window_warnings(per_window, copts, first)
    shards = _write_samples(folder, by_user, per_window, copts, first=first, before=before)
    windows = _write_window_stats(folder, per_window, spans, shards, first)
    state.update(by_user, before)
    return windows, warnings, new_users, new_items


def _write_maps(data, folder, new_users, new_items, texts, n_users, n_items) -> None:
    """users.jsonl and items.jsonl: the old ones copied, the new users and items added."""
    for name in (USERS, ITEMS):
        shutil.copyfile(os.path.join(data, name), os.path.join(folder, name))
    with open(os.path.join(folder, USERS), "ab") as f:
        for k, src in enumerate(new_users):
            f.write(orjson.dumps({"user_id": n_users + k, "source_id": src}) + b"\n")
    with open(os.path.join(folder, ITEMS), "ab") as f:
        for k, (src, window) in enumerate(new_items):
            title, text = texts.get(src, ("", ""))
            rec = {"item_id": n_items + k, "source_id": src, "title": title, "text": text, "first_window": window}
            f.write(orjson.dumps(rec) + b"\n")


def _merged_accounting(old: dict, ledgers: list[Ledger]) -> dict:
    """The manifest's `accounting`: every input ever read into the dataset, per kind."""
    out = {
        name: {**a, "dropped": dict(a["dropped"]), "examples": {k: list(v) for k, v in a["examples"].items()}}
        for name, a in old.items()
    }
    for ledger in ledgers:
        a = ledger.to_json()
        total = out.setdefault(ledger.name, {"read": 0, "kept": 0, "dropped": {}, "examples": {}})
        total["read"] += a["read"]
        total["kept"] += a["kept"]
        for k, v in a["dropped"].items():
            total["dropped"][k] = total["dropped"].get(k, 0) + v
        for k, v in a["examples"].items():
            total["examples"][k] = (total["examples"].get(k, []) + v)[:5]
        total["dropped"] = dict(sorted(total["dropped"].items()))
        total["examples"] = dict(sorted(total["examples"].items()))
    return out


def _updated_manifest(
    m, sources, ledgers, new_windows, warnings, rows, closed_until, horizon, added_users, new_items, texts
):
    windows = m["windows"] + new_windows
    counts = dict(m["counts"])
    counts["interactions"] += sum(w["stats"]["all_interactions"] for w in new_windows)
    counts["users"] += added_users
    counts["items"] += len(new_items)
    counts["items_without_text"] += sum(1 for src, _ in new_items if src not in texts)
    counts["samples"] = {s: sum(w["stats"]["samples"][s] for w in windows) for s in SPLITS}
    users, items = {r[0] for r in rows}, {r[1] for r in rows}
    days = m["split"]["days"]
    pending = {
        "interactions": len(rows),
        "users": len(users),
        "items": len(items),
        "first_open_window": (closed_until - m["split"]["origin"]) // (days * DAY),
        "closes_at": closed_until + days * DAY,
    }
    accounting = _merged_accounting(m["accounting"], ledgers)
    kept = accounting["reviews"]["kept"]
    if kept != counts["interactions"] + pending["interactions"]:
        raise AssertionError(
            f"accounting broken: {kept} reviews kept != {counts['interactions']} in closed windows + "
            f"{pending['interactions']} held back"
        )
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_by": f"data_tools {__version__}",
        "sources": sources,
        "accounting": {lg.name: lg.to_json() for lg in ledgers},
        "windows": [w["index"] for w in new_windows],
        "new_users": added_users,
        "new_items": len(new_items),
        "warnings": warnings,
    }
    return {
        **m,
        "sources": m["sources"] + sources,
        "accounting": accounting,
        "counts": counts,
        "warnings": m.get("warnings", []) + warnings,
        "windows": windows,
        "closed_until": closed_until,
        "horizon": horizon,
        "pending": pending,
        "appends": m.get("appends", []) + [record],
    }


def _report(opts: AppendOptions, ledgers, new_windows, manifest, data) -> None:
    for ledger in ledgers:
        _say(opts, ledger.summary())
    for w in manifest["appends"][-1]["warnings"]:
        _say(opts, "warning: " + w)
    if new_windows:
        samples = sum(sum(w["stats"]["samples"].values()) for w in new_windows)
        first, last = new_windows[0]["index"], new_windows[-1]["index"]
        which = f"window {first}" if first == last else f"windows {first}..{last}"
        _say(opts, f"wrote {which}: {samples:,} samples")
        if os.path.isfile(os.path.join(data, ITEM_INDEX)) and manifest["appends"][-1]["new_items"]:
            _say(
                opts,
                f"{manifest['appends'][-1]['new_items']:,} new items: `python -m data_tools index {opts.data}` "
                "gives them codes (existing codes do not change)",
            )
    else:
        _say(opts, "no window closed")
    p = manifest["pending"]
    if p["interactions"]:
        _say(
            opts,
            f"held back: {p['interactions']:,} interactions of window {p['first_open_window']} and later "
            f"(open until the stream passes {utc(p['closes_at'])})",
        )
