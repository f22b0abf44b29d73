"""Parity with PEFT's ``merge_utils`` (run here) and mergekit 0.1.5 (outputs recorded by
tests/data/mergekit/record_reference.py), per tensor, where the conventions coincide: tensors of odd sizes, 1-D
included, random inputs without magnitude ties. Random masks (DARE, DELLA) are saft_hf's documented draws on both
sides (``torch.bernoulli`` replaced in the other library)."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file

from saft_hf.merging.methods import get_method

DATA = Path(__file__).parent / "data" / "mergekit"
KERNELS = json.loads((DATA / "kernels.json").read_text())["cases"]
SHAPES = [(37,), (13, 7), (4, 3, 5)]


@pytest.fixture(scope="module")
def recorded():
    return load_file(DATA / "kernels.safetensors")


# mergekit's per-method defaults (merge_methods/registry.py): does the method normalize / rescale unless told?
NORMALIZE = {
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_linear": False,
    "dare_ties": False,
    "breadcrumbs": False,
    "della": True,
    "della_linear": False,
}
CONSENSUS = {"ties", "dare_ties", "della"}
RESCALED = {"dare_linear", "dare_ties", "della", "della_linear"}


def saft_hf_equivalent(case):
    """(method, parameters, weights) of saft_hf that define mergekit's ``case``, written from mergekit's source."""
    method, shared, per_model = case["method"], case["parameters"], case["models"]
    weights = per_model.get("weight", [1.0] * case["count"])
    if method in ("linear", "model_stock"):
        return ("weight_average" if method == "linear" else method), {}, weights
    if method == "slerp":
        return "slerp", {"t": shared["t"]}, None
    scale, normalize = shared.get("lambda", 1.0), shared.get("normalize", NORMALIZE[method])
    parameters = {key: per_model[key] for key in ("density", "gamma", "epsilon") if key in per_model}
    if method in CONSENSUS:
        parameters.update(alpha=scale, sign_election="weighted", disjoint_mean="weight_sum" if normalize else "none")
    else:
        parameters["alpha"] = scale / sum(weights) if normalize else scale
    if method in RESCALED:
        parameters.update(rescale="l1_norm" if shared.get("rescale", True) else "none", seed=case["seed"])
    return method, parameters, weights


@pytest.mark.parametrize("case", sorted(KERNELS))
def test_methods_match_mergekit(recorded, case):
    spec = KERNELS[case]
    method, parameters, weights = saft_hf_equivalent(spec)
    # mergekit runs DARE and DELLA masks in float32 (its CPU work dtype), everything else in float64 here
    tolerance = 1e-6 if spec["method"] in RESCALED else 1e-12
    for shape in spec["shapes"]:
        key = f"{case}/{'x'.join(map(str, shape))}"
        inputs = [recorded[name] for name in sorted(name for name in recorded if name.startswith(f"{key}/input"))]
        finetuned = inputs if method == "slerp" else inputs[1:]
        merged = get_method(method)(inputs[0], finetuned, weights, **parameters)
        torch.testing.assert_close(merged, recorded[f"{key}/output"], rtol=0, atol=tolerance, msg=key)


def test_recorded_cases_cover_every_shared_method():
    assert {case["method"] for case in KERNELS.values()} == {
        "linear",
        "task_arithmetic",
        "ties",
        "breadcrumbs",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
        "model_stock",
        "slerp",
    }


# ---- PEFT, live -------------------------------------------------------------------------------------------------


def random_inputs(seed, shape, count):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    return base, [base + torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(count)]


def peft_merge(function, base, finetuned, weights, **options):
    taus = [tensor - base for tensor in finetuned]
    return base + function(taus, torch.tensor(weights, dtype=torch.float64), **options)


@pytest.fixture
def saft_hf_masks(monkeypatch):
    """PEFT's ``torch.bernoulli`` keep masks replaced by saft_hf's draws for model 0, 1, ... of seed ``seed``."""
    state = {}

    def bernoulli(probability, *args, **kwargs):
        generator = torch.Generator().manual_seed(state["seed"] + next(state["models"]))
        draws = torch.rand(probability.shape, generator=generator, dtype=torch.float32)
        return (draws < probability).to(probability.dtype)

    def use(seed):
        state.update(seed=seed, models=itertools.count())

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    return use


WEIGHTS = [[1.0, 1.0, 1.0], [0.5, 2.0, 0.7]]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_task_arithmetic_matches_peft(shape, weights):
    base, finetuned = random_inputs(1, shape, 3)
    merged = get_method("task_arithmetic")(base, finetuned, weights, alpha=1.0)
    expected = peft_merge(merge_utils.task_arithmetic, base, finetuned, weights)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", [0.2, 0.35, 0.9])
def test_ties_matches_peft(shape, weights, density):
    # density * n is fractional for these sizes: both keep int(density * n) entries
    base, finetuned = random_inputs(2, shape, 3)
    merged = get_method("ties")(
        base, finetuned, weights, alpha=1.0, density=density, sign_election="unweighted", disjoint_mean="count"
    )
    expected = peft_merge(merge_utils.ties, base, finetuned, weights, density=density)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_breadcrumbs_without_outliers_is_peft_magnitude_prune(shape, weights):
    base, finetuned = random_inputs(3, shape, 3)
    merged = get_method("breadcrumbs")(base, finetuned, weights, alpha=1.0, density=0.45, gamma=0.0)
    expected = peft_merge(merge_utils.magnitude_prune, base, finetuned, weights, density=0.45)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_dare_matches_peft_with_the_same_masks(saft_hf_masks, shape, weights):
    base, finetuned = random_inputs(4, shape, 3)
    saft_hf_masks(21)
    expected = peft_merge(merge_utils.dare_linear, base, finetuned, weights, density=0.4)
    merged = get_method("dare_linear")(base, finetuned, weights, alpha=1.0, density=0.4, seed=21)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)
    saft_hf_masks(22)
    expected = peft_merge(merge_utils.dare_ties, base, finetuned, weights, density=0.6)
    merged = get_method("dare_ties")(
        base, finetuned, weights, alpha=1.0, density=0.6, seed=22, sign_election="unweighted", disjoint_mean="count"
    )
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)
