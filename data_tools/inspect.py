"""`inspect`: the per-window statistics table of a dataset folder (like the paper's Table 1), under
its totals and above its input accounting and warnings; or all of them as JSON (`--json`)."""

from __future__ import annotations

import json

from data_tools.dataset import load_manifest
from data_tools.windows import utc

COLUMNS = [
    ("window", lambda w: str(w["index"])),
    ("users", lambda w: f"{w['stats']['users']:,}"),
    ("new users", lambda w: f"{w['stats']['new_users']:,}"),
    ("dormant", lambda w: f"{w['stats']['dormant_users']:,}"),
    ("items", lambda w: f"{w['stats']['items']:,}"),
    ("new items", lambda w: f"{w['stats']['new_items']:,}"),
    ("interactions", lambda w: f"{w['stats']['interactions']:,}"),
    ("avg seq len", lambda w: f"{w['stats']['avg_seq_len']:.2f}"),
    ("train/valid/test", lambda w: "{train:,}/{valid:,}/{test:,}".format(**w["stats"]["samples"])),
]


def window_table(manifest: dict) -> str:
    rows = [[name for name, _ in COLUMNS]] + [[f(w) for _, f in COLUMNS] for w in manifest["windows"]]
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(widths[c]) for c, cell in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def accounting_lines(manifest: dict) -> list[str]:
    out = []
    for name, a in manifest["accounting"].items():
        dropped = ", ".join(f"{k} {v:,}" for k, v in a["dropped"].items()) or "nothing"
        out.append(f"{name}: read {a['read']:,} = kept {a['kept']:,} + dropped ({dropped})")
    return out


def inspect(root: str, as_json: bool = False) -> str:
    m = load_manifest(root)
    if as_json:
        return json.dumps(
            {
                "counts": m["counts"],
                "accounting": m["accounting"],
                "split": m["split"],
                "pending": m.get("pending"),
                "appends": len(m.get("appends", [])),
                "windows": [{"index": w["index"], **w["stats"]} for w in m["windows"]],
            },
            indent=1,
        )
    c = m["counts"]
    head = (
        f"{root}: {c['interactions']:,} interactions, {c['users']:,} users, {c['items']:,} items; "
        f"split {m['split']['rule']}"
    )
    return "\n".join(
        [
            head,
            window_table(m),
            *pending_lines(m),
            *accounting_lines(m),
            *("warning: " + w for w in m.get("warnings", [])),
        ]
    )


def pending_lines(manifest: dict) -> list[str]:
    """A calendar dataset's appends and what it holds back (docs/data.md, "Keeping a dataset fresh")."""
    p = manifest.get("pending")
    if p is None:
        return []
    appends = len(manifest.get("appends", []))
    return [
        f"written up to {utc(manifest['closed_until'])} ({appends} append(s)); held back: {p['interactions']:,} "
        f"interactions of window {p['first_open_window']} and later (open until the stream passes "
        f"{utc(p['closes_at'])})"
    ]
