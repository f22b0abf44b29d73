"""Result tables of a merging experiment: absolute and normalized accuracy per task, and their averages.

The SAFT paper (Lee et al., ICLR 2025) reports, per merge method and fine-tuning family, each task's absolute test
accuracy of the merged model and its normalized accuracy = merged accuracy / accuracy of that task's own fine-tuned
model (Tables 1, 2, C4, C6), plus the averages over tasks. A result is one :class:`Score` (one model on one task);
the tables are pivots of a list of them, written as Markdown (to read) and CSV (to load).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import write_atomically

FINETUNED = "fine-tuned"  # the `method` of each task's own fine-tuned model: the normalizer
PRETRAINED = "pre-trained"  # the common starting point, scored zero-shot


@dataclass(frozen=True)
class Score:
    """One model's test result on one task."""

    family: str  # e.g. "sgd" (plain fine-tuning) or "saft"
    method: str  # a merge method, FINETUNED or PRETRAINED
    setting: str  # how the merge coefficients were chosen, e.g. "searched" or "alpha=0.4"; "" when none
    task: str
    accuracy: float
    parameters: Mapping[str, float] = field(default_factory=dict)  # the merge parameters used
    extra: Mapping[str, float] = field(default_factory=dict)  # e.g. off_label_fraction, other_task_label_fraction


def normalized_accuracy(scores: Sequence[Score]) -> list[float]:
    """Each score's accuracy divided by the FINETUNED accuracy of the same family and task, in the order of `scores`
    (NaN when that is missing or zero: FINETUNED rows are 1 by definition, PRETRAINED rows have no reference)."""
    reference = {(s.family, s.task): s.accuracy for s in scores if s.method == FINETUNED}
    normalized = []
    for score in scores:
        denominator = reference.get((score.family, score.task), 0.0)
        normalized.append(score.accuracy / denominator if denominator else math.nan)
    return normalized


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summary_rows(scores: Sequence[Score], tasks: Sequence[str]) -> list[dict[str, object]]:
    """One row per (method, setting, family), in order of first appearance: per task absolute (`<task>`) and
    normalized (`<task> (norm)`) accuracy in percent, then `avg` and `avg (norm)` over `tasks`."""
    groups: dict[tuple[str, str, str], dict[str, tuple[float, float]]] = {}
    for score, normalized in zip(scores, normalized_accuracy(scores)):
        groups.setdefault((score.method, score.setting, score.family), {})[score.task] = (score.accuracy, normalized)
    rows = []
    for (method, setting, family), by_task in groups.items():
        missing = [task for task in tasks if task not in by_task]
        if missing:
            raise ValueError(f"{method}/{setting}/{family}: no score for task(s) {', '.join(missing)}")
        row: dict[str, object] = {"method": method, "setting": setting, "family": family}
        for kind, suffix in ((0, ""), (1, " (norm)")):
            for task in tasks:
                row[f"{task}{suffix}"] = 100 * by_task[task][kind]
        row["avg"] = _mean([100 * by_task[task][0] for task in tasks])
        row["avg (norm)"] = _mean([100 * by_task[task][1] for task in tasks])
        rows.append(row)
    return rows


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def to_markdown(rows: Sequence[Mapping[str, object]], title: str | None = None) -> str:
    """A GitHub Markdown table (numbers with two decimals, NaN as a dash)."""
    if not rows:
        raise ValueError("to_markdown: no rows")
    columns = list(rows[0])
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" if isinstance(rows[0][c], str) else "---:" for c in columns) + "|")
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_table(
    rows: Sequence[Mapping[str, object]], folder: Path, stem: str, title: str | None = None
) -> tuple[Path, Path]:
    """`<stem>.md` and `<stem>.csv` in `folder` (each written to a temporary name, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".md", to_markdown(rows, title)), (".csv", to_csv(rows))):
        paths.append(write_atomically(folder / f"{stem}{suffix}", lambda f, text=text: f.write(text)))
    return paths[0], paths[1]


def scores_to_records(scores: Sequence[Score]) -> list[dict[str, object]]:
    """The long format (one row per model and task, with its normalized accuracy) for `scores.json`."""
    return [asdict(score) | {"normalized_accuracy": n} for score, n in zip(scores, normalized_accuracy(scores))]


__all__ = [
    "FINETUNED",
    "PRETRAINED",
    "Score",
    "normalized_accuracy",
    "scores_to_records",
    "summary_rows",
    "to_csv",
    "to_markdown",
    "write_table",
]
