"""The ``locoprop`` console script (and ``python -m sweeps``): check the harness extra, then run the CLI.

The CLI imports the whole harness at its top, so without the ``harness``
extra importing it would end in a traceback; this entry checks first and
says in one line which extra to install.
"""

from __future__ import annotations

import sys

from sweeps import interrupts
from sweeps.extras import missing, missing_message

# The status of sweeps.commands.cli, which is not imported here: it needs the extra. (An interrupted command
# exits with 128 + the signal, interrupts.exit_status: 130 for Ctrl-C, 143 for SIGTERM.)
EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    """Run the CLI (``sweeps.commands.cli.main``); without the harness extra, one line on stderr and status 2;
    interrupted (Ctrl-C, SIGTERM) before the CLI runs, one line and 128 + the signal."""
    absent = missing("harness")
    if absent:
        print(f"locoprop: {missing_message('harness', absent)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with interrupts.handled():  # SIGTERM too, while torch, pandas and Optuna import
            return _cli()(argv)
    except KeyboardInterrupt as err:  # before the CLI could take it
        print("locoprop: interrupted", file=sys.stderr)
        return interrupts.exit_status(err)


def _cli():
    """The CLI's ``main`` (importing it takes seconds)."""
    from sweeps.commands.cli import main as cli_main

    return cli_main


if __name__ == "__main__":
    sys.exit(main())
