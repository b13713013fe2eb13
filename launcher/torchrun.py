"""`python -m launcher.torchrun ARGS`: torchrun (`python -m torch.distributed.run ARGS`), except that
a period's deliberate exit codes come through: 2 (a usage, config or input error, whose one
`error:` line a rank has printed) and 75 (checkpointed on a signal). torchrun itself reports any
worker's non-zero exit as its own failure, with a traceback of the agent and exit code 1, which
would bury the one line and turn the code a launcher acts on into "failed".

Any other failure is torchrun's, unchanged (its report and exit code 1).
"""

from __future__ import annotations

import logging
import sys

from train.common.exit_codes import EXIT_REQUEUE, EXIT_USAGE

PASSED_ON = (EXIT_USAGE, EXIT_REQUEUE)


def _deliberate(record: logging.LogRecord) -> bool:
    """torchrun's `failed (exitcode: N) ...` line for a code passed on: left out (the period's own
    line says what happened)."""
    args = record.args if isinstance(record.args, tuple) else ()
    return str(record.msg).startswith("failed (exitcode") and bool(args) and args[0] in PASSED_ON


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(lambda r: not _deliberate(r))
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode in PASSED_ON:
            return first.exitcode
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
