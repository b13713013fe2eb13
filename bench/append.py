"""Appending new reviews against converting the whole stream again.

    python bench/append.py [--reviews 2000000 500000] [--slice 100000] [--cache /tmp/peso-bench-append]

Generates (once, cached, deterministic: numpy seed 0) a ratings-only CSV stream (`--format csv`)
of N reviews over two years: sessions of a few reviews by power-law users, items from a catalog
that grows with time. For each N: (a) `convert` of the whole stream (calendar:7), timed; (b)
`convert` of all but its last `--slice` reviews (not timed), then `append` of that slice, timed.
The slice is the same size at every N (100,000 = 1/20 of 2M), so an append whose cost follows
the new reviews takes about the same time at every N, while (a) grows with N. Prints one JSON
line: per N the two times, their ratio and the append's rate. Shards are written by 2 processes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools.append import AppendOptions, append
from data_tools.convert import ConvertOptions, convert

DAY = 86400
START = 1_600_000_000 // DAY * DAY


def stream(n: int) -> np.ndarray:
    """n reviews as rows (item, user, rating, ts), time-ordered: sessions of 1-19 reviews within
    3 days by power-law users, items drawn near the catalog's front, which moves with time."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 20, size=n // 5 + 100)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n) + 1]
    sizes[-1] -= sizes.sum() - n
    starts = np.sort(rng.integers(0, 730 * DAY, size=len(sizes)))
    users = (rng.random(len(sizes)) ** 3 * max(1000, n // 8)).astype(np.int64)  # density ~ x^(-2/3)
    user = np.repeat(users, sizes)
    ts = np.repeat(starts, sizes) + rng.integers(0, 3 * DAY, size=n)
    front = (ts / (730 * DAY) * max(500, n // 30)).astype(np.int64)
    item = np.maximum(0, front - (rng.pareto(1.2, size=n) * 50).astype(np.int64))
    rating = rng.integers(1, 6, size=n)
    order = np.argsort(ts, kind="stable")
    return np.stack([item[order], user[order], rating[order], START + ts[order]], axis=1)


def write_csv(rows: np.ndarray, path: str) -> None:
    with open(path, "w") as f:
        for chunk in range(0, len(rows), 200_000):
            part = rows[chunk : chunk + 200_000]
            f.write("".join(f"i{a},u{b},{c},{d}\n" for a, b, c, d in part.tolist()))


def options(reviews: str, out: str) -> ConvertOptions:
    return ConvertOptions(
        format="csv", reviews=reviews, out=out, split="calendar:7", progress=False, workers=2, log=io.StringIO()
    )


def measure(n: int, slice_: int, cache: str) -> dict:
    rows = stream(n)
    whole, head, tail = (os.path.join(cache, f"{n}-{name}.csv") for name in ("all", "head", "tail"))
    if not os.path.exists(whole):
        write_csv(rows, whole)
        write_csv(rows[:-slice_], head)
        write_csv(rows[-slice_:], tail)
    out = os.path.join(cache, f"{n}-out")
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    one = convert(options(whole, out + "-one"))
    convert_s = time.perf_counter() - t
    before = len(convert(options(head, out))["windows"])
    t = time.perf_counter()
    m = append(AppendOptions(data=out, reviews=tail, progress=False, workers=2, log=io.StringIO()))
    append_s = time.perf_counter() - t
    same = m["windows"] == one["windows"] and m["pending"] == one["pending"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + "-one", ignore_errors=True)
    return {
        "reviews": n,
        "appended": slice_,
        "users": one["counts"]["users"],
        "items": one["counts"]["items"],
        "windows": len(one["windows"]),
        "windows_appended": len(m["windows"]) - before,
        "samples": sum(one["counts"]["samples"].values()),
        "convert_all_s": round(convert_s, 2),
        "append_s": round(append_s, 2),
        "append_over_convert": round(append_s / convert_s, 4),
        "append_reviews_per_s": round(slice_ / append_s),
        "same_windows_as_one_shot": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=int, nargs="+", default=[2_000_000, 500_000])
    parser.add_argument("--slice", type=int, default=100_000, help="reviews appended (default: 1/20 of 2M)")
    parser.add_argument("--cache", default="/tmp/peso-bench-append")
    args = parser.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    results = [measure(n, args.slice, args.cache) for n in args.reviews]
    print(
        json.dumps(
            {
                "bench": "append",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
