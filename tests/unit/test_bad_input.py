"""The bad-input corpus: each case is a counted skip with its reason in the manifest, or a clear
error naming the file (and line); --strict turns skips into errors; the accounting identity holds."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest

from data_tools.accounting import InputError, Ledger
from data_tools.blocks import read_blocks
from data_tools.convert import ConvertOptions, convert
from data_tools.formats import MOVIELENS_INTER_HEADER
from data_tools.textio import BOM, CHUNK, LineStream

MS = 1_600_000_000_000  # a plausible Amazon 2023 timestamp, in milliseconds


def review(user="u1", item="i1", ts=MS, rating=5.0, **extra):
    rec = {"user_id": user, "parent_asin": item, "timestamp": ts, "rating": rating, **extra}
    return {k: v for k, v in rec.items() if v is not ...}


def good_stream(users=12, per_user=12):
    """Enough clean reviews that every window has eligible users."""
    return [
        review(f"u{u}", f"i{(u * 7 + k) % 40}", MS + (k * users + u) * 60_000)
        for k in range(per_user)
        for u in range(users)
    ]


def write_lines(path, lines, gz=False, bom=False):
    data = (BOM if bom else b"") + b"".join(
        (x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines
    )
    if gz:
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def run(tmp_path, lines, fmt="amazon2023", meta=None, strict=False, **kw):
    src = write_lines(tmp_path / "reviews.jsonl", lines)
    meta_path = write_lines(tmp_path / "meta.jsonl", meta) if meta is not None else None
    m = convert(
        ConvertOptions(
            format=fmt,
            reviews=src,
            meta=meta_path,
            out=str(tmp_path / "out"),
            strict=strict,
            progress=False,
            log=io.StringIO(),
            **kw,
        )
    )
    for a in m["accounting"].values():
        assert a["read"] == a["kept"] + sum(a["dropped"].values())
    return m


BAD_RECORDS = [
    ("not_utf8", b'{"user_id": "u\xff\xfe", "parent_asin": "i1", "timestamp": 1600000000000}'),
    ("not_json", b'{"user_id": "u1", "parent_asin": '),
    ("not_an_object", b"[1, 2, 3]"),
    ("blank_line", b"   "),
    ("missing_user", review(user=...)),
    ("missing_item", review(item=...)),
    ("missing_timestamp", review(ts=...)),
    ("user_not_a_string", review(user=17)),
    ("timestamp_not_a_number", review(ts="1600000000000")),
    ("rating_not_a_number", review(rating="five")),
    ("timestamp_not_positive", review(ts=0)),
    ("timestamp_not_positive", review(ts=-5)),
    ("timestamp_in_future", review(ts=4_102_444_800_000 * 10)),  # far beyond now
    ("timestamp_in_seconds_not_ms", review(ts=1_600_000_000)),
]


@pytest.mark.parametrize("reason,line", BAD_RECORDS, ids=[r for r, _ in BAD_RECORDS])
def test_bad_record_is_a_counted_skip_or_a_strict_error(tmp_path, reason, line):
    lines = good_stream()
    lines.insert(5, line)
    m = run(tmp_path, lines)
    a = m["accounting"]["reviews"]
    assert a["dropped"] == {reason: 1}
    assert a["read"] == len(lines) and a["kept"] == len(lines) - 1
    assert a["examples"][reason][0].startswith(str(tmp_path / "reviews.jsonl") + ":6")
    with pytest.raises(InputError, match=rf"reviews.jsonl:6: {reason}"):
        run(tmp_path, lines, strict=True)


def test_exact_duplicates_are_dropped_and_counted(tmp_path):
    lines = good_stream()
    lines += lines[:3]
    m = run(tmp_path, lines)
    assert m["accounting"]["reviews"]["dropped"] == {"duplicate": 3}
    assert m["counts"]["interactions"] == len(lines) - 3
    with pytest.raises(InputError, match="3 duplicate"):
        run(tmp_path, lines, strict=True)


def test_truncated_gzip_names_file_and_line(tmp_path):
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in good_stream()))
    path = tmp_path / "reviews.jsonl.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match=r"reviews.jsonl.gz:\d+: corrupt or truncated gzip"):
        convert(
            ConvertOptions(
                format="amazon2023", reviews=str(path), out=str(tmp_path / "o"), progress=False, log=io.StringIO()
            )
        )
    assert not os.path.exists(tmp_path / "o")  # nothing half-written


def test_gzip_input_converts_like_plain(tmp_path):
    lines = good_stream()
    src = write_lines(tmp_path / "r.jsonl.gz", lines, gz=True)
    m = convert(
        ConvertOptions(format="amazon2023", reviews=src, out=str(tmp_path / "o"), progress=False, log=io.StringIO())
    )
    assert m["accounting"]["reviews"]["kept"] == len(lines)


def test_empty_file_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"reviews.jsonl: the reviews file holds no records"):
        run(tmp_path, [])


def test_only_bad_records_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no usable records"):
        run(tmp_path, [b"nope", review(ts="x")])


def test_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="unknown format 'yelp'"):
        run(tmp_path, good_stream(), fmt="yelp")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools",
            "convert",
            "--format",
            "yelp",
            "--reviews",
            "x",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "argument --format: invalid choice: 'yelp' (choose from 'amazon2023'" in proc.stderr


def test_missing_input_file_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"nope\.jsonl: no such file"):
        convert(
            ConvertOptions(
                format="amazon2023", reviews=str(tmp_path / "nope.jsonl"), out=str(tmp_path / "o"), progress=False
            )
        )


def test_items_without_metadata_and_metadata_of_unknown_items(tmp_path):
    lines = good_stream()
    items = sorted({r["parent_asin"] for r in lines})
    meta = [
        {"parent_asin": i, "title": f"Album {i}", "categories": ["CDs"], "description": ["loud"]} for i in items[:-2]
    ]
    meta += [{"parent_asin": "never-reviewed", "title": "x"}, meta[0], b"{broken"]
    m = run(tmp_path, lines, meta=meta)
    a = m["accounting"]["metadata"]
    assert a["dropped"] == {"unknown_item": 1, "duplicate_item": 1, "not_json": 1}
    assert a["kept"] == len(items) - 2
    assert m["counts"]["items_without_text"] == 2
    with open(tmp_path / "out" / "items.jsonl") as f:
        rows = [json.loads(x) for x in f]
    texts = {r["source_id"]: r["text"] for r in rows}
    assert texts[items[0]] == f"Album {items[0]}; CDs; loud" and texts[items[-1]] == ""


def test_window_with_no_eligible_user_is_reported(tmp_path):
    # Dense activity early; the last window holds only users with fewer than 5 interactions.
    lines = [review(f"u{u}", f"i{k}", MS + (k * 10 + u) * 1000) for k in range(20) for u in range(10)]
    lines += [review(f"late{k}", f"i{k}", MS + 10**9 + k * 1000) for k in range(500)]
    m = run(tmp_path, lines, split="paper:0.3:2")
    assert m["windows"][-1]["stats"]["users"] == 0
    assert m["windows"][-1]["shards"]["train"] == []
    assert [w.split(" has")[0] for w in m["warnings"]] == ["window 1", "window 2"]
    with pytest.raises(InputError, match="window 1 has no user"):
        run(tmp_path, lines, split="paper:0.3:2", strict=True)


def test_amazon2018_seconds_and_milliseconds(tmp_path):
    lines = [
        {"reviewerID": r["user_id"], "asin": r["parent_asin"], "unixReviewTime": r["timestamp"] // 1000, "overall": 4.0}
        for r in good_stream()
    ]
    lines.insert(3, {"reviewerID": "u1", "asin": "i1", "unixReviewTime": MS, "overall": 4.0})
    m = run(tmp_path, lines, fmt="amazon2018")
    assert m["accounting"]["reviews"]["dropped"] == {"timestamp_in_ms_not_seconds": 1}


def test_amazon2014_metadata_is_parsed_without_eval(tmp_path):
    lines = [
        {"reviewerID": r["user_id"], "asin": r["parent_asin"], "unixReviewTime": r["timestamp"] // 1000, "overall": 4.0}
        for r in good_stream()
    ]
    marker = tmp_path / "pwned"
    meta = [
        repr({"asin": "i1", "title": "Kind of Blue", "categories": [["CDs", "Jazz"]]}).encode(),
        f"__import__('os').system('touch {marker}')".encode(),
        b"{'asin': 'i2', 'title': 'Blue Train', 'salesRank': {'Music': 12}}",
    ]
    m = run(tmp_path, lines, fmt="amazon2014", meta=meta)
    assert not marker.exists()
    assert m["accounting"]["metadata"]["dropped"] == {"not_a_python_literal": 1}
    with open(tmp_path / "out" / "items.jsonl") as f:
        texts = {r["source_id"]: r["text"] for r in map(json.loads, f)}
    assert texts["i1"] == "Kind of Blue; CDs Jazz" and texts["i2"] == "Blue Train"


def test_filters_are_counted(tmp_path):
    lines = good_stream()
    lines[0]["rating"] = 1.0
    lines[1]["rating"] = None
    m = run(tmp_path, lines, min_rating=3.0, kcore=3)
    dropped = m["accounting"]["reviews"]["dropped"]
    assert dropped["below_min_rating"] == 1 and dropped["rating_missing"] == 1
    assert m["counts"]["interactions"] == len(lines) - sum(dropped.values())


def _in_format(fmt: str) -> tuple[list, list | None]:
    """good_stream's reviews, and metadata for its items, in the layout of `fmt`."""
    stream = good_stream()
    items = sorted({r["parent_asin"] for r in stream})
    if fmt == "amazon2023":
        return stream, [{"parent_asin": i, "title": f"Album {i}"} for i in items]
    older = [
        {"reviewerID": r["user_id"], "asin": r["parent_asin"], "unixReviewTime": r["timestamp"] // 1000, "overall": 4.0}
        for r in stream
    ]
    if fmt == "amazon2018":
        return older, [{"asin": i, "title": f"Album {i}"} for i in items]
    if fmt == "amazon2014":
        return older, [repr({"asin": i, "title": f"Album {i}"}).encode() for i in items]
    rows = [(r["parent_asin"], r["user_id"], r["timestamp"] // 1000) for r in stream]
    if fmt == "csv":
        return [f"{i},{u},4.0,{ts}".encode() for i, u, ts in rows], None
    return (
        ["\t".join(MOVIELENS_INTER_HEADER).encode()] + [f"{u}\t{i}\t4.0\t{ts}".encode() for i, u, ts in rows],
        [b"item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
        + [f"{i}\tAlbum {i}\t1999\tJazz".encode() for i in items],
    )


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("fmt", ["amazon2023", "amazon2018", "amazon2014", "csv", "movielens"])
def test_a_byte_order_mark_is_read_past_in_every_text_format(tmp_path, fmt, gz):
    """Files from Windows tools start with a UTF-8 BOM: the first record is read like any other,
    and no id carries the mark."""
    reviews, meta = _in_format(fmt)

    def converted(name: str, bom: bool) -> tuple[dict, bytes]:
        folder = tmp_path / name
        folder.mkdir()
        src = write_lines(folder / "reviews", reviews, gz=gz, bom=bom)
        meta_path = write_lines(folder / "meta", meta, gz=gz, bom=bom) if meta else None
        m = convert(
            ConvertOptions(
                format=fmt, reviews=src, meta=meta_path, out=str(folder / "out"), progress=False, log=io.StringIO()
            )
        )
        return m, (folder / "out" / "items.jsonl").read_bytes() + (folder / "out" / "users.jsonl").read_bytes()

    with_bom, id_maps = converted("bom", bom=True)
    assert all(a["dropped"] == {} and a["kept"] == a["read"] for a in with_bom["accounting"].values())
    assert id_maps == converted("plain", bom=False)[1]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_the_byte_order_mark_goes_however_the_chunks_fall(tmp_path, gz):
    """A first line longer than a read chunk, and a file of one line without a newline; the
    hash stays that of the file's own bytes."""
    path = tmp_path / "lines"
    for text in (b"x" * (CHUNK + 10) + b"\nsecond\n", b"only line, no newline"):
        data = gzip.compress(BOM + text) if gz else BOM + text
        path.write_bytes(data)
        lines = LineStream(str(path), progress=False)
        assert [line for _, line in lines] == text.rstrip(b"\n").split(b"\n")
        assert lines.sha256 == hashlib.sha256(data).hexdigest()


def test_block_files_with_a_byte_order_mark(tmp_path):
    block = {"u1": {"previous_block": [], "current_block": ["a", "b", "c"]}}
    (tmp_path / "block_0.json").write_bytes(BOM + json.dumps(block).encode())
    stream, _ = read_blocks(str(tmp_path), Ledger("blocks"), progress=False)
    assert stream.user_ids == ["u1"] and stream.item_ids == ["a", "b", "c"]
