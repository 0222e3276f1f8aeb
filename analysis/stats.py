"""Confidence intervals over seeds (SPEC §9): the textbook formulas, nothing fitted.

- :func:`mean_interval`: the mean of n seeds and its 95% confidence interval,
  mean ± t(0.975, n−1) · s / √n (Student t, s the sample standard deviation);
  no interval with one seed.
- :func:`welch_interval`: the difference of two means and its 95% interval
  by Welch's t: d = m_a − m_b, se = √(s_a²/n_a + s_b²/n_b), with the
  Welch–Satterthwaite degrees of freedom
  ν = se⁴ / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1)); no interval with
  fewer than two seeds on either side.

The t quantile comes from SciPy when it is installed (it is, through
mlxtend, with the harness extra); without SciPy, from a table of
t(0.975, ν), log t interpolated linearly in 1/ν (within 0.5% of the exact
quantile for every ν ≥ 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

__all__ = ["LEVEL", "Interval", "mean_interval", "t_quantile", "table_t_quantile", "welch_interval"]

LEVEL = 0.95  # two-sided confidence level of every interval in the report

# t(0.975, ν): ν = 1, 1.25, 1.5, 1.75 (Welch's ν need not be whole), 2…30,
# then 40, 60, 120 and ∞ (the normal quantile).
_T_TABLE_DF = (1, 1.25, 1.5, 1.75, *range(2, 31), 40, 60, 120, math.inf)
_T_TABLE = (
    12.7062, 8.0280, 6.0167, 4.9488, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
    2.0211, 2.0003, 1.9799, 1.9600,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval; ``low``/``high`` are NaN when it cannot be given.

    ``n`` is the number of seeds (for a difference: of the first side), ``df``
    the degrees of freedom of the t quantile used (NaN without an interval).
    """

    estimate: float
    low: float
    high: float
    n: int
    df: float = math.nan

    @property
    def known(self) -> bool:
        """Whether there is an interval (two seeds or more)."""
        return not math.isnan(self.low)

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly above or below 0: the difference exceeds the seed noise."""
        return self.known and (self.low > 0 or self.high < 0)


def t_quantile(df: float) -> float:
    """t(0.975, df): the two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    if not df >= 1:
        raise ValueError(f"Invalid degrees of freedom: {df!r}; expected a number ≥ 1")
    try:
        from scipy import stats
    except ImportError:  # analysis needs no SciPy: fall back to the table
        return table_t_quantile(df)
    return float(stats.t.ppf(0.5 + LEVEL / 2, df))


def table_t_quantile(df: float) -> float:
    """t(0.975, df) from the table: log t linear in 1/df between its entries (exact at the tabled df)."""
    inverse = [1 / d for d in reversed(_T_TABLE_DF)]  # increasing, from 0 (ν = ∞) to 1
    log_t = [math.log(t) for t in reversed(_T_TABLE)]
    return math.exp(float(np.interp(1 / df, inverse, log_t)))


def _clean(values: Iterable[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    return array[np.isfinite(array)]


def mean_interval(values: Iterable[float]) -> Interval:
    """Mean of the finite ``values`` and its 95% interval (Student t, n−1 df); NaN bounds below 2 values."""
    values = _clean(values)
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(values.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = t_quantile(n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, float(n - 1))


def welch_interval(a: Iterable[float], b: Iterable[float]) -> Interval:
    """mean(a) − mean(b) and its 95% interval by Welch's t (Welch–Satterthwaite df).

    NaN bounds when either side has fewer than two finite values. When both
    sides have no spread at all (se = 0) the interval is the point itself.
    """
    a, b = _clean(a), _clean(b)
    if not len(a) or not len(b):
        return Interval(math.nan, math.nan, math.nan, len(a))
    difference = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Interval(difference, math.nan, math.nan, len(a))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # identical seeds on both sides: nothing to tell the difference from
        return Interval(difference, difference, difference, len(a), math.inf)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(df) * se
    return Interval(difference, difference - half, difference + half, len(a), float(df))
