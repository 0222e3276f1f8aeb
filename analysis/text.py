"""How the report writes numbers, budgets and tables: one place, so every table and sentence agrees."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "METRIC_NAMES",
    "budget_text",
    "is_missing",
    "markdown_table",
    "num",
    "signed",
]

METRIC_NAMES = {
    "train_loss": "training loss",
    "valid_loss": "validation loss",
    "test_loss": "test loss",
    "train_error": "training error",
    "valid_error": "validation error",
    "test_error": "test error",
}


def is_missing(value) -> bool:
    """None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def num(value, missing: str = "–") -> str:
    """A number to 4 significant digits; ``missing`` for None or NaN."""
    return missing if is_missing(value) else f"{value:.4g}"


def signed(value) -> str:
    """A difference to 4 significant digits, with its sign: +2.8, -1.1."""
    return f"{value:+.4g}"


def budget_text(kind: str | None, value) -> str:
    """A run's budget in words: "30 s of training time", "500 steps", "20 epochs"."""
    if kind == "time":
        return f"{value:g} s of training time"
    if kind == "steps":
        return f"{int(value)} optimizer steps"
    if kind == "epochs":
        return f"{value:g} epochs"
    return "an unrecorded budget"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of text cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
