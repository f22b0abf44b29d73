"""The statistics of a multi-seed study: Student t intervals of per-seed values and paired differences.

A study repeats a whole experiment (pre-training or initialisation, data order, fine-tunes, merges, scores) once per
seed, so each seed gives one value per quantity (e.g. a family's merged accuracy averaged over tasks). The seeds are
independent draws, so the 95% interval of the mean is the Student t interval on the per-seed values,
``mean ± t_{0.975, n-1} · s / sqrt(n)`` with ``s`` the sample standard deviation (n - 1 in the denominator).

Families are compared *paired*: a family and the baseline share each seed's pre-trained model, data and test split,
so their per-seed differences cancel what the seed does to both, and the interval is the t interval of those
differences. ``wins`` counts the seeds where the difference is strictly positive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """The mean of `n` per-seed values and its two-sided t interval (NaN bounds with fewer than two values)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, signed: bool = False) -> str:
        """``'+1.23 [-0.40, +2.86]'`` (NaN bounds are left out)."""
        number = "{:+.2f}" if signed else "{:.2f}"
        if math.isnan(self.low):
            return number.format(self.mean)
        return f"{number.format(self.mean)} [{number.format(self.low)}, {number.format(self.high)}]"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The Student t interval of the mean of `values` (independent per-seed values)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    deviation = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * deviation / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class PairedDifference:
    """A family minus the baseline, seed by seed: the differences' t interval and how many seeds the family won."""

    interval: Interval
    wins: int
    differences: dict[int, float]

    @property
    def seeds(self) -> int:
        return len(self.differences)


def paired_difference(
    values: Mapping[int, float], baseline: Mapping[int, float], confidence: float = CONFIDENCE
) -> PairedDifference:
    """`values[seed] - baseline[seed]` for every seed; both must cover the same seeds (pairing is the point)."""
    if set(values) != set(baseline):
        raise ValueError(f"paired_difference: seeds differ ({sorted(values)} vs {sorted(baseline)})")
    differences = {seed: values[seed] - baseline[seed] for seed in sorted(values)}
    wins = sum(difference > 0 for difference in differences.values())
    return PairedDifference(t_interval(list(differences.values()), confidence), wins, differences)


__all__ = ["CONFIDENCE", "Interval", "PairedDifference", "paired_difference", "t_interval"]
