"""The item index file: item_id -> semantic-ID tokens, with how the codes were made.

A code is one integer per level; level k's token is `<{letter}_{code}>` with letters a, b, c, ...
(`<a_12><b_200><c_7><d_33>`). `item_index.json` keys items by their dense id (as a string).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
from collections import Counter

import numpy as np

from data_tools.accounting import InputError
from data_tools.atomic import atomic_write_json
from data_tools.dataset import ITEM_INDEX, SCHEMA_VERSION
from data_tools.readback import DamagedFile, read_json

LETTERS = string.ascii_lowercase
TOKEN_RE = re.compile(r"^<([a-z])_(\d+)>$")


def token(level: int, code: int) -> str:
    return f"<{LETTERS[level]}_{code}>"


def code_tokens(code) -> list[str]:
    return [token(k, int(c)) for k, c in enumerate(code)]


def parse_tokens(tokens: list[str], where: str) -> tuple[int, ...]:
    """["<a_12>", "<b_3>"] -> (12, 3); the letters must run a, b, c, ... in order."""
    out = []
    for k, tok in enumerate(tokens):
        m = TOKEN_RE.match(tok) if isinstance(tok, str) else None
        if not m or m.group(1) != LETTERS[k]:
            raise InputError(f"{where}: token {tok!r} at level {k} is not of the form <{LETTERS[k]}_N>")
        out.append(int(m.group(2)))
    return tuple(out)


def collision_groups(codes: dict[int, tuple]) -> dict[tuple, list[int]]:
    by_code: dict[tuple, list[int]] = {}
    for item, code in codes.items():
        by_code.setdefault(code, []).append(item)
    return {c: sorted(items) for c, items in by_code.items() if len(items) > 1}


def extend_collisions(codes: dict[int, tuple]) -> dict[int, tuple]:
    """Make codes unique by appending one level: the rank of the item within its code group."""
    groups = collision_groups(codes)
    rank = {item: r for items in groups.values() for r, item in enumerate(items)}
    return {item: code + (rank.get(item, 0),) for item, code in codes.items()}


def import_codes(path: str, source_to_item: dict[str, int], collisions: str = "keep") -> tuple[dict[int, tuple], dict]:
    """Read an `item_id -> tokens` JSON file (like the paper's semantic_ids.json) and validate it:
    every code has the same depth and every item of the data has a code. The file may code more
    items than the data has (a catalog-wide index over a slice of the data): those are left out
    and counted in the method record (`items_not_in_data`).

    `collisions`: what to do when several items share a code. `keep` (the paper's released
    indexes have a few; items sharing a code are then indistinguishable to the model and a
    predicted code counts for all of them), `extend` (append a level so codes are unique) or
    `error`.
    """
    if collisions not in ("keep", "extend", "error"):
        raise ValueError(f"collisions must be keep, extend or error, not {collisions!r}")
    raw, table = _read_code_table(path)
    codes, depth, not_in_data = _codes_of_data_items(table, source_to_item, path)
    groups = collision_groups(codes)
    report = {
        "items": len(codes),
        "codes_shared": len(groups),
        "items_sharing_a_code": sum(len(v) for v in groups.values()),
        "policy": collisions,
    }
    if groups and collisions == "error":
        raise InputError(
            f"{report['items_sharing_a_code']} items share {len(groups)} codes; use --collisions keep or extend", path
        )
    if groups and collisions == "extend":
        codes = extend_collisions(codes)
        depth += 1
    return codes, {
        "kind": "import",
        "path": os.path.abspath(path),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "levels": depth,
        "items_not_in_data": not_in_data,
        "collisions": report,
    }


def _read_code_table(path: str) -> tuple[bytes, dict]:
    """The file's bytes (for its hash) and its non-empty JSON object."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        table = json.loads(raw)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the item index ({e})", path) from None
    if not isinstance(table, dict) or not table:
        raise InputError("the item index must be a non-empty JSON object item_id -> [tokens]", path)
    return raw, table


def _codes_of_data_items(table: dict, source_to_item: dict[str, int], path: str) -> tuple[dict[int, tuple], int, int]:
    """The table's codes by the data's dense item id, their depth (the same for every entry), and
    how many entries name items the data lacks. Every item of the data must have a code."""
    codes: dict[int, tuple] = {}
    not_in_data = 0
    depth = None
    for src, tokens in table.items():
        if not isinstance(tokens, list) or not tokens:
            raise InputError(f"item {src!r}: expected a list of tokens, got {tokens!r:.60}", path)
        code = parse_tokens(tokens, f"{path}: item {src!r}")
        if depth is None:
            depth = len(code)
        elif len(code) != depth:
            raise InputError(
                f"item {src!r} has {len(code)} levels, the others {depth}: every code needs the same depth", path
            )
        item = source_to_item.get(src)
        if item is None:
            not_in_data += 1
        else:
            codes[item] = code
    missing = [src for src, item in source_to_item.items() if item not in codes]
    if missing:
        raise InputError(f"{len(missing)} items of the data have no code (first: {missing[:5]})", path)
    return codes, depth, not_in_data


def assign_unique(
    codes: np.ndarray, residuals: np.ndarray, last_codebook: np.ndarray, taken: set[tuple]
) -> tuple[np.ndarray, dict]:
    """Make the codes of a batch of new items unique, among themselves and against the codes in
    `taken`, by changing only their last level, so every item keeps the quantizer's depth.

    codes: int [n, levels], the quantizer's choice per item; residuals: float [n, dim], what the
    last level quantized; last_codebook: float [K, dim]. Within each prefix (the first levels),
    an item whose last code nobody else wants keeps it; a code wanted by several new items goes
    to the nearest of them; a code already in `taken` is lost by every new item that wants it.
    The losers then take free codes of their prefix greedily, nearest (item, codeword) pair first.
    Raises InputError when a prefix has more items than codes (K): the quantizer has collapsed, or
    levels x codes is too small for the catalog.
    Returns the new codes and a report: items, colliding_items (wanting a code someone else has
    or wants), codes_contested, reassigned.
    """
    out = codes.copy()
    K = len(last_codebook)
    taken_last = _last_codes_by_prefix(taken)
    colliding = contested = reassigned = 0
    for prefix, rows in _rows_by_prefix(codes).items():
        held = taken_last.get(prefix, set())
        claims: dict[int, list[int]] = {}  # last code -> the rows that want it
        for row in rows:
            claims.setdefault(int(codes[row, -1]), []).append(row)
        disputed = {c: claimants for c, claimants in claims.items() if len(claimants) > 1 or c in held}
        if not disputed:
            continue
        if len(rows) + len(held) > K:
            where = "".join(code_tokens(prefix)) or "the root"
            raise InputError(
                f"{len(rows) + len(held)} items share the prefix {where} but the last level has only {K} codes; "
                "index with more --codes or --levels"
            )
        losers = _losers(disputed, held, residuals, last_codebook)
        _move_to_free_codes(out, losers, held | set(claims), residuals, last_codebook)
        colliding += sum(len(claimants) for claimants in disputed.values())
        contested += len(disputed)
        reassigned += len(losers)
    return out, {
        "items": len(codes),
        "colliding_items": colliding,
        "codes_contested": contested,
        "reassigned": reassigned,
    }


def _rows_by_prefix(codes: np.ndarray) -> dict[tuple, list[int]]:
    """The rows of `codes` grouped by their code less its last level, in order of first row."""
    groups: dict[tuple, list[int]] = {}
    for row, code in enumerate(codes.tolist()):
        groups.setdefault(tuple(code[:-1]), []).append(row)
    return groups


def _last_codes_by_prefix(taken: set[tuple]) -> dict[tuple, set[int]]:
    """The last levels of the codes in `taken`, by the rest of their code."""
    taken_last: dict[tuple, set[int]] = {}
    for code in taken:
        taken_last.setdefault(tuple(code[:-1]), set()).add(code[-1])
    return taken_last


def _losers(
    disputed: dict[int, list[int]], held: set[int], residuals: np.ndarray, last_codebook: np.ndarray
) -> list[int]:
    """The rows (sorted) that lose the last code they want: all that want one in `held`, and for
    any other code wanted by several rows, all but the one nearest its codeword."""
    losers = []
    for c, claimants in disputed.items():
        if c in held:
            losers += claimants
        else:
            dist = ((residuals[claimants] - last_codebook[c]) ** 2).sum(1)
            winner = claimants[int(np.argmin(dist))]  # argmin: the first (lowest row) on a tie
            losers += [r for r in claimants if r != winner]
    return sorted(losers)


def _move_to_free_codes(
    out: np.ndarray, losers: list[int], kept: set[int], residuals: np.ndarray, last_codebook: np.ndarray
) -> None:
    """Give each loser a last code not in `kept` (in `out`, in place), greedily: the nearest free
    (loser, codeword) pair first."""
    K = len(last_codebook)
    dist = ((residuals[losers, None, :] - last_codebook[None]) ** 2).sum(-1)
    dist[:, sorted(kept)] = np.inf
    done: set[int] = set()
    for flat in np.argsort(dist, axis=None, kind="stable").tolist():
        i, c = divmod(flat, K)
        if i in done or c in kept:
            continue
        out[losers[i], -1] = c
        kept.add(c)
        done.add(i)
        if len(done) == len(losers):
            break


def per_level_perplexity(codes: dict[int, tuple]) -> list[float]:
    """exp(entropy) of each level's code usage: how many codes a level effectively uses."""
    depth = len(next(iter(codes.values())))
    out = []
    for k in range(depth):
        counts = Counter(c[k] for c in codes.values())
        n = sum(counts.values())
        out.append(round(math.exp(-sum(v / n * math.log(v / n) for v in counts.values())), 3))
    return out


def write_item_index(root: str, codes: dict[int, tuple], method: dict, codes_per_level: int) -> dict:
    depth = len(next(iter(codes.values())))
    doc = {
        "schema_version": SCHEMA_VERSION,
        "levels": depth,
        "codes_per_level": codes_per_level,
        "token_format": "<{letter}_{code}>",
        "method": method,
        "perplexity": per_level_perplexity(codes),
        "items": {str(i): code_tokens(codes[i]) for i in sorted(codes)},
    }
    atomic_write_json(os.path.join(root, ITEM_INDEX), doc)
    return doc


def load_item_index(root: str) -> dict:
    """The dataset's item index (a FileNotFoundError without one; a DamagedFile for one that is
    truncated or hand-edited)."""
    path = os.path.join(root, ITEM_INDEX)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{root} has no {ITEM_INDEX}; build it with `python -m data_tools index {root}`")
    how = {
        "what": "the item index",
        "remedy": f"restore it from a copy (runs trained on {root} need these very codes), or rebuild it for new "
        f"runs with `python -m data_tools index {root} --force` (or --import the file it was imported from)",
    }
    index = read_json(
        path, **how, fields={"levels": int, "codes_per_level": int, "token_format": str, "method": dict, "items": dict}
    )
    for item, tokens in index["items"].items():
        if not (
            item.isdigit()
            and isinstance(tokens, list)
            and len(tokens) == index["levels"]
            and all(isinstance(t, str) for t in tokens)
        ):
            raise DamagedFile(path, f"has {tokens!r:.60} as item {item!r}'s code (hand-edited?)", **how)
    return index
