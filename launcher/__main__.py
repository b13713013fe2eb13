"""Command line: `python -m launcher {demo} ...`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="MovieLens-100K end to end on this machine")
    d.add_argument("--workdir", default="demo", help="where data and runs go (default ./demo)")
    a = p.parse_args(argv)
    if a.command == "demo":
        from launcher.demo import run_demo

        run_demo(a.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
