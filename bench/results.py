"""Figures, goals and the text table: what a scenario reports and how it is judged."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum


class GoalKind(Enum):
    """How a figure is judged against its goal."""

    #: The ratio to the baseline must reach the threshold (throughput-like figures).
    RATIO_AT_LEAST = "ratio_at_least"
    #: The ratio to the baseline must stay at or under the threshold (cost-like figures).
    RATIO_AT_MOST = "ratio_at_most"
    #: The value itself must stay under the threshold, in the figure's unit.
    VALUE_BELOW = "value_below"


@dataclass(frozen=True)
class Goal:
    """A performance target: a threshold on a figure or on its ratio to the baseline."""

    kind: GoalKind
    threshold: float

    def describe(self, unit: str) -> str:
        if self.kind is GoalKind.RATIO_AT_LEAST:
            return f">= {self.threshold:g}x"
        if self.kind is GoalKind.RATIO_AT_MOST:
            return f"<= {self.threshold:g}x"
        return f"< {self.threshold:g} {unit}"

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        """Whether the goal is met; None when the figure could not be measured."""
        if self.kind is GoalKind.VALUE_BELOW:
            return None if value is None else value < self.threshold
        if ratio is None:
            return None
        if self.kind is GoalKind.RATIO_AT_LEAST:
            return ratio >= self.threshold
        return ratio <= self.threshold

    def attainment(self, value: float | None, ratio: float | None) -> float | None:
        """The figure in units of its goal, oriented so that 1.0 is the goal's edge."""
        if self.kind is GoalKind.VALUE_BELOW:
            return None if value is None else value / self.threshold
        return ratio


@dataclass
class Figure:
    """One measured figure, its baseline from the same run, and its goal."""

    scenario: str
    name: str
    unit: str
    value: float | None
    baseline: float | None = None
    baseline_name: str = ""
    goal: Goal | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.goal.met(self.value, self.ratio)


@dataclass
class ScenarioResult:
    """What one scenario produced: its figures, and remarks worth keeping with them."""

    name: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""


def fmt_number(value: float | None, unit: str = "") -> str:
    """A value with a sensible number of digits and its unit."""
    if value is None or math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    return f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def fmt_met(met: bool | None) -> str:
    if met is None:
        return "-"
    return "yes" if met else "NO"


TABLE_HEADER = ("scenario", "figure", "value", "baseline", "ratio", "goal", "met?")


def table_rows(figures: Sequence[Figure]) -> list[tuple[str, ...]]:
    """The table's cells, one tuple per figure, in the header's order."""
    rows: list[tuple[str, ...]] = []
    for figure in figures:
        baseline = (
            f"{fmt_number(figure.baseline, figure.unit)} ({figure.baseline_name})"
            if figure.baseline is not None
            else (figure.baseline_name or "-")
        )
        rows.append(
            (
                figure.scenario,
                figure.name,
                fmt_number(figure.value, figure.unit),
                baseline,
                fmt_ratio(figure.ratio),
                figure.goal.describe(figure.unit) if figure.goal else "-",
                fmt_met(figure.met),
            )
        )
    return rows


def text_table(figures: Sequence[Figure]) -> str:
    """A plain-text table for the terminal."""
    rows = [TABLE_HEADER, *table_rows(figures)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(figures: Sequence[Figure]) -> str:
    """The same table in Markdown."""
    lines = [
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join("---" for _ in TABLE_HEADER) + "|",
    ]
    for row in table_rows(figures):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def percentile(samples: Sequence[float], pct: float) -> float | None:
    """The ``pct``-th percentile by the nearest-rank method; None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
