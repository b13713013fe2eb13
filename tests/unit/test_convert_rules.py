"""Split rules on constructed streams, byte-identical reruns, the skip-if-up-to-date rule, and
the reader's exact split over ranks and DataLoader workers."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import subprocess
import sys
import threading

import pytest
import torch.utils.data

from data_tools.accounting import InputError
from data_tools.convert import ConvertOptions, convert
from data_tools.dataset import load_manifest
from data_tools.reader import ReadOrder, window_split
from data_tools.windows import paper_boundaries

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _csv(path, rows):
    """Ratings-only CSV: item,user,rating,timestamp (seconds)."""
    with open(path, "w") as f:
        for item, user, rating, ts in rows:
            f.write(f"{item},{user},{rating},{ts}\n")
    return str(path)


def _options(reviews, out, **kw):
    return ConvertOptions(format="csv", reviews=reviews, out=str(out), progress=False, log=io.StringIO(), **kw)


@pytest.mark.parametrize("n", [1000, 1003, 997])
def test_paper_rule_puts_every_boundary_where_expected(tmp_path, n):
    # One interaction per second, each by a distinct (user, item): window k starts at a known time.
    rows = [(f"i{k % 37}", f"u{k}", 5, 1_600_000_000 + k) for k in range(n)]
    m = convert(_options(_csv(tmp_path / "r.csv", rows), tmp_path / "out"))
    n0 = int(n * 0.6)
    expected = [0, n0] + [n0 + (n - n0) * k // 4 for k in (1, 2, 3)] + [n]
    assert paper_boundaries(n, 0.6, 4) == expected
    spans = [(w["start"], w["end"]) for w in m["windows"]]
    assert spans == list(itertools.pairwise(expected))
    for w, (a, b) in zip(m["windows"], spans):
        assert (w["first_ts"], w["last_ts"]) == (1_600_000_000 + a, 1_600_000_000 + b - 1)


def test_paper_rule_configurable_fraction_and_count(tmp_path):
    rows = [(f"i{k % 7}", f"u{k}", 5, 1_600_000_000 + k) for k in range(100)]
    m = convert(_options(_csv(tmp_path / "r.csv", rows), tmp_path / "out", split="paper:0.5:2"))
    assert [(w["start"], w["end"]) for w in m["windows"]] == [(0, 50), (50, 75), (75, 100)]


def test_calendar_windows_have_fixed_spans(tmp_path):
    day = 86400
    start = 1_600_000_000 // day * day
    rows = [(f"i{k}", f"u{k}", 5, start + k * day + 5) for k in range(30)]  # one per day
    m = convert(_options(_csv(tmp_path / "r.csv", rows), tmp_path / "out", split="calendar:7"))
    # The stream stops inside its fifth week: that window is open, held back (tests/unit/test_append.py).
    assert [(w["start"], w["end"]) for w in m["windows"]] == [(0, 7), (7, 14), (14, 21), (21, 28)]
    assert m["pending"]["interactions"] == 2 and m["closed_until"] == start + 28 * day
    assert all(w["to_time"] - w["from_time"] == 7 * day for w in m["windows"])


def _stream(users=60, per_user=30, seed=1):
    """Users active all along a common year, in shuffled line order."""
    rng = random.Random(seed)
    rows = []
    for u in range(users):
        for _ in range(per_user):
            rows.append(
                (f"i{rng.randrange(200)}", f"u{u}", rng.randrange(1, 6), 1_500_000_000 + rng.randrange(3 * 10**7))
            )
    rng.shuffle(rows)
    return rows


def _tree_digest(root):
    h = {}
    for dirpath, _, files in os.walk(os.path.join(root, "windows")):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                h[os.path.relpath(os.path.join(dirpath, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return h


def test_same_inputs_give_identical_shard_bytes(tmp_path):
    rows = _stream()
    a = _csv(tmp_path / "a.csv", rows)
    b = _csv(tmp_path / "b.csv", list(reversed(rows)))  # input line order does not matter either
    convert(_options(a, tmp_path / "one", shard_size=50))
    convert(_options(b, tmp_path / "two", shard_size=50, workers=1))  # one writer process instead of all cores
    one, two = _tree_digest(tmp_path / "one"), _tree_digest(tmp_path / "two")
    assert len([k for k in one if k.endswith(".tar")]) > 10
    assert one == two
    # another seed reorders the training samples (and only them)
    convert(_options(a, tmp_path / "three", shard_size=50, seed=7))
    three = _tree_digest(tmp_path / "three")
    assert {k for k in one if one[k] != three[k]} and all("train" in k for k in one if one[k] != three[k])


def test_a_process_with_threads_writes_the_shards_itself_with_the_same_bytes(tmp_path):
    """fork() from a process with threads can hang the child: there the writers are not forked.
    The command line (a fresh, single-threaded process) forks its 2 writers; this test session,
    given a thread of its own, writes the same bytes itself."""
    src = _csv(tmp_path / "r.csv", _stream())
    cli = subprocess.run(
        [sys.executable, "-m", "data_tools", "convert", "--format", "csv", "--reviews", src,
         "--out", str(tmp_path / "forked"), "--shard-size", "50", "--workers", "2", "--no-progress"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    assert "forked ones" not in cli.stdout + cli.stderr
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        log = io.StringIO()
        convert(
            ConvertOptions(
                format="csv",
                reviews=src,
                out=str(tmp_path / "here"),
                progress=False,
                log=log,
                shard_size=50,
                workers=2,
            )
        )
    finally:
        stop.set()
        other.join()
    assert "threads: writing the shards in it, not in 2 forked ones" in log.getvalue()
    assert _tree_digest(tmp_path / "here") == _tree_digest(tmp_path / "forked")


def test_rerun_with_same_inputs_does_nothing(tmp_path):
    src = _csv(tmp_path / "r.csv", _stream())
    out = tmp_path / "out"
    convert(_options(src, out))
    stamp = os.stat(out / "manifest.json").st_mtime_ns
    log = io.StringIO()
    opts = _options(src, out)
    opts.log = log
    convert(opts)
    assert "up to date" in log.getvalue()
    assert os.stat(out / "manifest.json").st_mtime_ns == stamp
    convert(_options(src, out, force=True))  # --force redoes it
    assert os.stat(out / "manifest.json").st_mtime_ns != stamp
    stamp = os.stat(out / "manifest.json").st_mtime_ns
    opts = _options(src, out, max_history=5)
    convert(opts)  # another parameter: redone, saying so
    assert "other parameters (max_history 20 -> 5); rebuilding it" in opts.log.getvalue()
    assert load_manifest(str(out))["parameters"]["max_history"] == 5
    with open(src, "a") as f:  # another input: refused too (data_tools append adds reviews)
        f.write("i1,u1,5,1600000000\n")
    with pytest.raises(InputError, match="has changed since"):
        convert(_options(src, out, max_history=5))
    convert(_options(src, out, max_history=5, force=True))
    assert load_manifest(str(out))["accounting"]["reviews"]["read"] == 60 * 30 + 1


class _Rank(torch.utils.data.IterableDataset):
    def __init__(self, root, split, rank, world):
        self.args = (root, 1, split)
        self.rank, self.world = rank, world

    def __iter__(self):
        return iter(window_split(*self.args, ReadOrder(rank=self.rank, world_size=self.world, shuffle_buffer=16)))


@pytest.mark.parametrize("shard_size", [7, 100000])  # many shards, and fewer shards than consumers
def test_two_ranks_two_workers_read_every_sample_once(tmp_path, shard_size):
    src = _csv(tmp_path / "r.csv", _stream(users=40, per_user=100))
    out = str(tmp_path / "out")
    m = convert(_options(src, out, shard_size=shard_size))
    for split in ("train", "test"):
        keys, per_rank = [], []
        for rank in range(2):
            loader = torch.utils.data.DataLoader(_Rank(out, split, rank, 2), batch_size=None, num_workers=2)
            got = [s["key"] for s in loader]
            per_rank.append(len(got))
            keys += got
        total = m["windows"][1]["stats"]["samples"][split]
        assert total > 20
        assert len(keys) == len(set(keys)) == total
        assert abs(per_rank[0] - per_rank[1]) <= 1


def test_reading_a_whole_split_at_once_gives_the_stream_readers_samples(tmp_path):
    import tarfile

    from data_tools.reader import read_split

    out = str(tmp_path / "out")
    m = convert(_options(_csv(tmp_path / "r.csv", _stream()), out, shard_size=50))
    for t in range(len(m["windows"])):
        for split in ("train", "valid", "test"):
            streamed = [{k: v for k, v in s.items() if k != "__key__"} for s in window_split(out, t, split)]
            assert read_split(out, t, split) == streamed
    # A shard that another tool wrote (here with a directory member) is refused, not half read.
    shard = os.path.join(out, "windows", "01", m["windows"][1]["shards"]["test"][0]["name"])
    with tarfile.open(shard, "w") as tf:
        tf.add(str(tmp_path), arcname="folder", recursive=False)
    with pytest.raises(ValueError, match="not a sample"):
        read_split(out, 1, "test")


# The SLURM test fixture's SIGTERM handler, in a script that then opens the shard writers' pool.
RAISING_SIGTERM_HANDLER = (
    "import signal\n"
    "from data_tools.convert import _shard_writers\n"
    "def handler(signum, frame):\n"
    "    raise KeyboardInterrupt\n"
    "signal.signal(signal.SIGTERM, handler)\n"
)


def _run(script: str) -> str:
    """The script's standard output, in a fresh interpreter (it must exit 0)."""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_forked_writers_take_sigterm_by_default_whatever_the_caller_installed():
    """Leaving the writers' pool stops them with SIGTERM. A caller with a Python SIGTERM handler
    (the SLURM test fixture's turns it into KeyboardInterrupt) must not pass it to the workers:
    one of them outlived the pool's terminate and the test session waited for it forever."""
    script = (
        RAISING_SIGTERM_HANDLER + "with _shard_writers(2) as imap:\n"
        "    seen = list(imap(signal.getsignal, [signal.SIGTERM] * 8))\n"
        "print(sorted({h == signal.SIG_DFL for h in seen}))\n"
    )
    assert _run(script).strip() == "[True]"


def test_writers_stopped_while_they_start_end_and_run_none_of_the_callers_code():
    """A SIGTERM can reach a writer between the fork and its initializer. With the caller's Python
    handler still installed there, the handler's KeyboardInterrupt escaped the child's bootstrap
    and the child went on running the caller's code: a second copy of the test session, waiting
    forever on the pool's lock. Pools left at once, many times over: every child ends."""
    script = (
        RAISING_SIGTERM_HANDLER + "import os\n"
        "parent = os.getpid()\n"
        "for _ in range(40):\n"
        "    with _shard_writers(2):\n"
        "        pass\n"
        "print('left', os.getpid() == parent, signal.getsignal(signal.SIGTERM) is handler)\n"
    )
    assert _run(script).splitlines() == ["left True True"]  # one process got there, with its handler kept
