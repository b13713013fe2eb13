"""One parser per input format: a raw line in, a normalized record out, or `Skip(reason)`.

Review parsers return `(user, item, ts_seconds, rating)`; metadata parsers return
`(item, title, text)`. Timestamps are checked for type, sign, unit and plausibility; the unit
check catches seconds given where milliseconds are expected (and the reverse), which would
otherwise silently put a 2019 review in 1970.
"""

from __future__ import annotations

import ast
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from data_tools.accounting import Skip

FORMATS = ("amazon2023", "amazon2018", "amazon2014", "csv", "movielens", "blocks")

# 1e11 ms is March 1973 and 1e11 s is the year 5138: no review stream sits on the wrong side.
UNIT_BOUNDARY = 1e11
MAX_TEXT = 1000  # characters of item text kept (embedders truncate far earlier)


def _json(line: bytes):
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("not_utf8") from None
        raise Skip("not_json") from None


def _object(line: bytes) -> dict:
    if not line.strip():
        raise Skip("blank_line")
    rec = _json(line)
    if not isinstance(rec, dict):
        raise Skip("not_an_object")
    return rec


def _id(rec: dict, key: str, what: str) -> str:
    v = rec.get(key)
    if v is None or v == "":
        raise Skip(f"missing_{what}", key)
    if not isinstance(v, str):
        raise Skip(f"{what}_not_a_string", f"{key}={v!r:.40}")
    return v


def check_timestamp(v, unit: str, max_seconds: float) -> int:
    """Validate a raw timestamp in `unit` ('s' or 'ms') and return whole seconds."""
    if v is None:
        raise Skip("missing_timestamp")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Skip("timestamp_not_a_number", f"{v!r:.40}")
    if not math.isfinite(v):
        raise Skip("timestamp_not_a_number", repr(v))
    if v <= 0:
        raise Skip("timestamp_not_positive", repr(v))
    if unit == "ms":
        if v < UNIT_BOUNDARY:
            raise Skip("timestamp_in_seconds_not_ms", repr(v))
        seconds = int(v // 1000)
    else:
        if v >= UNIT_BOUNDARY:
            raise Skip("timestamp_in_ms_not_seconds", repr(v))
        seconds = int(v)
    if seconds > max_seconds:
        raise Skip("timestamp_in_future", repr(v))
    return seconds


def check_rating(v) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Skip("rating_not_a_number", f"{v!r:.40}")
    return float(v)


def _text(*parts) -> str:
    out = []
    for part in parts:
        if isinstance(part, list):
            part = " ".join(
                x if isinstance(x, str) else " ".join(map(str, x)) if isinstance(x, list) else str(x) for x in part
            )
        if isinstance(part, str) and part.strip():
            out.append(" ".join(part.split()))
    return "; ".join(out)[:MAX_TEXT]


@dataclass(frozen=True)
class ReviewFormat:
    parse: Callable[[bytes, float], tuple]
    header: bool = False  # first line names the columns (MovieLens atomic files)
    # JSON formats: (user, item, timestamp, rating) keys and the timestamp unit, for the fast
    # path in stream.IdCollector; anything it does not accept goes through `parse`.
    json_keys: tuple | None = None
    unit: str = "s"


# ---- reviews -------------------------------------------------------------------------------


def amazon2023_review(line: bytes, max_seconds: float):
    rec = _object(line)
    return (
        _id(rec, "user_id", "user"),
        _id(rec, "parent_asin", "item"),
        check_timestamp(rec.get("timestamp"), "ms", max_seconds),
        check_rating(rec.get("rating")),
    )


def amazon2018_review(line: bytes, max_seconds: float):
    rec = _object(line)
    return (
        _id(rec, "reviewerID", "user"),
        _id(rec, "asin", "item"),
        check_timestamp(rec.get("unixReviewTime"), "s", max_seconds),
        check_rating(rec.get("overall")),
    )


def _number(field: bytes, what: str):
    try:
        return int(field)
    except ValueError:
        try:
            return float(field)
        except ValueError:
            raise Skip(f"{what}_not_a_number", f"{field[:40]!r}") from None


def _fields(line: bytes, sep: bytes, n: int) -> list[bytes]:
    if not line.strip():
        raise Skip("blank_line")
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        raise Skip("not_utf8") from None
    f = line.rstrip(b"\r").split(sep)
    if len(f) != n:
        raise Skip("wrong_field_count", f"{len(f)} fields, expected {n}")
    return f


def csv_review(line: bytes, max_seconds: float):
    """Amazon ratings-only CSV: item,user,rating,timestamp (seconds), no header."""
    item, user, rating, ts = _fields(line, b",", 4)
    if not user:
        raise Skip("missing_user")
    if not item:
        raise Skip("missing_item")
    if not ts:
        raise Skip("missing_timestamp")
    return (
        user.decode(),
        item.decode(),
        check_timestamp(_number(ts, "timestamp"), "s", max_seconds),
        check_rating(_number(rating, "rating")) if rating else math.nan,
    )


def movielens_review(line: bytes, max_seconds: float):
    """RecBole atomic file `ml-100k.inter`: user_id, item_id, rating, timestamp (seconds), tab-separated."""
    user, item, rating, ts = _fields(line, b"\t", 4)
    if not user:
        raise Skip("missing_user")
    if not item:
        raise Skip("missing_item")
    if not ts:
        raise Skip("missing_timestamp")
    return (
        user.decode(),
        item.decode(),
        check_timestamp(_number(ts, "timestamp"), "s", max_seconds),
        check_rating(_number(rating, "rating")) if rating else math.nan,
    )


REVIEWS = {
    "amazon2023": ReviewFormat(
        amazon2023_review, json_keys=("user_id", "parent_asin", "timestamp", "rating"), unit="ms"
    ),
    "amazon2018": ReviewFormat(amazon2018_review, json_keys=("reviewerID", "asin", "unixReviewTime", "overall")),
    # 2014 reviews are JSON with the 2018 keys
    "amazon2014": ReviewFormat(amazon2018_review, json_keys=("reviewerID", "asin", "unixReviewTime", "overall")),
    "csv": ReviewFormat(csv_review),
    "movielens": ReviewFormat(movielens_review, header=True),
}

MOVIELENS_INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]


# ---- metadata ------------------------------------------------------------------------------


def amazon2023_meta(line: bytes):
    rec = _object(line)
    title = rec.get("title") if isinstance(rec.get("title"), str) else ""
    return (
        _id(rec, "parent_asin", "item"),
        title,
        _text(title, rec.get("categories"), rec.get("features"), rec.get("description")),
    )


def amazon2018_meta(line: bytes):
    rec = _object(line)
    title = rec.get("title") if isinstance(rec.get("title"), str) else ""
    return (
        _id(rec, "asin", "item"),
        title,
        _text(title, rec.get("brand"), rec.get("category"), rec.get("description")),
    )


def amazon2014_meta(line: bytes):
    """2014 metadata lines are Python literals (single quotes): parsed with ast.literal_eval, never eval."""
    if not line.strip():
        raise Skip("blank_line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise Skip("not_utf8") from None
    try:
        rec = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise Skip("not_a_python_literal") from None
    if not isinstance(rec, dict):
        raise Skip("not_an_object")
    title = rec.get("title") if isinstance(rec.get("title"), str) else ""
    return (
        _id(rec, "asin", "item"),
        title,
        _text(title, rec.get("brand"), rec.get("categories"), rec.get("description")),
    )


def movielens_meta(line: bytes):
    """RecBole `ml-100k.item`: item_id, movie_title, release_year, class (genres)."""
    item, title, year, genres = (f.decode() for f in _fields(line, b"\t", 4))
    if not item:
        raise Skip("missing_item")
    full = f"{title} ({year})" if year else title
    return item, full, _text(full, f"genres: {genres}" if genres else "")


METAS = {
    "amazon2023": amazon2023_meta,
    "amazon2018": amazon2018_meta,
    "amazon2014": amazon2014_meta,
    "movielens": movielens_meta,
}


def default_max_seconds() -> int:
    """Reviews dated after 'now' cannot be real; one day of slack absorbs clock skew."""
    return int(time.time()) + 86400
