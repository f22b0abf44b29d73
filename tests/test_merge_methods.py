"""Merge methods against hand-computed examples, PEFT's implementation, and a second TIES written here."""

import math
import re
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from saft_hf.merging import methods
from saft_hf.merging.methods import MERGE_METHODS, MethodParameter, get_method, magnitude_band, register_merge_method
from saft_hf.merging.search import paper_grid


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
    (
        "ties",
        T([0.0] * 5),
        TIES_TAUS,
        [1, 2, 1],
        {"alpha": 1.0, "density": 0.4, "disjoint_mean": "count"},
        [-6, -6, 0, 3, -10],
    ),
    # unweighted signs: entry 0: 4 - 3 > 0 -> tau_1 agrees (weight 1): 4; entry 4: -5 + 2 < 0 -> 2*(-5)/2
    (
        "ties",
        T([0.0] * 5),
        TIES_TAUS,
        [1, 2, 1],
        {"alpha": 1.0, "density": 0.4, "sign_election": "unweighted"},
        [4, -6, 0, 3, -5],
    ),
    # breadcrumbs on one model: drop the top 10% (10), keep the next 50% (8, 5, -4, -3, 2)
    (
        "breadcrumbs",
        T([0.0] * 10),
        [T([10.0, -1, 5, 0.1, -3, 2, 0.5, 8, -4, 1])],
        None,
        {"alpha": 1.0, "density": 0.5, "gamma": 0.1},
        [0, 0, 5, 0, -3, 2, 0, 8, -4, 0],
    ),
    # model stock, orthogonal task vectors: cos 0 -> t 0 -> the base
    ("model_stock", T([1.0, 2]), [T([2.0, 2]), T([1.0, 3])], None, {}, [1, 2]),
    # model stock, tau = [1,0], [1,1]: cos = 1/sqrt2, t = 2 cos / (cos + 1) = 2 sqrt2 - 2, mean tau = [1, .5]
    (
        "model_stock",
        T([0.0, 0]),
        [T([1.0, 0]), T([1.0, 1])],
        None,
        {},
        [2 * math.sqrt(2) - 2, (2 * math.sqrt(2) - 2) / 2],
    ),
    ("linear_interpolation", T([9.0, 9]), [T([0.0, 4]), T([4.0, 0])], None, {"alpha": 0.25}, [1, 3]),
    # density 1 keeps everything: DARE is task arithmetic / TIES without the trim
    (
        "dare_linear",
        T([1.0, 1, 1]),
        [T([2.0, 0, 1]), T([1.0, 3, 0])],
        [1, 0.5],
        {"alpha": 0.5, "density": 1.0},
        [1.5, 1, 0.75],
    ),
    (
        "dare_ties",
        T([0.0] * 5),
        TIES_TAUS,
        None,
        {"alpha": 1.0, "density": 1.0},
        [(4 + 1) / 2, (-1 - 6) / 2, (0.5 + 0.2 + 0.1) / 3, (3 + 1) / 2, (-2 - 5) / 2],
    ),
    # density 0.7 of 5 keeps int(3.5) = 3 entries per model: [4, 0, 0, 3, -2], [-3, 2, 0, 0, -5], [1, -6, 0, 0, 2]
    # (rounding to 4 would also keep 1 and -0.4 at entry 3, giving (3 + 1) / 2 there)
    ("ties", T([0.0] * 5), TIES_TAUS, None, {"alpha": 1.0, "density": 0.7}, [2.5, -6, 0, 3, -3.5]),
    # negative weight: model 2 votes with w tau = [3, 0, 0, 0, 5]; vote sums [7, -6, 0, 3, 7]; agreeing w tau summed:
    # entries 0 and 4 get 4 + 3 and 5 + 2 over agreeing weights 1 - 1 = 0, a zero divisor, so divided by 1 (mergekit)
    ("ties", T([0.0] * 5), TIES_TAUS, [1, -1, 1], {"alpha": 1.0, "density": 0.4}, [7, -6, 0, 3, 7]),
    # no division (mergekit's normalize: false): the agreeing entries summed
    ("ties", T([0.0] * 5), TIES_TAUS, None, {"alpha": 1.0, "density": 0.4, "disjoint_mean": "none"}, [4, -6, 0, 3, -5]),
    # breadcrumbs density 0.8 + gamma 0.3 > 1: keep int(8) = 8 entries, so only 10 - 8 = 2 outliers (10, 8) drop
    (
        "breadcrumbs",
        T([0.0] * 10),
        [T([10.0, -1, 5, 0.1, -3, 2, 0.5, 8, -4, 1])],
        None,
        {"alpha": 1.0, "density": 0.8, "gamma": 0.3},
        [0, -1, 5, 0.1, -3, 2, 0.5, 0, -4, 1],
    ),
    # slerp of orthogonal [2, 0] and [0, 1]: theta = pi / 2, t = 1/3: sin(pi/3) [2, 0] + sin(pi/6) [0, 1]
    ("slerp", T([7.0, 7]), [T([2.0, 0]), T([0.0, 1])], None, {"t": 1 / 3}, [math.sqrt(3), 0.5]),
    # collinear models are interpolated linearly
    ("slerp", T([7.0, 7]), [T([1.0, 1]), T([2.0, 2])], None, {"t": 0.25}, [1.25, 1.25]),
    # density 1 keeps every entry: DELLA is TIES / task arithmetic without the trim
    (
        "della",
        T([0.0] * 5),
        TIES_TAUS,
        None,
        {"alpha": 1.0, "density": 1.0},
        [(4 + 1) / 2, (-1 - 6) / 2, (0.5 + 0.2 + 0.1) / 3, (3 + 1) / 2, (-2 - 5) / 2],
    ),
    (
        "della_linear",
        T([1.0, 1, 1]),
        [T([2.0, 0, 1]), T([1.0, 3, 0])],
        [1, 0.5],
        {"alpha": 0.5, "density": 1.0},
        [1.5, 1, 0.75],
    ),
    # TSV-M, T = 2 on 2 x 2 (r = 1): tau_1 = diag(3, 1) keeps 3 e1 e1^T, tau_2 = diag(0, 2) keeps 2 e2 e2^T; the
    # stacked U = V = I are orthonormal already: base + alpha diag(3, 2)
    (
        "tsv_m",
        T([[1.0, 1], [1, 1]]),
        [T([[4.0, 1], [1, 2]]), T([[1.0, 1], [1, 3]])],
        None,
        {"alpha": 0.5},
        [[2.5, 1], [1, 2]],
    ),
    # non-2-D tensors: the mean task vector, scaled: [2, 0] and [0, 4] -> [1, 2]
    ("tsv_m", T([1.0, 1]), [T([3.0, 1]), T([1.0, 5])], None, {"alpha": 1.0}, [2, 3]),
    # Iso-C: sum diag(3, 0) + diag(0, 1) = diag(3, 1) -> flat spectrum 2 I
    (
        "iso_c",
        T([[0.0, 0], [0, 0]]),
        [T([[3.0, 0], [0, 0]]), T([[0.0, 0], [0, 1]])],
        None,
        {"alpha": 1.5},
        [[3, 0], [0, 3]],
    ),
    ("iso_c", T([1.0, 1]), [T([3.0, 1]), T([1.0, 5])], None, {"alpha": 0.5}, [2, 3]),
    # Iso-CTS on 3 x 3, T = 2, c = int(3 * 0.34) = 1, s = int(2 / 2) = 1: sum diag(4, 1, 2) gives the common e1
    # (value 4); tau_1 = diag(4, 1, 0) minus its e1 part leaves e2 (1), tau_2 = diag(0, 0, 2) leaves e3 (2);
    # U = V = I, mean value 7/3
    (
        "iso_cts",
        T([[0.0] * 3] * 3),
        [torch.diag(T([4.0, 1, 0])), torch.diag(T([0.0, 0, 2]))],
        None,
        {"alpha": 1.0, "common_space_fraction": 0.34},
        [[7 / 3, 0, 0], [0, 7 / 3, 0], [0, 0, 7 / 3]],
    ),
    ("iso_cts", T([1.0, 1]), [T([3.0, 1]), T([1.0, 5])], None, {"alpha": 0.5}, [2, 3]),
]


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


@pytest.mark.parametrize("rescale", ["inverse_density", "l1_norm", "none"])
def test_della_keeps_by_magnitude_rank_with_the_documented_draws(rescale):
    # rows ranked by magnitude: [3, -1, 2] -> keep probabilities 0.7, 0.3, 0.5 (density 0.5 -+ epsilon 0.2)
    tau = T([[3.0, -1, 2], [0.5, 4, -6]])
    probability = T([[0.7, 0.3, 0.5], [0.3, 0.5, 0.7]])
    merged = run("della_linear", torch.zeros(2, 3), [tau], alpha=1.0, density=0.5, epsilon=0.2, rescale=rescale, seed=5)
    keep = torch.rand((2, 3), generator=torch.Generator().manual_seed(5)) < probability
    kept = tau * keep
    expected = {
        "inverse_density": kept / probability,
        "none": kept,
        "l1_norm": kept * tau.abs().sum() / kept.abs().sum(),
    }[rescale]
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=0)
    # a 1-D tensor is ranked as one row: the second model (seed + 1) draws from its own generator
    merged = run(
        "della_linear",
        torch.zeros(3),
        [T([1.0, 2, 3]), T([3.0, -1, 2])],
        [0.0, 1.0],
        alpha=1.0,
        density=0.5,
        epsilon=0.2,
        rescale="none",
        seed=5,
    )
    keep = torch.rand(3, generator=torch.Generator().manual_seed(6)) < T([0.7, 0.3, 0.5])
    torch.testing.assert_close(merged, T([3.0, -1, 2]) * keep, rtol=0, atol=0)


def test_della_keeps_large_entries_more_often():
    tau = torch.arange(1, 201, dtype=torch.float64).reshape(1, 200)
    kept = sum(
        (
            run("della_linear", torch.zeros(1, 200), [tau], density=0.5, epsilon=0.4, rescale="none", seed=s) != 0
        ).double()
        for s in range(40)
    )
    assert kept[0, :50].mean() < 0.3 * 40 and kept[0, -50:].mean() > 0.7 * 40


def polar_by_eigh(matrix):
    """``M (M^T M)^(-1/2)``, the orthonormal polar factor, from a symmetric eigendecomposition."""
    values, vectors = np.linalg.eigh(matrix.T @ matrix)
    return matrix @ vectors @ np.diag(values**-0.5) @ vectors.T


def top_triplets(matrix, count):
    left, values, right = np.linalg.svd(matrix, full_matrices=False)
    return left[:, :count], values[:count], right[:count]


def test_tsv_m_matches_a_numpy_reference():
    base, finetuned = random_inputs(11, (9, 6), 3)  # k = 6, r = 2 per task
    taus = [(tensor.double() - base.double()).numpy() for tensor in finetuned]
    parts = [top_triplets(tau, 2) for tau in taus]
    left = polar_by_eigh(np.concatenate([part[0] for part in parts], axis=1))
    right = polar_by_eigh(np.concatenate([part[2] for part in parts], axis=0).T).T
    expected = base.double().numpy() + 0.8 * left @ np.diag(np.concatenate([part[1] for part in parts])) @ right
    torch.testing.assert_close(run("tsv_m", base, finetuned, alpha=0.8), torch.from_numpy(expected), rtol=0, atol=1e-10)


def test_iso_cts_matches_a_numpy_reference():
    base, finetuned = random_inputs(12, (7, 10), 2)  # k = 7, c = int(7 * 0.5) = 3, s = int(4 / 2) = 2 per task
    taus = [(tensor.double() - base.double()).numpy() for tensor in finetuned]
    common_left, common_values, common_right = top_triplets(sum(taus), 3)
    parts = [(common_left, common_values, common_right)]
    parts += [top_triplets(tau - common_left @ common_left.T @ tau, 2) for tau in taus]
    left = polar_by_eigh(np.concatenate([part[0] for part in parts], axis=1))
    right = polar_by_eigh(np.concatenate([part[2] for part in parts], axis=0).T).T
    mean = np.concatenate([part[1] for part in parts]).mean()
    expected = base.double().numpy() + 1.2 * mean * left @ right
    merged = run("iso_cts", base, finetuned, alpha=1.2, common_space_fraction=0.5)
    torch.testing.assert_close(merged, torch.from_numpy(expected), rtol=0, atol=1e-10)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    base, finetuned = random_inputs(13, (5, 8), 3)
    merged = run("iso_c", base, finetuned, alpha=1.0) - base.double()
    total = sum(tensor.double() - base.double() for tensor in finetuned)
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(
        values, torch.full((5,), torch.linalg.svdvals(total).mean().item(), dtype=torch.float64), rtol=1e-10, atol=0
    )
    # same singular subspaces as the sum: projecting the sum onto them loses nothing
    left = torch.linalg.svd(merged, full_matrices=False).U
    torch.testing.assert_close(left @ left.T @ total, total, rtol=0, atol=1e-10)


def test_tsv_m_with_more_tasks_than_rank_is_the_base():
    base, finetuned = random_inputs(14, (2, 5), 3)  # k = 2 < T = 3: no component per task
    assert torch.equal(run("tsv_m", base, finetuned), base.double())


# ---- TIES against independent implementations -------------------------------------------------------------------


def reference_ties(base, finetuned, weights, *, alpha, density, sign_election, disjoint_mean):
    """TIES written the stacked way, with a full sort for the trim threshold."""
    taus = torch.stack([tensor.double() - base.double() for tensor in finetuned])
    flat = taus.reshape(len(finetuned), -1)
    keep_count = max(1, int(density * flat.shape[1]))
    threshold = flat.abs().sort(dim=1, descending=True).values[:, keep_count - 1 : keep_count]
    trimmed = (flat * (flat.abs() >= threshold)).reshape(taus.shape)
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * base.dim())
    voted = trimmed * (w if sign_election == "weighted" else 1)
    elected = torch.sign(voted.sum(0))
    elected[elected == 0] = 1
    agree = torch.sign(voted) == elected
    numerator = (trimmed * w * agree).sum(0)
    denominator = {
        "weight_sum": (w * agree).sum(0),
        "count": agree.sum(0).double(),
        "none": torch.ones_like(numerator),
    }[disjoint_mean]
    return base.double() + alpha * numerator / torch.where(denominator == 0, 1.0, denominator)


def random_inputs(seed, shape, count):
    """Continuous random inputs: no ties at the trim cut-off and no zero sign sums (almost surely)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + torch.randn(shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("sign_election", ["weighted", "unweighted"])
@pytest.mark.parametrize("disjoint_mean", ["weight_sum", "count", "none"])
@pytest.mark.parametrize(
    ("shape", "count", "density", "weights"),
    [
        ((64, 32), 3, 0.2, [1.0, 1.0, 1.0]),  # 409.6 entries: 409 kept
        ((50,), 4, 0.3, [0.5, 2.0, -1.0, 0.25]),
        ((8, 4, 3), 2, 0.75, [1.5, 0.7]),
        ((7, 3), 3, 0.03, [1.0, 1.0, 1.0]),  # 0.63 entries: 1 kept
    ],
)
def test_ties_matches_stacked_full_sort_reference(sign_election, disjoint_mean, shape, count, density, weights):
    base, finetuned = random_inputs(sum(shape) + count, shape, count)
    options = dict(alpha=0.7, density=density, sign_election=sign_election, disjoint_mean=disjoint_mean)
    merged = run("ties", base, finetuned, weights, **options)
    torch.testing.assert_close(merged, reference_ties(base, finetuned, weights, **options), rtol=0, atol=1e-12)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.5]])
def test_ties_unweighted_count_is_peft_ties(weights):
    base, finetuned = random_inputs(7, (40, 10), 3)  # density * numel = 80 exactly: PEFT's int() and our round agree
    merged = run(
        "ties", base, finetuned, weights, alpha=1.0, density=0.2, sign_election="unweighted", disjoint_mean="count"
    )
    taus = [tensor.double() - base.double() for tensor in finetuned]
    peft_delta = merge_utils.ties(taus, torch.tensor(weights, dtype=torch.float64), density=0.2)
    torch.testing.assert_close(merged, base.double() + peft_delta, rtol=0, atol=1e-12)


def test_equal_weights_make_the_conventions_agree():
    base, finetuned = random_inputs(5, (30, 20), 4)
    # Equal weights: weighted and unweighted sign election elect the same signs.
    equal = [0.6] * 4
    assert torch.equal(
        run("ties", base, finetuned, equal, sign_election="weighted"),
        run("ties", base, finetuned, equal, sign_election="unweighted"),
    )
    # Unit weights: dividing by the agreeing weights or by their count is the same.
    ones = [1.0] * 4
    for method in ("ties", "dare_ties"):
        assert torch.equal(
            run(method, base, finetuned, ones, disjoint_mean="weight_sum"),
            run(method, base, finetuned, ones, disjoint_mean="count"),
        )


def test_magnitude_band_uses_the_kth_largest_threshold():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0)).abs()
    ordered = values.sort(descending=True).values
    low, high = magnitude_band(values, keep=250, drop=50)
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


@pytest.mark.parametrize(
    ("method", "models", "parameters", "weights", "message"),
    [
        ("nope", 2, {}, None, "method: unknown merge method 'nope'"),
        ("ties", 2, {"lambda": 1}, None, "parameters.lambda: unknown parameter for method 'ties'"),
        ("ties", 2, {"density": 0}, None, "parameters.density: must be > 0.0"),
        ("ties", 2, {"density": 1.5}, None, "parameters.density: must be <= 1.0"),
        ("ties", 2, {"sign_election": "mass"}, None, "parameters.sign_election: must be one of"),
        ("ties", 2, {"alpha": "high"}, None, "parameters.alpha: expected a number"),
        (
            "della",
            2,
            {"density": 0.9, "epsilon": 0.1},
            None,
            "parameters.epsilon: density - epsilon and density + epsilon",
        ),
        ("slerp", 3, {}, None, "models: method 'slerp' needs 2 models, got 3"),
        ("linear_interpolation", 3, {}, None, "models: method 'linear_interpolation' needs 2 models, got 3"),
        ("model_stock", 1, {}, None, "needs at least 2 models"),
        ("task_arithmetic", 2, {}, [1.0], "weights: 1 weights for 2 models"),
    ],
)
def test_invalid_calls_name_the_problem(method, models, parameters, weights, message):
    base, finetuned = random_inputs(0, (4,), models)
    with pytest.raises(ValueError, match=re.escape(message)):
        get_method(method)(base, finetuned, weights, **parameters)


def test_yaml_style_number_strings_are_accepted():
    parameters = get_method("ties").resolve_parameters({"alpha": "1e-1", "density": 0.5})
    assert parameters["alpha"] == pytest.approx(0.1) and parameters["sign_election"] == "weighted"


def test_registry_accepts_new_methods_with_required_parameters(monkeypatch):
    monkeypatch.setattr(methods, "MERGE_METHODS", dict(MERGE_METHODS))  # registrations vanish after the test

    @register_merge_method(
        "scaled_mean", reference="a test", parameters=(MethodParameter("scale", "Multiplies the mean.", minimum=0.0),)
    )
    def scaled_mean(base, finetuned, weights, *, scale):
        return scale * torch.stack([tensor.double() for tensor in finetuned]).mean(0)

    base, finetuned = T([0.0, 0]), [T([1.0, 2]), T([3.0, 4])]
    with pytest.raises(ValueError, match=re.escape("parameters.scale: required by method 'scaled_mean'")):
        get_method("scaled_mean")(base, finetuned)
    assert torch.equal(get_method("scaled_mean")(base, finetuned, scale=2), T([4.0, 6]))
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method("scaled_mean", reference="again")(scaled_mean)


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
def test_paper_grid_searches_every_method_with_a_coefficient(name):
    method = get_method(name)
    if method.coefficient is None:
        with pytest.raises(ValueError, match=f"method {name!r} has no coefficient to search"):
            paper_grid(name)
        return
    grid = paper_grid(name)
    assert grid[method.coefficient] == [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    for value in grid[method.coefficient]:
        assert method.resolve_parameters({method.coefficient: value})[method.coefficient] == value


class LazyTensors(Sequence):
    """Tensors produced on each read, as the engine's ``_FinetunedTensors`` does; counts the reads."""

    def __init__(self, tensors):
        self.tensors, self.reads = tensors, 0

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, index):
        if not 0 <= index < len(self.tensors):
            raise IndexError(index)
        self.reads += 1
        return self.tensors[index].clone()


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_methods_read_a_lazy_sequence_in_at_most_two_passes(method):
    base, finetuned = random_inputs(15, (6, 4), 2)
    lazy = LazyTensors(finetuned)
    assert torch.equal(run(method, base, lazy), run(method, base, finetuned))
    assert lazy.reads <= 2 * len(finetuned)
