"""Progress bars with rates, on a terminal only: in a SLURM log or a pipe, tqdm's carriage
returns would pile up into one unreadable line (long steps log summaries there instead)."""

from __future__ import annotations

import sys

from tqdm import tqdm

# No monitor thread: it only corrects `miniters`, which the bars here do not set, and a thread in
# the process makes the forked shard writers of `convert` unsafe (see convert._write_samples).
# https://github.com/tqdm/tqdm#monitoring-thread-intervals-and-miniters
tqdm.monitor_interval = 0


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    kwargs.setdefault("mininterval", 1.0)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), **kwargs)
