"""Numbers over seeds and the verdicts drawn from them.

Spread is half the range over seeds, (max - min) / 2, shown as `mean ± spread`; with two seeds the two
values are mean - spread and mean + spread. A comparison of two settings has four outcomes: better beyond the
seed spread (the ranges over seeds do not overlap), better in the mean only, worse in the mean only, worse
beyond the spread. A claim is "held" when every comparison it rests on is better beyond the spread, "held in
the means" when each is at least better in the mean, "did not hold" when none is better, "mixed" otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HELD, HELD_IN_MEANS, MIXED, NOT_HELD = "held", "held in the means", "mixed", "did not hold"


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def spread(values: Sequence[float]) -> float:
    """Half the range over seeds (0 for one seed)."""
    return (max(values) - min(values)) / 2


def fmt(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """`mean ± spread` of per-seed values (multiplied by `scale`, e.g. 100 for percentages)."""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ± {spread(values):.{digits}f}"


def fmt_delta(a: Sequence[float], b: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """mean(a) - mean(b), signed, with up to two more digits where needed to agree with the shown means.

    Means of 98.6 and 97.4 show as 99 and 97 at 0 digits; their difference 1.2 would show as "+1" beside
    them, so it is written "+1.2".
    """
    mean_a, mean_b = mean(a) * scale, mean(b) * scale
    for d in range(digits, digits + 3):
        shown = float(f"{mean_a:.{d}f}") - float(f"{mean_b:.{d}f}")
        if f"{mean_a - mean_b:+.{d}f}" == f"{shown:+.{d}f}":
            break
    return f"{mean_a - mean_b:+.{d}f}"


@dataclass
class Comparison:
    """Per-seed values of a setting `a` against a setting `b` on one metric."""

    what: str  # e.g. "K=8 clf-FD at k=K"
    a: list[float]
    b: list[float]
    higher_is_better: bool

    @property
    def delta(self) -> float:
        """mean(a) - mean(b)."""
        return mean(self.a) - mean(self.b)

    @property
    def a_better(self) -> bool:
        return self.delta > 0 if self.higher_is_better else self.delta < 0

    @property
    def separated(self) -> bool:
        """The ranges over seeds do not overlap (needs at least two seeds on each side)."""
        if min(len(self.a), len(self.b)) < 2:
            return False
        return min(self.a) > max(self.b) or max(self.a) < min(self.b)

    @property
    def outcome(self) -> str:
        if self.delta == 0:
            return "equal"
        side = "better" if self.a_better else "worse"
        return f"{side} beyond the seed spread" if self.separated else f"{side} in the mean only"

    def to_dict(self) -> dict:
        return {
            "what": self.what,
            "a": self.a,
            "b": self.b,
            "higher_is_better": self.higher_is_better,
            "delta": self.delta,
            "outcome": self.outcome,
        }


def verdict(comparisons: Sequence[Comparison]) -> str:
    """HELD / HELD_IN_MEANS / MIXED / NOT_HELD for a claim that `a` is better in every comparison."""
    if all(c.a_better and c.separated for c in comparisons):
        return HELD
    if all(c.a_better for c in comparisons):
        return HELD_IN_MEANS
    if not any(c.a_better for c in comparisons):
        return NOT_HELD
    return MIXED


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
