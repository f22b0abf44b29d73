"""Merge methods against hand-computed examples, PEFT's implementation, and a second TIES written here."""

import math
import re

import pytest
import torch
from peft.utils import merge_utils

from saft_hf.merging import methods
from saft_hf.merging.methods import MERGE_METHODS, MethodParameter, get_method, magnitude_band, register_merge_method

def T(values):
    return torch.tensor(values, dtype=torch.float64)


def run(name, base, finetuned, weights=None, **parameters):
    return get_method(name)(base, finetuned, weights, **parameters)


# ---- hand-computed examples -------------------------------------------------------------------------------------

# TIES example (base 0, so task vectors are the inputs). density 0.4 of 5 keeps 2 entries per model:
#   tau_1 = [4, -1, .5, 3, -2]  -> [4, 0, 0, 3, 0]
#   tau_2 = [-3, 2, .2, 1, -5]  -> [-3, 0, 0, 0, -5]
#   tau_3 = [1, -6, .1, -.4, 2] -> [0, -6, 0, 0, 2]
TIES_TAUS = [T([4.0, -1, 0.5, 3, -2]), T([-3.0, 2, 0.2, 1, -5]), T([1.0, -6, 0.1, -0.4, 2])]

HAND_CASES = [
    # weighted mean: (1*1 + 3*3)/4, (1*2 + 3*6)/4
    ("weight_average", T([0.0, 0]), [T([1.0, 2]), T([3.0, 6])], [1, 3], {}, [2.5, 5.0]),
    # base 1, tau = [1,-1,0], [0,2,-1]; sum w tau = [1, 0, -.5]; alpha .5
    ("task_arithmetic", T([1.0, 1, 1]), [T([2.0, 0, 1]), T([1.0, 3, 0])], [1, 0.5], {"alpha": 0.5}, [1.5, 1, 0.75]),
    # unit weights: signs (+,-,+,+,-); agreeing means 4, -6, 0, 3, -5; alpha .5
    ("ties", T([0.0] * 5), TIES_TAUS, None, {"alpha": 0.5, "density": 0.4}, [2, -3, 0, 1.5, -2.5]),
    # weights [1,2,1], weighted signs: entry 0: 4 - 6 < 0 -> only tau_2 agrees: 2*(-3)/2; entry 4: -10 + 2 < 0 -> -5
    ("ties", T([0.0] * 5), TIES_TAUS, [1, 2, 1], {"alpha": 1.0, "density": 0.4}, [-3, -6, 0, 3, -5]),
    # same, dividing by the count of agreeing models: 2*(-3)/1, 2*(-5)/1
    ("ties", T([0.0] * 5), TIES_TAUS, [1, 2, 1], {"alpha": 1.0, "density": 0.4, "disjoint_mean": "count"},
     [-6, -6, 0, 3, -10]),
    # unweighted signs: entry 0: 4 - 3 > 0 -> tau_1 agrees (weight 1): 4; entry 4: -5 + 2 < 0 -> 2*(-5)/2
    ("ties", T([0.0] * 5), TIES_TAUS, [1, 2, 1], {"alpha": 1.0, "density": 0.4, "sign_election": "unweighted"},
     [4, -6, 0, 3, -5]),
    # breadcrumbs on one model: drop the top 10% (10), keep the next 50% (8, 5, -4, -3, 2)
    ("breadcrumbs", T([0.0] * 10), [T([10.0, -1, 5, 0.1, -3, 2, 0.5, 8, -4, 1])], None,
     {"alpha": 1.0, "density": 0.5, "gamma": 0.1}, [0, 0, 5, 0, -3, 2, 0, 8, -4, 0]),
    # model stock, orthogonal task vectors: cos 0 -> t 0 -> the base
    ("model_stock", T([1.0, 2]), [T([2.0, 2]), T([1.0, 3])], None, {}, [1, 2]),
    # model stock, tau = [1,0], [1,1]: cos = 1/sqrt2, t = 2 cos / (cos + 1) = 2 sqrt2 - 2, mean tau = [1, .5]
    ("model_stock", T([0.0, 0]), [T([1.0, 0]), T([1.0, 1])], None, {},
     [2 * math.sqrt(2) - 2, (2 * math.sqrt(2) - 2) / 2]),
    ("linear_interpolation", T([9.0, 9]), [T([0.0, 4]), T([4.0, 0])], None, {"alpha": 0.25}, [1, 3]),
    # density 1 keeps everything: DARE is task arithmetic / TIES without the trim
    ("dare_linear", T([1.0, 1, 1]), [T([2.0, 0, 1]), T([1.0, 3, 0])], [1, 0.5], {"alpha": 0.5, "density": 1.0},
     [1.5, 1, 0.75]),
    ("dare_ties", T([0.0] * 5), TIES_TAUS, None, {"alpha": 1.0, "density": 1.0},
     [(4 + 1) / 2, (-1 - 6) / 2, (0.5 + 0.2 + 0.1) / 3, (3 + 1) / 2, (-2 - 5) / 2]),
]  # fmt: skip


@pytest.mark.parametrize(("method", "base", "finetuned", "weights", "parameters", "expected"), HAND_CASES)
def test_method_matches_hand_computed_example(method, base, finetuned, weights, parameters, expected):
    merged = run(method, base, finetuned, weights, **parameters)
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_every_registered_method_has_a_hand_computed_case():
    assert {case[0] for case in HAND_CASES} == set(MERGE_METHODS)


@pytest.mark.parametrize("rescale", ["inverse_density", "l1_norm"])
def test_dare_drops_with_the_documented_seeded_mask_and_rescales(rescale):
    base = torch.zeros(1000, dtype=torch.float64)
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    merged = run("dare_linear", base, [tau], alpha=1.0, density=0.3, rescale=rescale, seed=11)
    keep = torch.rand(1000, generator=torch.Generator().manual_seed(11 + 0)) < 0.3  # model 0 uses seed + 0
    scale = 1 / 0.3 if rescale == "inverse_density" else tau.abs().sum() / tau[keep].abs().sum()
    torch.testing.assert_close(merged, tau * keep * scale, rtol=1e-12, atol=0)
    assert 250 < int(keep.sum()) < 350
    again = run("dare_linear", base, [tau], alpha=1.0, density=0.3, rescale=rescale, seed=11)
    assert torch.equal(merged, again)
    assert not torch.equal(merged, run("dare_linear", base, [tau], alpha=1.0, density=0.3, rescale=rescale, seed=12))


def test_model_stock_matches_mean_pairwise_cosine_for_three_models():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(40, generator=generator, dtype=torch.float64)
    shared = torch.randn(40, generator=generator, dtype=torch.float64)
    taus = [shared + 0.7 * torch.randn(40, generator=generator, dtype=torch.float64) for _ in range(3)]
    cosines = [torch.nn.functional.cosine_similarity(taus[i], taus[j], dim=0) for i, j in [(0, 1), (0, 2), (1, 2)]]
    cosine = sum(cosines) / 3
    ratio = 3 * cosine / (2 * cosine + 1)
    expected = base + ratio * sum(taus) / 3
    torch.testing.assert_close(run("model_stock", base, [base + tau for tau in taus]), expected, rtol=0, atol=1e-12)


# ---- TIES against independent implementations -------------------------------------------------------------------


def reference_ties(base, finetuned, weights, *, alpha, density, sign_election, disjoint_mean):
    """TIES written the stacked way, with a full sort for the trim threshold."""
    taus = torch.stack([tensor.double() - base.double() for tensor in finetuned])
    flat = taus.reshape(len(finetuned), -1)
    keep_count = round(density * flat.shape[1])
    threshold = flat.abs().sort(dim=1, descending=True).values[:, keep_count - 1 : keep_count]
    trimmed = (flat * (flat.abs() >= threshold)).reshape(taus.shape)
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * base.dim())
    elected = torch.sign((trimmed * (w if sign_election == "weighted" else 1)).sum(0))
    elected[elected == 0] = 1
    agree = torch.sign(trimmed) == elected
    numerator = (trimmed * w * agree).sum(0)
    denominator = (w * agree).sum(0) if disjoint_mean == "weight_sum" else agree.sum(0).double()
    return base.double() + alpha * torch.where(denominator == 0, 0.0, numerator / denominator.clamp_min(1e-300))


def random_inputs(seed, shape, count):
    """Continuous random inputs: no ties at the trim cut-off and no zero sign sums (almost surely)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + torch.randn(shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("sign_election", ["weighted", "unweighted"])
@pytest.mark.parametrize("disjoint_mean", ["weight_sum", "count"])
@pytest.mark.parametrize(("shape", "count", "density", "weights"), [
    ((64, 32), 3, 0.2, [1.0, 1.0, 1.0]),
    ((50,), 4, 0.3, [0.5, 2.0, 1.0, 0.25]),
    ((8, 4, 3), 2, 0.75, [1.5, 0.7]),
])  # fmt: skip
def test_ties_matches_stacked_full_sort_reference(sign_election, disjoint_mean, shape, count, density, weights):
    base, finetuned = random_inputs(sum(shape) + count, shape, count)
    options = dict(alpha=0.7, density=density, sign_election=sign_election, disjoint_mean=disjoint_mean)
    merged = run("ties", base, finetuned, weights, **options)
    torch.testing.assert_close(merged, reference_ties(base, finetuned, weights, **options), rtol=0, atol=1e-12)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.5]])
def test_ties_unweighted_count_is_peft_ties(weights):
    base, finetuned = random_inputs(7, (40, 10), 3)  # density * numel = 80 exactly: PEFT's int() and our round agree
    merged = run("ties", base, finetuned, weights, alpha=1.0, density=0.2, sign_election="unweighted",
                 disjoint_mean="count")  # fmt: skip
    taus = [tensor.double() - base.double() for tensor in finetuned]
    peft_delta = merge_utils.ties(taus, torch.tensor(weights, dtype=torch.float64), density=0.2)
    torch.testing.assert_close(merged, base.double() + peft_delta, rtol=0, atol=1e-12)


def test_equal_weights_make_the_conventions_agree():
    base, finetuned = random_inputs(5, (30, 20), 4)
    # Equal weights: weighted and unweighted sign election elect the same signs.
    equal = [0.6] * 4
    assert torch.equal(run("ties", base, finetuned, equal, sign_election="weighted"),
                       run("ties", base, finetuned, equal, sign_election="unweighted"))  # fmt: skip
    # Unit weights: dividing by the agreeing weights or by their count is the same.
    ones = [1.0] * 4
    for method in ("ties", "dare_ties"):
        assert torch.equal(run(method, base, finetuned, ones, disjoint_mean="weight_sum"),
                           run(method, base, finetuned, ones, disjoint_mean="count"))  # fmt: skip


def test_magnitude_band_uses_the_kth_largest_threshold():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0)).abs()
    ordered = values.sort(descending=True).values
    low, high = magnitude_band(values, density=0.25, drop_top=0.05)
    assert (low, high) == (ordered[50 + 250 - 1].item(), ordered[50 - 1].item())
    assert int(((values >= low) & (values < high)).sum()) == 250


# ---- purity and validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_methods_leave_their_inputs_untouched(method, dtype):
    base, finetuned = random_inputs(1, (16, 8), 2)
    base, finetuned = base.to(dtype), [tensor.to(dtype) for tensor in finetuned]
    copies = [base.clone(), *[tensor.clone() for tensor in finetuned]]
    run(method, base, finetuned)
    assert all(torch.equal(a, b) for a, b in zip(copies, [base, *finetuned]))


def test_one_model_alpha_one_task_arithmetic_is_exact_in_float32():
    base, (tuned,) = random_inputs(2, (1000,), 1)
    tuned = tuned * 1e-3  # many sign changes between base and fine-tune: a float32 tau would round
    merged = run("task_arithmetic", base, [tuned], alpha=1.0).float()
    assert torch.equal(merged, tuned)


@pytest.mark.parametrize(("method", "models", "parameters", "weights", "message"), [
    ("nope", 2, {}, None, "method: unknown merge method 'nope'"),
    ("ties", 2, {"lambda": 1}, None, "parameters.lambda: unknown parameter for method 'ties'"),
    ("ties", 2, {"density": 0}, None, "parameters.density: must be > 0.0"),
    ("ties", 2, {"density": 1.5}, None, "parameters.density: must be <= 1.0"),
    ("ties", 2, {"sign_election": "mass"}, None, "parameters.sign_election: must be one of"),
    ("ties", 2, {"alpha": "high"}, None, "parameters.alpha: expected a number"),
    ("breadcrumbs", 1, {"density": 0.9, "gamma": 0.2}, None, "parameters.gamma: density + gamma must be <= 1"),
    ("linear_interpolation", 3, {}, None, "models: method 'linear_interpolation' needs 2 models, got 3"),
    ("model_stock", 1, {}, None, "needs at least 2 models"),
    ("task_arithmetic", 2, {}, [1.0], "weights: 1 weights for 2 models"),
])  # fmt: skip
def test_invalid_calls_name_the_problem(method, models, parameters, weights, message):
    base, finetuned = random_inputs(0, (4,), models)
    with pytest.raises(ValueError, match=re.escape(message)):
        get_method(method)(base, finetuned, weights, **parameters)


def test_yaml_style_number_strings_are_accepted():
    parameters = get_method("ties").resolve_parameters({"alpha": "1e-1", "density": 0.5})
    assert parameters["alpha"] == pytest.approx(0.1) and parameters["sign_election"] == "weighted"


def test_registry_accepts_new_methods_with_required_parameters(monkeypatch):
    monkeypatch.setattr(methods, "MERGE_METHODS", dict(MERGE_METHODS))  # registrations vanish after the test

    @register_merge_method("scaled_mean", reference="a test", parameters=(
        MethodParameter("scale", "Multiplies the mean.", minimum=0.0),
    ))  # fmt: skip
    def scaled_mean(base, finetuned, weights, *, scale):
        return scale * torch.stack([tensor.double() for tensor in finetuned]).mean(0)

    base, finetuned = T([0.0, 0]), [T([1.0, 2]), T([3.0, 4])]
    with pytest.raises(ValueError, match=re.escape("parameters.scale: required by method 'scaled_mean'")):
        get_method("scaled_mean")(base, finetuned)
    assert torch.equal(get_method("scaled_mean")(base, finetuned, scale=2), T([4.0, 6]))
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method("scaled_mean", reference="again")(scaled_mean)
