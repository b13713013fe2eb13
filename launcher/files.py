"""Where the files that ship with the code are: configs/, ds_configs/ and slurm/continual.sh.

In a checkout they sit at its top, beside launcher/; an installed wheel carries them as
launcher/shipped/ (pyproject.toml maps them there), since site-packages has no checkout around
the packages. Either way `shipped("configs", "tiny.yaml")` is their path.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
INSTALLED = os.path.join(HERE, "shipped")


def shipped_root() -> str:
    """The folder holding configs/, ds_configs/ and slurm/: the checkout's top when there is one."""
    return CHECKOUT if os.path.isdir(os.path.join(CHECKOUT, "configs")) else INSTALLED


def shipped(*parts: str) -> str:
    return os.path.join(shipped_root(), *parts)
