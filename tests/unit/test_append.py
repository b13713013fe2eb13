"""`python -m data_tools append`: a calendar dataset that grows as reviews arrive.

A stream cut into three parts, converted then appended twice, gives the same folder, byte for
byte, as a one-shot conversion of the whole stream (closed windows, id maps, what is held back);
new, dormant and continuing users and new items are in it. Late reviews are counted by name (an
error with --strict), the open window is held back until the stream passes its end or --until
says so, the paper split refuses to grow, an interrupted append leaves the folder as it was, and
`index` after an append codes only the new items."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random

import numpy as np
import pytest

import data_tools.convert
from data_tools.__main__ import main
from data_tools.accounting import InputError
from data_tools.append import AppendOptions, append
from data_tools.atomic import WriteError
from data_tools.convert import ConvertOptions, convert
from data_tools.dataset import load_manifest, window_dir, window_fingerprint

DAY = 86400
BASE = 1_600_000_000 // DAY * DAY
T1, T2 = BASE + 130 * DAY + 7200, BASE + 220 * DAY + 100  # where the stream is cut: mid-window both


def _stream(seed=5):
    """Users in bursts (a few interactions within days, months apart: new, dormant and continuing
    users), items whose range moves with time (new items in every part)."""
    rng = random.Random(seed)
    rows = []
    for u in range(150):
        for _ in range(rng.randrange(1, 4)):
            start = rng.randrange(0, 300) * DAY
            for _ in range(rng.randrange(3, 14)):
                ts = BASE + start + rng.randrange(25 * DAY)
                item = rng.randrange(ts // DAY - BASE // DAY, ts // DAY - BASE // DAY + 40)
                rows.append(
                    {"user_id": f"U{u:03d}", "parent_asin": f"B{item:04d}", "timestamp": ts * 1000, "rating": 4.0}
                )
    rows.append(dict(rows[7]))  # an exact duplicate: counted, in both conversions
    rng.shuffle(rows)
    return rows


def _meta(item: str) -> dict:
    return {"parent_asin": item, "title": f"title of {item}", "categories": ["Music", item[-1]]}


def _jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _parts(tmp_path):
    """The whole stream and its three parts, each with the metadata of the items it reviews first."""
    rows = _stream()
    first_seen = {}
    for r in sorted(rows, key=lambda r: r["timestamp"]):
        first_seen.setdefault(r["parent_asin"], r["timestamp"] // 1000)
    cuts = [(0, T1), (T1, T2), (T2, 10**12)]
    parts = []
    for k, (lo, hi) in enumerate(cuts):
        reviews = [r for r in rows if lo <= r["timestamp"] // 1000 < hi]
        meta = [
            _meta(i) for i, ts in sorted(first_seen.items()) if lo <= ts < hi and not i.endswith("7")
        ]  # some without
        parts.append((_jsonl(tmp_path / f"r{k}.jsonl", reviews), _jsonl(tmp_path / f"m{k}.jsonl", meta)))
    everything = (
        _jsonl(tmp_path / "all.jsonl", rows),
        _jsonl(tmp_path / "all_meta.jsonl", [_meta(i) for i in sorted(first_seen) if not i.endswith("7")]),
    )
    return everything, parts


def _convert(reviews, meta, out, **kw):
    opts = dict(
        format="amazon2023", split="calendar:30", min_interactions=3, shard_size=25, progress=False, log=io.StringIO()
    )
    opts.update(kw)
    return convert(ConvertOptions(reviews=reviews, meta=meta, out=str(out), **opts))


def _append(data, reviews=None, meta=None, **kw):
    return append(AppendOptions(data=str(data), reviews=reviews, meta=meta, progress=False, log=io.StringIO(), **kw))


def _digest(root, skip=("manifest.json",)):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f not in skip:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(dirpath, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("append")
    (all_reviews, all_meta), parts = _parts(tmp)
    one = _convert(all_reviews, all_meta, tmp / "one")
    _convert(*parts[0], tmp / "grown")
    after_first = load_manifest(str(tmp / "grown"))
    first_digest = _digest(tmp / "grown")
    _append(tmp / "grown", *parts[1])
    second_digest = _digest(tmp / "grown")
    _append(tmp / "grown", *parts[2])
    return tmp, one, after_first, first_digest, second_digest, parts


def test_three_parts_appended_twice_equal_a_one_shot_conversion_byte_for_byte(grown):
    tmp, one, after_first, *_ = grown
    m = load_manifest(str(tmp / "grown"))
    assert _digest(tmp / "one") == _digest(tmp / "grown")  # shards, stats, id maps, histories, held back
    for key in ("windows", "counts", "pending", "closed_until", "horizon", "split", "parameters", "warnings"):
        assert m[key] == one[key], key
    assert len(after_first["windows"]) < len(m["windows"]) - 3  # the appends wrote windows of their own
    assert m["appends"][0]["windows"][0] == len(after_first["windows"])
    # What the appends had to get right is there: new, dormant and continuing users, new items.
    appended = m["windows"][len(after_first["windows"]) :]
    for key in ("new_users", "dormant_users", "continuing_users", "new_items"):
        assert sum(w["stats"][key] for w in appended) > 0, key
    assert any(w["stats"]["train_targets_without_history"] for w in appended)
    # Every record accounted for: read = kept + dropped, kept = written + held back.
    reviews = m["accounting"]["reviews"]
    assert reviews["read"] == one["accounting"]["reviews"]["read"] == reviews["kept"] + sum(reviews["dropped"].values())
    assert reviews["dropped"] == {"duplicate": 1}
    assert reviews["kept"] == m["counts"]["interactions"] + m["pending"]["interactions"]
    # Each shard's sha256 is in the manifest (what a run's fingerprint of the window is made of).
    shard = m["windows"][3]["shards"]["train"][0]
    with open(os.path.join(window_dir(str(tmp / "grown"), 3), shard["name"]), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == shard["sha256"]
    assert window_fingerprint(m, 3) == window_fingerprint(one, 3)


def test_an_append_never_rewrites_a_closed_window(grown):
    tmp, _, _, first_digest, second_digest, _ = grown
    final = _digest(tmp / "grown")
    for digest in (first_digest, second_digest):
        closed = {k: v for k, v in digest.items() if k.startswith("windows")}
        assert closed and all(final[k] == v for k, v in closed.items())
    # An input appended before is not read twice.
    _, _, _, _, _, parts = grown
    before = load_manifest(str(tmp / "grown"))
    log = io.StringIO()
    append(AppendOptions(data=str(tmp / "grown"), reviews=parts[2][0], progress=False, log=log))
    assert "already read" in log.getvalue() and load_manifest(str(tmp / "grown")) == before


def test_the_open_window_is_held_back_until_the_stream_passes_its_end_or_until_says_so(tmp_path):
    rows = [
        {"user_id": f"U{k % 9}", "parent_asin": f"B{k % 13}", "timestamp": (BASE + k * 3 * 3600) * 1000, "rating": 5.0}
        for k in range(600)
    ]
    src = _jsonl(tmp_path / "r.jsonl", rows)  # 75 days: windows of 30 days, the third one open
    m = _convert(src, None, tmp_path / "out")
    assert len(m["windows"]) == 2 and not os.path.exists(window_dir(str(tmp_path / "out"), 2))
    in_open = sum(1 for r in rows if r["timestamp"] // 1000 >= BASE + 60 * DAY)
    assert m["pending"]["interactions"] == in_open and m["closed_until"] == BASE + 60 * DAY
    assert m["accounting"]["reviews"]["kept"] == m["counts"]["interactions"] + in_open
    from data_tools.inspect import inspect

    assert f"held back: {in_open:,} interactions of window 2" in inspect(str(tmp_path / "out"))
    # --until closes it without a review after its end; so does `append --until`.
    until = BASE + 90 * DAY
    date = __import__("time").strftime("%Y-%m-%d", __import__("time").gmtime(until))
    m2 = _convert(src, None, tmp_path / "until", until=date)
    assert len(m2["windows"]) == 3 and m2["pending"]["interactions"] == 0
    m3 = _append(tmp_path / "out", until=date)
    assert m3["windows"] == m2["windows"]
    assert _digest(tmp_path / "out") == _digest(tmp_path / "until")
    # Nothing has closed yet: an error that says when it will.
    with pytest.raises(InputError, match="no calendar window has closed yet"):
        _convert(_jsonl(tmp_path / "short.jsonl", rows[:50]), None, tmp_path / "short")


def test_late_reviews_are_counted_by_name_and_refused_with_strict(grown, tmp_path):
    _, _, _, _, _, parts = grown
    data = tmp_path / "late"
    _convert(*parts[0], data)
    m0 = load_manifest(str(data))
    closed = _digest(data)
    late = [
        {"user_id": "U001", "parent_asin": "B0003", "timestamp": (BASE + 5 * DAY + k) * 1000, "rating": 3.0}
        for k in range(3)
    ]
    with open(parts[1][0]) as f:
        new = [json.loads(line) for line in f]
    m = _append(data, _jsonl(tmp_path / "late.jsonl", late + new))
    assert m["appends"][-1]["accounting"]["reviews"]["dropped"]["late"] == 3
    assert m["accounting"]["reviews"]["dropped"]["late"] == 3
    assert all(_digest(data)[k] == v for k, v in closed.items() if k.startswith("windows"))
    assert m["windows"][: len(m0["windows"])] == m0["windows"]
    # The dataset's --strict makes a late review an error: one line, exit 2, nothing written.
    strict = tmp_path / "strict"
    _convert(*parts[0], strict, strict=True)
    before = _digest(strict, skip=())
    assert main(["append", str(strict), "--reviews", str(tmp_path / "late.jsonl"), "--no-progress"]) == 2
    assert _digest(strict, skip=()) == before


def test_the_paper_split_and_kcore_refuse_to_grow_with_one_line(grown, tmp_path, capsys):
    _, _, _, _, _, parts = grown
    _convert(*parts[0], tmp_path / "paper", split="paper")
    assert main(["append", str(tmp_path / "paper"), "--reviews", parts[1][0], "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "paper split" in err and "calendar" in err
    _convert(*parts[0], tmp_path / "kcore", kcore=2)
    assert main(["append", str(tmp_path / "kcore"), "--reviews", parts[1][0], "--no-progress"]) == 2
    assert "--kcore" in capsys.readouterr().err


def test_convert_into_a_dataset_of_other_inputs_is_refused_without_force(grown, tmp_path, capsys):
    _, _, _, _, _, parts = grown
    out = str(tmp_path / "out")
    _convert(*parts[0], out)
    stamp = os.stat(os.path.join(out, "manifest.json")).st_mtime_ns
    args = ["convert", "--format", "amazon2023", "--reviews", parts[1][0], "--out", out, "--split", "calendar:30"]
    args.append("--no-progress")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "append" in err and "--force" in err
    assert os.stat(os.path.join(out, "manifest.json")).st_mtime_ns == stamp
    _append(out, *parts[1])
    with pytest.raises(InputError, match=r"1 append\(s\)"):  # the very same convert, once appended to
        _convert(*parts[0], out)
    with pytest.raises(InputError, match=r"1 append\(s\)"):  # even with other parameters
        _convert(*parts[0], out, max_history=5)
    assert main(args + ["--force"]) == 0


def test_an_interrupted_append_leaves_the_dataset_as_it_was(grown, tmp_path, monkeypatch):
    _, _, _, _, _, parts = grown
    data = tmp_path / "data"
    _convert(*parts[0], data)
    before = _digest(data, skip=())
    real, calls = data_tools.convert.write_tar, []

    def write_tar(path, members):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, members)

    monkeypatch.setattr(data_tools.convert, "write_tar", write_tar)
    with pytest.raises(WriteError, match="No space left on device"):
        _append(data, *parts[1], workers=1)
    assert _digest(data, skip=()) == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_index_after_an_append_codes_only_the_new_items(grown, tmp_path):
    from data_tools.index.build import CodingOptions, build_index
    from data_tools.index.codes import load_item_index

    _, _, _, _, _, parts = grown
    data = str(tmp_path / "data")
    _convert(*parts[0], data)
    m = _append(data, *parts[1])
    items = m["counts"]["items"]
    emb = str(tmp_path / "e.npy")
    np.save(emb, np.random.default_rng(0).standard_normal((items + 500, 16)).astype(np.float32))
    coding = CodingOptions(embedder=f"npy:{emb}", levels=3, codes=32, epochs=20)
    build_index(data, coding, progress=False, log=io.StringIO())
    before = load_item_index(data)
    m = _append(data, *parts[2])
    assert m["counts"]["items"] > items
    np.save(emb, np.random.default_rng(0).standard_normal((items + 500, 16)).astype(np.float32))
    build_index(data, coding, progress=False, log=io.StringIO())
    after = load_item_index(data)
    old = {k: v for k, v in after["items"].items() if int(k) < items}
    assert old == before["items"] and len(after["items"]) == m["counts"]["items"]


def test_a_window_that_changed_under_a_finished_period_stops_the_run_with_one_line(grown, tmp_path, capsys):
    from launcher.__main__ import main as launcher_main
    from launcher.periods import remaining_periods
    from train.common.run_folder import DatasetChanged, RunFolder
    from train.main import main as train_main

    _, _, _, _, _, parts = grown
    data, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
    m = _convert(*parts[0], data)
    run = RunFolder(run_dir)
    for t in (0, 1):  # what train/main.py records as each period starts
        run.record_window(t, m, data)
    run.save_state(done=[0, 1], phase="done", period=1)
    assert remaining_periods(data, run_dir) == list(range(2, len(m["windows"])))
    m = _append(data, *parts[1])  # closed windows unchanged: the run goes on with the new periods
    assert remaining_periods(data, run_dir) == list(range(2, len(m["windows"])))

    _convert(*parts[1], data, force=True)  # the folder rebuilt from other reviews under the run
    with open(os.path.join(data, "item_index.json"), "w") as f:
        f.write("{}")  # present: the period's checks reach the windows
    with pytest.raises(DatasetChanged, match=r"window 0 of .* has changed since period 0 .* finished"):
        remaining_periods(data, run_dir)
    capsys.readouterr()
    assert launcher_main(["run", "--config", "configs/tiny.yaml", "--data", data, "--run", run_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: window 0 of") and "new run folder" in err
    args = ["--ds_config", "ds_configs/zero2.json", "--config", "configs/tiny.yaml", "--data", data, "--run", run_dir]
    assert train_main(args) == 2
    assert capsys.readouterr().err.strip() == err

    # A period that started (not finished) on a window that changed: --restart-period trains it again.
    run.save_state(done=[])
    with open(run.window_record_path(0), "w") as f:
        json.dump({"window": 0, "fingerprint": "0" * 64, "data": data}, f)
    with pytest.raises(DatasetChanged, match="add --restart-period"):
        run.check_windows(load_manifest(data), data)
    run.check_windows(load_manifest(data), data, restart=True)


def test_the_fresh_demo_converts_appends_twice_and_trains_a_period_after_each(tmp_path, capsys):
    """`python -m launcher demo --fresh`, shrunk: 3 steps a period, 1 rank, random embeddings."""
    from data_tools.index.build import CodingOptions, build_index
    from launcher.fresh import run_fresh

    emb = str(tmp_path / "e.npy")
    np.save(emb, np.random.default_rng(0).standard_normal((1700, 16)).astype(np.float32))  # MovieLens: 1,682 items
    coding = CodingOptions(embedder=f"npy:{emb}", levels=3, codes=32, epochs=20)

    def index(data):
        build_index(data, coding, progress=False, log=io.StringIO())

    overrides = ["schedule.max_steps=3", "schedule.period0_epochs=1", "schedule.epochs=1", "eval.max_users=8"]
    workdir = str(tmp_path / "demo")
    run_fresh(workdir, nproc=1, overrides=overrides, index=index)
    out = capsys.readouterr().out
    for k, period in ((1, 0), (2, 1), (3, 2)):
        assert f"arrival {k}: trained period(s) [{period}]" in out
    m = load_manifest(os.path.join(workdir, "data", "ml-100k-fresh"))
    assert len(m["windows"]) == 3 and len(m["appends"]) == 2 and m["pending"]["interactions"] > 0
    with open(os.path.join(workdir, "runs", "fresh", "state.json")) as f:
        assert json.load(f)["done"] == [0, 1, 2]
    run_fresh(workdir, nproc=1, overrides=overrides, index=index)  # a rerun: nothing to redo
    out = capsys.readouterr().out
    assert out.count("trained period(s) none (no new window)") == 3


def test_an_append_of_a_file_in_another_format_is_one_line(grown, tmp_path, capsys):
    _, _, _, _, _, parts = grown
    data = str(tmp_path / "data")
    _convert(*parts[0], data)
    other = tmp_path / "other.csv"
    other.write_text("i1,u1,5,1700000000\n")
    assert main(["append", data, "--reviews", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no usable records in format amazon2023" in err
    assert main(["append", data, "--until", "tomorrow"]) == 2
    assert "bad --until 'tomorrow'" in capsys.readouterr().err
