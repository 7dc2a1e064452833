"""
The figures of a run and their Markdown table: each figure with tls4d's
value, each reference's, their ratio, the target and whether it was met.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import attrs


@attrs.frozen
class Target:
    """What tls4d must reach on a figure.

    Either an absolute bound on tls4d's own value (``at_most`` or
    ``at_least``), or a bound on its ratio to one reference
    (``ratio_at_least`` with ``reference``).
    """

    text: str
    at_most: float | None = None
    at_least: float | None = None
    ratio_at_least: float | None = None
    reference: str | None = None

    def met(self, value: float | None, ratios: dict[str, float | None]) -> bool | None:
        """
        Args:
            value: tls4d's value.
            ratios: tls4d's value divided by each reference's, by name.

        Returns:
            Whether the target is met; None when what it needs was not measured.
        """
        if self.ratio_at_least is not None:
            ratio = ratios.get(self.reference or "")
            return None if ratio is None else ratio >= self.ratio_at_least
        if value is None:
            return None
        if self.at_most is not None and value > self.at_most:
            return False
        return not (self.at_least is not None and value < self.at_least)


@attrs.frozen
class Samples:
    """One value measured in each round, with a note (client-bound...)."""

    values: tuple[float, ...] = ()
    note: str = ""

    @property
    def median(self) -> float | None:
        """The median of the rounds, or None if nothing was measured."""
        return statistics.median(self.values) if self.values else None


@attrs.frozen
class Figure:
    """One line of the issue's table, measured.

    ``tls4d`` and each of ``references`` hold one value per round; the
    ratio is tls4d's median over the reference's.
    """

    name: str
    unit: str
    higher_is_better: bool
    tls4d: Samples
    references: dict[str, Samples] = attrs.field(factory=dict)
    target: Target | None = None
    skipped: str = ""

    def ratios(self) -> dict[str, float | None]:
        """
        Returns:
            tls4d's median divided by each reference's median, by name
            (None where either is missing or the reference's is 0).
        """
        mine = self.tls4d.median
        found: dict[str, float | None] = {}
        for name, samples in self.references.items():
            theirs = samples.median
            found[name] = None if mine is None or not theirs else mine / theirs
        return found

    def verdict(self) -> str:
        """
        Returns:
            ``"met"``, ``"missed"``, ``"—"`` without a target, or
            ``"not measured"``.
        """
        if self.target is None:
            return "—"
        met = self.target.met(self.tls4d.median, self.ratios())
        return {True: "met", False: "missed", None: "not measured"}[met]


def format_value(value: float | None) -> str:
    """
    Returns:
        ``value`` with about three significant digits, or ``"—"``.
    """
    if value is None:
        return "—"
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_samples(samples: Samples) -> str:
    """
    Returns:
        The median, with the spread of the rounds when there were several,
        and the note.
    """
    text = format_value(samples.median)
    if len(samples.values) > 1:
        low, high = min(samples.values), max(samples.values)
        text += f" ({format_value(low)}–{format_value(high)})"
    if samples.note:
        text += f" [{samples.note}]"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(figures: Sequence[Figure]) -> str:
    """
    Render the figures as one Markdown table, a row for each reference.

    Args:
        figures: The figures of a run.

    Returns:
        The table, ending with a newline.
    """
    lines = [
        "| figure | unit | tls4d | reference | reference's | tls4d ÷ reference "
        "| target | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for figure in figures:
        better = "higher" if figure.higher_is_better else "lower"
        unit = f"{figure.unit} ({better} is better)"
        target = figure.target.text if figure.target else "—"
        if figure.skipped:
            row = [figure.name, unit, "skipped", "—", "—", "—", target]
            row.append(f"not measured: {figure.skipped}")
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
            continue
        ratios = figure.ratios()
        references = list(figure.references.items()) or [("—", Samples())]
        for index, (name, samples) in enumerate(references):
            ratio = ratios.get(name)
            row = [
                figure.name if index == 0 else "″",
                unit if index == 0 else "″",
                format_samples(figure.tls4d) if index == 0 else "″",
                name,
                format_samples(samples) if samples.values or samples.note else "—",
                "—" if ratio is None else f"{ratio:.2f}×",
                target if index == 0 else "″",
                figure.verdict() if index == 0 else "″",
            ]
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def render_machine(facts: dict[str, str]) -> str:
    """
    Returns:
        The machine's facts as a Markdown list.
    """
    return "".join(f"- {name}: {value}\n" for name, value in facts.items())
