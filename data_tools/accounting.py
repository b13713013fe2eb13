"""Every input record is accounted for: read = kept + the sum of each named drop reason.

Parsers raise `Skip(reason)` for a record they cannot use; the `Ledger` counts it (or, with
`strict`, turns it into an `InputError` naming the file and line). Errors that make the rest of a
file unreadable (a truncated gzip stream, say) are always `InputError`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class InputError(Exception):
    """Bad input that stops the conversion, with the file and line it was found at."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = f"{path}:{line}: " if path is not None and line is not None else (f"{path}: " if path else "")
        super().__init__(where + message)
        self.path, self.line = path, line


class Skip(Exception):
    """A record that is dropped for a named reason (counted, never silent)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class Ledger:
    """Counts for one input stream (reviews or metadata)."""

    name: str
    strict: bool = False
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    # The first few places each reason was seen, so a user can look at the offending lines.
    examples: dict = field(default_factory=dict)

    def skip(self, skip: Skip, path: str, line: int) -> None:
        if self.strict:
            detail = f" ({skip.detail})" if skip.detail else ""
            raise InputError(f"{skip.reason}{detail} [--strict turns skips into errors]", path, line)
        self.dropped[skip.reason] += 1
        seen = self.examples.setdefault(skip.reason, [])
        if len(seen) < 5:
            seen.append(f"{path}:{line}" + (f" ({skip.detail})" if skip.detail else ""))

    def drop_later(self, reason: str, count: int) -> None:
        """Drop `count` already-kept records in a later step (duplicates, filters, k-core)."""
        if count <= 0:
            return
        if self.strict and reason == "duplicate":
            raise InputError(f"{count} duplicate records (same user, item and time) [--strict]")
        if self.strict and reason == "late":
            raise InputError(f"{count} records are late: dated in a window already written [--strict]")
        self.kept -= count
        self.dropped[reason] += count

    def check(self) -> None:
        total = self.kept + sum(self.dropped.values())
        if total != self.read:
            raise AssertionError(
                f"accounting broken for {self.name}: read {self.read} != kept {self.kept} + dropped {total - self.kept}"
            )

    def to_json(self) -> dict:
        self.check()
        return {
            "read": self.read,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())},
        }

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:,}" for k, v in sorted(self.dropped.items())) or "nothing"
        return f"{self.name}: read {self.read:,}, kept {self.kept:,}, dropped {parts}"
