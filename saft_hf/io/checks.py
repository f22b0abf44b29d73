"""Checks on tensor values: NaN/Inf refusal with counts, and base fingerprints (which base a task vector belongs
to)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import torch

from ..errors import NonFiniteError


def nonfinite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """``(NaN count, infinity count)`` of ``tensor``: one ``aminmax`` pass when all values are finite (the usual
    case); integer and boolean tensors are always ``(0, 0)``."""
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return 0, 0
    if tensor.dtype.itemsize == 1:  # torch implements isfinite/isnan/isinf for no float8 type
        tensor = tensor.float()
    # The minimum and maximum are finite exactly when every value is (a NaN propagates to both, -inf is the minimum,
    # inf the maximum); one reduction without a boolean temporary, several times faster than isfinite().all().
    low, high = torch.aminmax(tensor)
    if math.isfinite(low) and math.isfinite(high):
        return 0, 0
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def check_finite(tensor: torch.Tensor, *, where: str, advice: str) -> torch.Tensor:
    """``tensor``, after checking it holds no NaN or infinity; otherwise raise :class:`NonFiniteError`
    ``"{where} has {n} NaN and {m} Inf values; {advice}"``."""
    nan, inf = nonfinite_counts(tensor)
    if nan or inf:
        raise NonFiniteError(f"{where} has {nan} NaN and {inf} Inf values; {advice}")
    return tensor


_FINGERPRINT_SAMPLES = 4096


def base_fingerprint(base: Mapping[str, torch.Tensor], names: Iterable[str]) -> str:
    """Identify base weights cheaply: sha256 over the shapes, dtypes and an evenly strided sample of the bytes (at
    most 4096 elements) of ``base[name]`` for ``names`` in the given order. Names are left out, so the vision tower
    of a CLIP base hashes the same whether it is named ``vision_model.*`` or ``*``. Deterministic across machines
    (exact bytes, no floating-point reductions), and two different bases differ with certainty."""
    digest = hashlib.sha256()
    for name in names:
        flat = base[name].detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::step][:_FINGERPRINT_SAMPLES].contiguous().cpu()
        digest.update(f"{str(flat.dtype)}|{list(base[name].shape)}|".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()
