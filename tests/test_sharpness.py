import math

import pytest
import torch
from sam_reference import textbook_perturbation

import saft_hf.sharpness
from saft_hf.sharpness import adaptive_scale, flat_buffers_like, global_l2_norm, gradients_to_perturbation_

SHAPES = [(4, 3), (3,), (2, 2, 5), ()]
# The last two tensors play biases for scope "weights": the official ASAM code leaves them unscaled (T = 1).
WEIGHTS_ONLY = [True, False, True, False]


def tensors(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * scale for shape in SHAPES]


CASES = {
    "asam eta 0.01 all": dict(mode="asam", rho=0.5, eta=0.01, adaptive=None),
    "asam eta 0 all (paper code)": dict(mode="asam", rho=0.5, eta=0.0, adaptive=None),
    "asam eta 0.01 weights": dict(mode="asam", rho=0.5, eta=0.01, adaptive=WEIGHTS_ONLY),
    "sam": dict(mode="sam", rho=0.05, eta=0.01, adaptive=None),
}


@pytest.mark.parametrize("chunk", [None, 5], ids=["whole tensors", "slices of 5"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_perturbation_matches_the_textbook_formula(case, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(saft_hf.sharpness, "CHUNK_ELEMENTS", chunk)
    weights, grads = tensors(0), tensors(1)
    # A transposed (non-contiguous) pair is processed whole.
    weights[0], grads[0] = weights[0].t().contiguous().t(), grads[0].t().contiguous().t()
    assert not grads[0].is_contiguous()
    expected, expected_norm = textbook_perturbation(weights, grads, **case)
    stats = gradients_to_perturbation_(weights, grads, **case)
    assert stats.finite
    for e, reference in zip(grads, expected):
        torch.testing.assert_close(e.double(), reference, rtol=1e-6, atol=1e-6)
    assert stats.grad_norm.item() == pytest.approx(expected_norm, rel=1e-6)
    assert stats.perturbation_norm.item() == pytest.approx(
        math.sqrt(sum(float((e**2).sum()) for e in expected)), rel=1e-6
    )


def test_sam_perturbation_has_norm_rho_and_asam_does_not():
    sam_grads, asam_grads = tensors(1), tensors(1)
    assert gradients_to_perturbation_(tensors(0), sam_grads, mode="sam", rho=0.05).perturbation_norm.item() == (
        pytest.approx(0.05, rel=1e-6)
    )
    asam = gradients_to_perturbation_(tensors(0), asam_grads, mode="asam", rho=0.05)
    assert asam.perturbation_norm.item() != pytest.approx(0.05, rel=1e-2)


@pytest.mark.parametrize("mode", ["asam", "sam"])
def test_weights_are_not_modified(mode):
    weights = tensors(0)
    gradients_to_perturbation_(weights, tensors(1), mode=mode, rho=0.5)
    assert all(torch.equal(a, b) for a, b in zip(weights, tensors(0)))


@pytest.mark.parametrize("mode", ["asam", "sam"])
def test_zero_gradient_gives_zero_perturbation(mode):
    grads = [torch.zeros(shape) for shape in SHAPES]
    stats = gradients_to_perturbation_(tensors(0), grads, mode=mode, rho=0.5)
    assert stats.finite
    assert all(torch.equal(e, torch.zeros_like(e)) for e in grads)
    assert stats.perturbation_norm.item() == 0.0


@pytest.mark.parametrize("mode", ["asam", "sam"])
@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_gradient_is_reported_and_left_untouched(mode, bad_value):
    grads = tensors(1)
    grads[2][1, 0, 3] = bad_value
    before = [grad.clone() for grad in grads]
    stats = gradients_to_perturbation_(tensors(0), grads, mode=mode, rho=0.5)
    assert not stats.finite
    for grad, original in zip(grads, before):
        torch.testing.assert_close(grad, original, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_perturbation_is_invariant_to_a_loss_scale(case):
    # fp16 training hands the ascent pass gradients multiplied by the GradScaler's scale; they must not be unscaled.
    plain, scaled = tensors(1), tensors(1, scale=2.0**16)
    plain_stats = gradients_to_perturbation_(tensors(0), plain, **case)
    scaled_stats = gradients_to_perturbation_(tensors(0), scaled, **case)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert scaled_stats.grad_norm.item() == pytest.approx(plain_stats.grad_norm.item() * 2.0**16, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["asam", "sam"])
def test_low_precision_gradients_with_a_tiny_norm_stay_finite(dtype, mode):
    # rho / ||g|| = 0.5 / 1e-6 exceeds the fp16 range: it must not be rounded to the gradient's dtype on its own.
    weights = [w.to(dtype) for w in tensors(0)]
    grads = [g.to(dtype) for g in tensors(1, scale=1e-7)]
    expected, _ = textbook_perturbation(weights, grads, mode=mode, rho=0.5)
    stats = gradients_to_perturbation_(weights, grads, mode=mode, rho=0.5)
    assert stats.finite
    for e, reference in zip(grads, expected):
        assert e.dtype == dtype
        torch.testing.assert_close(e.double(), reference, rtol=1e-2, atol=1e-3)


def test_global_l2_norm_is_the_norm_of_the_concatenation():
    values = tensors(2)
    expected = torch.cat([v.reshape(-1) for v in values]).double().norm()
    assert global_l2_norm(values).item() == pytest.approx(expected.item(), rel=1e-6)
    assert global_l2_norm(v for v in values).item() == pytest.approx(expected.item(), rel=1e-6)
    assert global_l2_norm([]).item() == 0.0


def test_flat_buffers_are_shaped_like_the_tensors_in_one_allocation_per_dtype():
    originals = tensors(3) + [torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)]
    buffers = flat_buffers_like(originals)
    assert [(b.shape, b.dtype) for b in buffers] == [(t.shape, t.dtype) for t in originals]
    float32 = [b for b in buffers if b.dtype == torch.float32]
    assert len({b.untyped_storage().data_ptr() for b in float32}) == 1
    assert float32[0].untyped_storage().nbytes() == sum(b.numel() for b in float32) * 4
    for buffer, original in zip(buffers, originals):
        buffer.copy_(original)
    assert all(torch.equal(b, t) for b, t in zip(buffers, originals)), "the views must not overlap"


def test_adaptive_scale_is_abs_plus_eta_in_float32():
    weight = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.bfloat16)
    scale = adaptive_scale(weight, 0.01)
    assert scale.dtype == torch.float32
    torch.testing.assert_close(scale, torch.tensor([2.01, 0.01, 3.01]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="adam"), "mode"),
        (dict(mode="sam", adaptive=[True]), "one entry per tensor"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradients_to_perturbation_(tensors(0), tensors(1), rho=0.5, **kwargs)
