"""Time windows and the prediction samples inside them.

Split rules label every interaction of the stream with its window. Then, per window, each user
with at least `min_interactions` there contributes samples: the last interaction is the test
target, the second-to-last the validation target, the others training targets. A target's
history is everything the user did before it, earlier windows included, cut to the last
`max_history` items. A new user's very first item is a training target with an empty history (as in
the authors' code: the model learns what people start with); the manifest counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_tools.accounting import InputError

DAY = 86400
SPLITS = ("train", "valid", "test")
GROUPS = ("new", "dormant", "continuing")


@dataclass(frozen=True)
class SplitRule:
    kind: str  # "paper" | "calendar" | "blocks"
    first_fraction: float = 0.6
    windows: int = 4  # incremental windows after the first (paper rule)
    days: int = 0  # span of a calendar window

    @classmethod
    def parse(cls, text: str) -> SplitRule:
        """`paper`, `paper:FIRST_FRACTION:WINDOWS` (e.g. paper:0.6:4) or `calendar:DAYS`."""
        kind, _, rest = text.partition(":")
        try:
            if kind == "paper":
                if not rest:
                    return cls("paper")
                frac, _, n = rest.partition(":")
                rule = cls("paper", float(frac), int(n) if n else 4)
                if not (0 < rule.first_fraction < 1) or rule.windows < 1:
                    raise ValueError
                return rule
            if kind == "calendar":
                days = int(rest)
                if days < 1:
                    raise ValueError
                return cls("calendar", days=days)
        except ValueError:
            pass
        raise InputError(
            f"bad --split {text!r}: use paper, paper:FIRST_FRACTION:WINDOWS (e.g. paper:0.6:4) or calendar:DAYS"
        )

    def to_json(self) -> dict:
        if self.kind == "paper":
            return {"rule": "paper", "first_fraction": self.first_fraction, "windows": self.windows + 1}
        if self.kind == "calendar":
            return {"rule": "calendar", "days": self.days}
        return {"rule": "blocks"}


def paper_boundaries(n: int, first_fraction: float, windows: int) -> list[int]:
    """Stream positions where windows start: the first `first_fraction` of the interactions, then
    `windows` equal-count windows (the paper's D1 and D2..D5); the last entry is n."""
    n0 = int(n * first_fraction)
    rest = n - n0
    return [0] + [n0 + (rest * k) // windows for k in range(windows)] + [n]


def label_windows(ts: np.ndarray, rule: SplitRule) -> tuple[np.ndarray, list[dict]]:
    """Window index per interaction (stream order), and each window's span."""
    n = len(ts)
    if rule.kind == "paper":
        bounds = paper_boundaries(n, rule.first_fraction, rule.windows)
        window = np.repeat(np.arange(len(bounds) - 1, dtype=np.int16), np.diff(bounds))
        spans = [{"start": int(bounds[k]), "end": int(bounds[k + 1])} for k in range(len(bounds) - 1)]
    elif rule.kind == "calendar":
        start = int(ts[0]) // DAY * DAY
        span = rule.days * DAY
        idx = (ts - start) // span
        if idx[-1] >= np.iinfo(np.int16).max:
            raise InputError(f"calendar:{rule.days} makes {int(idx[-1]) + 1} windows; use longer windows")
        window = idx.astype(np.int16)
        cuts = np.searchsorted(window, np.arange(int(window[-1]) + 2))
        spans = [
            {
                "start": int(cuts[k]),
                "end": int(cuts[k + 1]),
                "from_time": start + k * span,
                "to_time": start + (k + 1) * span,
            }
            for k in range(int(window[-1]) + 1)
        ]
    else:
        raise ValueError(rule.kind)
    for s in spans:
        if s["end"] > s["start"]:
            s["first_ts"], s["last_ts"] = int(ts[s["start"]]), int(ts[s["end"] - 1])
    return window, spans


@dataclass
class WindowPlan:
    """Which stream positions (in user-major order) are targets of which split, and the groups."""

    targets: dict  # split -> int64 array of positions into the user-major arrays
    groups: dict  # split -> int8 array (index into GROUPS)
    stats: dict


class UserMajor:
    """The stream re-ordered by user (stable, so each user's interactions stay in time order)."""

    def __init__(self, stream):
        perm = np.argsort(stream.user, kind="stable")
        self.user = stream.user[perm]
        self.item = stream.item[perm]
        self.ts = stream.ts[perm]
        self.window = stream.window[perm]
        n_users = len(stream.user_ids)
        self.start = np.searchsorted(self.user, np.arange(n_users + 1)).astype(np.int64)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The concatenation of arange(lo[k], hi[k]) over k, without a Python loop."""
    n = hi - lo
    return np.repeat(lo - np.cumsum(n) + n, n) + np.arange(int(n.sum()), dtype=np.int64)


def plan_windows(
    by_user: UserMajor, n_windows: int, item_first_window: np.ndarray, min_interactions: int
) -> list[WindowPlan]:
    """Per window: eligible users, their targets split three ways, groups and statistics."""
    n = len(by_user.user)
    # Runs of equal (user, window) in user-major order.
    change = np.ones(n, dtype=bool)
    change[1:] = (by_user.user[1:] != by_user.user[:-1]) | (by_user.window[1:] != by_user.window[:-1])
    run_start = np.flatnonzero(change)
    run_end = np.append(run_start[1:], n)
    run_user = by_user.user[run_start]
    run_window = by_user.window[run_start].astype(np.int64)

    # Group of each run: new = nothing before it; dormant = something before, nothing in t-1.
    # A user's runs are in time order; a window appears in at most one run per user except -1
    # ("before any window", from pre-blocked data), which never makes a sample.
    first_of_user = np.ones(len(run_start), dtype=bool)
    first_of_user[1:] = run_user[1:] != run_user[:-1]
    group = np.full(len(run_start), 2, dtype=np.int8)  # continuing
    group[first_of_user] = 0  # new
    seen_prev = np.zeros(len(run_start), dtype=bool)
    # For each run, was the user active in window t-1 in an earlier run?  Runs are few (users x
    # active windows), so a per-user scan is cheap and handles the -1 runs of block imports.
    active: set[int] = set()
    for r, window in enumerate(run_window.tolist()):
        if first_of_user[r]:
            active = set()
        seen_prev[r] = (window - 1) in active
        active.add(window)
    group[~first_of_user & ~seen_prev] = 1  # dormant

    lengths = run_end - run_start
    plans = []
    for t in range(n_windows):
        in_t = run_window == t
        eligible = in_t & (lengths >= min_interactions)
        starts, ends, user_groups = run_start[eligible], run_end[eligible], group[eligible]
        test, valid = ends - 1, ends - 2
        # Training targets: starts .. ends-3 (a new user's first one has an empty history).
        train = _ranges(starts, ends - 2)
        train_group = np.repeat(user_groups, ends - 2 - starts)
        no_history = by_user.start[by_user.user[train]] == train

        items_t = np.unique(by_user.item[_ranges(starts, ends)])
        interactions = int(lengths[eligible].sum())
        users = int(eligible.sum())
        stats = {
            "users": users,
            "new_users": int((user_groups == 0).sum()),
            "dormant_users": int((user_groups == 1).sum()),
            "continuing_users": int((user_groups == 2).sum()),
            "items": len(items_t),
            "new_items": int((item_first_window[items_t] == t).sum()),
            "interactions": interactions,
            "all_interactions": int(lengths[in_t].sum()),
            "ineligible_users": int((in_t & ~eligible).sum()),
            "avg_seq_len": round(interactions / users, 4) if users else 0.0,
            "samples": {"train": len(train), "valid": len(valid), "test": len(test)},
            "train_targets_without_history": int(no_history.sum()),
        }
        plans.append(
            WindowPlan(
                targets={"train": train, "valid": valid, "test": test},
                groups={"train": train_group, "valid": user_groups, "test": user_groups},
                stats=stats,
            )
        )
    return plans
