"""Conversion speed and memory against the cost of merely reading the same file.

    python bench/data_convert.py [--reviews 2000000] [--cache /tmp/peso-bench]

Generates (once, cached) an Amazon-Reviews-2023-format gzip file of N reviews: realistic fields
and text lengths, power-law users and items, ten years of timestamps. Then, in one run and in
separate child processes: (a) only decompress and parse every line with orjson, the fastest
thing any converter must do; (b) the full `data_tools convert` (validate, order, window, write
all shards and the manifest). Prints one JSON line with both rates, their ratio (goal >= 0.5)
and the conversion's peak memory per interaction (goal < 100 bytes, measured as the growth of
the child's max RSS over its RSS after imports).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import orjson

WORDS = [
    "the",
    "a",
    "this",
    "album",
    "sound",
    "great",
    "love",
    "music",
    "track",
    "vinyl",
    "record",
    "band",
    "song",
    "guitar",
    "voice",
    "best",
    "classic",
    "listen",
    "again",
    "quality",
    "pressing",
    "heard",
    "songs",
    "favorite",
    "recommend",
    "beautiful",
    "live",
    "production",
    "mix",
    "old",
    "new",
    "first",
    "five",
    "stars",
]


def generate(path: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items = max(1, n // 5), max(1, n // 20)
    # Power-law activity: a few heavy users and popular items, a long tail of both.
    users = np.minimum(rng.zipf(1.6, n) - 1, n_users - 1)
    users = rng.permutation(n_users)[users]
    items = rng.permutation(n_items)[np.minimum(rng.zipf(1.4, n) - 1, n_items - 1)]
    start, span = 1_420_070_400_000, 10 * 365 * 86_400_000
    # Each user is active around a centre of their own, so windows have returning users.
    centre = rng.integers(0, span, n_users)
    ts = start + np.clip(centre[users] + rng.normal(0, span / 12, n).astype(np.int64), 0, span - 1)
    ratings = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], n, p=[0.05, 0.05, 0.1, 0.2, 0.6])
    lengths = rng.integers(3, 80, n)
    word_idx = rng.integers(0, len(WORDS), int(lengths.sum()))
    from data_tools.atomic import replaced_on_close

    with replaced_on_close(path) as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as f:
        off = 0
        buf = []
        for k in range(n):
            text = " ".join(WORDS[j] for j in word_idx[off : off + lengths[k]])
            off += lengths[k]
            buf.append(
                orjson.dumps(
                    {
                        "rating": float(ratings[k]),
                        "title": text[:30],
                        "text": text,
                        "images": [],
                        "asin": f"B{items[k]:09d}",
                        "parent_asin": f"B{items[k]:09d}",
                        "user_id": f"AG{users[k]:026d}",
                        "timestamp": int(ts[k]),
                        "helpful_vote": int(k % 7),
                        "verified_purchase": bool(k % 3),
                    }
                )
            )
            if len(buf) == 10000:
                f.write(b"\n".join(buf) + b"\n")
                buf = []
        if buf:
            f.write(b"\n".join(buf) + b"\n")


CHILD_PARSE = """
import gzip, resource, sys, time, orjson
t = time.perf_counter(); n = 0
for line in gzip.open(sys.argv[1], "rb"):
    orjson.loads(line); n += 1
print(n, time.perf_counter() - t)
"""

CHILD_CONVERT = """
import io, sys, time
from data_tools.convert import ConvertOptions, convert
def hwm_kb():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, across exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm_kb()
t = time.perf_counter()
m = convert(ConvertOptions(format="amazon2023", reviews=sys.argv[1], out=sys.argv[2], force=True, progress=False, log=io.StringIO()))
dt = time.perf_counter() - t
peak = hwm_kb()
print(m["accounting"]["reviews"]["read"], dt, base, peak, m["counts"]["interactions"], sum(m["counts"]["samples"].values()))
"""


def main() -> None:
    from data_tools.help_format import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--reviews", type=int, default=2_000_000, help="reviews in the generated input file")
    ap.add_argument(
        "--cache",
        default=os.environ.get("PESO_BENCH_CACHE", "/tmp/peso-bench"),
        help="where the input and outputs are kept between runs ($PESO_BENCH_CACHE)",
    )
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    src = os.path.join(a.cache, f"amazon2023-{a.reviews}.jsonl.gz")
    if not os.path.exists(src):
        t = time.perf_counter()
        generate(src, a.reviews)
        print(f"generated {src} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    out = subprocess.run(
        [sys.executable, "-c", CHILD_PARSE, src], capture_output=True, text=True, check=True
    ).stdout.split()
    parse_n, parse_s = int(out[0]), float(out[1])
    out = subprocess.run(
        [sys.executable, "-c", CHILD_CONVERT, src, os.path.join(a.cache, "converted")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    conv_n, conv_s, base_kb, peak_kb, interactions, samples = (
        int(out[0]),
        float(out[1]),
        int(out[2]),
        int(out[3]),
        int(out[4]),
        int(out[5]),
    )
    assert conv_n == parse_n
    print(
        json.dumps(
            {
                "bench": "data_convert",
                "reviews": parse_n,
                "file_mb": round(os.path.getsize(src) / 2**20, 1),
                "interactions": interactions,
                "samples": samples,
                "parse_only_per_s": round(parse_n / parse_s),
                "convert_per_s": round(conv_n / conv_s),
                "ratio_convert_to_parse": round(parse_s / conv_s, 3),
                "peak_bytes_per_interaction": round((peak_kb - base_kb) * 1024 / interactions, 1),
                "peak_rss_mb": round(peak_kb / 1024),
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
