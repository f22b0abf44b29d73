"""Result tables of the analyses, saved as CSV (one row per measured point) and JSON (everything, with metadata).

Files are written to a temporary name beside the target and renamed, so an interrupted run never leaves a
half-written table.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import write_atomically


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


class SavedResult:
    """A result that is a table: ``columns()`` and ``rows()`` for the CSV, ``to_dict()`` for the JSON."""

    def columns(self) -> list[str]:
        raise NotImplementedError

    def rows(self) -> list[list[Any]]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_csv(self) -> str:
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(self.columns())
        writer.writerows(_plain(self.rows()))
        return buffer.getvalue()

    def save(self, folder: str | os.PathLike, stem: str) -> tuple[Path, Path]:
        """Write ``folder/stem.csv`` and ``folder/stem.json``; returns both paths."""
        folder = Path(folder)
        csv_text = self.to_csv()
        json_text = json.dumps(_plain(self.to_dict()), indent=2, allow_nan=True)
        csv_path = write_atomically(folder / f"{stem}.csv", lambda f: f.write(csv_text))
        json_path = write_atomically(folder / f"{stem}.json", lambda f: f.write(json_text + "\n"))
        return csv_path, json_path


@dataclass
class GridResult(SavedResult):
    """A quantity over the ``(alpha_1, alpha_2)`` grid; ``values[i, j]`` is at ``alpha_1 = alphas[i]``,
    ``alpha_2 = alphas[j]``, and ``values = sum of components`` (one term per task of the pair)."""

    quantity: str
    tasks: tuple[str, str]
    alphas: tuple[float, ...]
    values: np.ndarray
    components: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    def value_at(self, alpha_1: float, alpha_2: float) -> float:
        """The value at the grid point nearest to ``(alpha_1, alpha_2)``."""
        grid = np.asarray(self.alphas)
        return float(self.values[np.abs(grid - alpha_1).argmin(), np.abs(grid - alpha_2).argmin()])

    def columns(self) -> list[str]:
        return ["alpha_1", "alpha_2", self.quantity, *(f"{self.quantity}[{task}]" for task in self.components)]

    def rows(self) -> list[list[Any]]:
        return [
            [a1, a2, self.values[i, j], *(component[i, j] for component in self.components.values())]
            for i, a1 in enumerate(self.alphas)
            for j, a2 in enumerate(self.alphas)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantity": self.quantity,
            "tasks": list(self.tasks),
            "alphas": list(self.alphas),
            "values": self.values,
            "components": self.components,
            "metadata": self.metadata,
        }


@dataclass
class CurveResult(SavedResult):
    """Quantities measured at points ``x`` (coefficients on a path, or layer names), one column per ``series``,
    with scalar ``summary`` values (e.g. the loss barrier)."""

    x_name: str
    x: tuple[Any, ...]
    series: dict[str, np.ndarray]
    summary: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> list[str]:
        return [self.x_name, *self.series]

    def rows(self) -> list[list[Any]]:
        return [[x, *(values[i] for values in self.series.values())] for i, x in enumerate(self.x)]

    def to_dict(self) -> dict[str, Any]:
        return {
            self.x_name: list(self.x),
            "series": self.series,
            "summary": self.summary,
            "metadata": self.metadata,
        }


def coefficient_grid(start: float = -0.5, stop: float = 1.5, points: int = 21) -> tuple[float, ...]:
    """Evenly spaced task coefficients: the paper's 21 points from -0.5 to 1.5 (App. A.3) by default."""
    if points < 2:
        raise ValueError(f"A coefficient grid needs at least 2 points, got {points}.")
    return tuple(round(float(value), 12) for value in np.linspace(start, stop, points))


def check_coefficients(values: Sequence[float], *, label: str) -> tuple[float, ...]:
    values = tuple(float(value) for value in values)
    if not values:
        raise ValueError(f"{label}: no values given.")
    if not all(np.isfinite(values)):
        raise ValueError(f"{label}: values must be finite, got {list(values)}.")
    return values
