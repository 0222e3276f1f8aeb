"""The ``locoprop`` console script (and ``python -m sweeps``): check the harness extra, then run the CLI.

The CLI imports the whole harness at its top, so without the ``harness``
extra importing it would end in a traceback; this entry checks first and
says in one line which extra to install.
"""

from __future__ import annotations

import sys

from sweeps.extras import missing, missing_message

EXIT_BAD_INPUT = (
    2  # sweeps.commands.cli's status for bad input or setup; that module needs the extra, so not imported here
)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI (``sweeps.commands.cli.main``); without the harness extra, one line on stderr and status 2."""
    absent = missing("harness")
    if absent:
        print(f"locoprop: {missing_message('harness', absent)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from sweeps.commands.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
