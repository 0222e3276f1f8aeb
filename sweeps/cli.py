"""The ``locoprop`` command line (SPEC §7)."""

from __future__ import annotations

import argparse
import sys

import locoprop


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locoprop",
        description="LocoProp research harness: train, compare, sweep, report and benchmark optimizers.",
    )
    parser.add_argument("--version", action="version", version=f"locoprop {locoprop.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
