"""Progress bars with rates, on a terminal only: in a SLURM log or a pipe, tqdm's carriage
returns would pile up into one unreadable line (long steps log summaries there instead)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    kwargs.setdefault("mininterval", 1.0)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), **kwargs)
