"""The project's `evaluate` metrics, shipped as local metric scripts and loaded by path, so they work offline.

`evaluate.load("accuracy")` fetches the script from the Hub; `load_metric("accuracy")` loads
`saft_hf/metrics/accuracy/accuracy.py` instead and needs no network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import evaluate

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("accuracy", "f1", "label_words", "matthews_correlation")

MetricName = Literal["accuracy", "f1", "label_words", "matthews_correlation"]


def load_metric(name: MetricName, **kwargs) -> evaluate.EvaluationModule:
    """Load the metric `name` from its local script (`evaluate.load(path)`); `kwargs` go to `evaluate.load`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}: the metrics shipped with saft_hf are {METRIC_NAMES}.")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)


__all__ = ["METRIC_NAMES", "MetricName", "load_metric"]
