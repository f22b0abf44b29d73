import math

import pytest
import torch
from sam_reference import textbook_perturbation

import saft_hf.sharpness
from saft_hf.sharpness import flat_buffers_like, perturb_weights_, restore_weights_

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


def perturb(weights, grads, **case):
    """`perturb_weights_` with fresh saved-weight buffers; returns the stats and the buffers."""
    saved = flat_buffers_like(weights)
    return perturb_weights_(weights, grads, saved, **case), saved


def assert_perturbed(after, before, expected, tolerance=1e-6):
    """`after` is `before + e` for the float64 reference `e`, up to `tolerance` (and the rounding of `w + e`)."""
    for weight, original, e in zip(after, before, expected):
        torch.testing.assert_close(weight.double(), original.double() + e, rtol=tolerance, atol=tolerance)


def failing_compile(function, **options):
    def compiled(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    return compiled


@pytest.fixture
def fresh_compiled_sweeps(monkeypatch):
    """The fused sweeps as if never called in this process: whether compiling works is decided anew, and a failure
    does not outlive the test."""
    monkeypatch.setattr(saft_hf.sharpness, "_COMPILED", saft_hf.sharpness._CompiledOnFirstUse())


# How `perturb_weights_` computes: multi-tensor ops on whole tensors or in batches of 5 elements, or the fused
# per-tensor sweeps, compiled (slow: inductor compiles C++) or run eagerly after compiling failed.
PATHS = {
    "whole tensors": dict(chunk=None, compiled=False),
    "batches of 5": dict(chunk=5, compiled=False),
    "fused, eager after a failed compile": dict(chunk=None, compiled="fails"),
    "fused, compiled": pytest.param(dict(chunk=None, compiled=True), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_perturbation_matches_the_textbook_formula_and_restores_exactly(
    case, path, monkeypatch, caplog, fresh_compiled_sweeps
):
    if path["chunk"] is not None:
        monkeypatch.setattr(saft_hf.sharpness, "CHUNK_ELEMENTS", path["chunk"])
    if path["compiled"] == "fails":
        monkeypatch.setattr(torch, "compile", failing_compile)
    weights, grads = tensors(0), tensors(1)
    # A transposed (non-contiguous) pair is processed whole.
    weights[0], grads[0] = weights[0].t().contiguous().t(), grads[0].t().contiguous().t()
    assert not grads[0].is_contiguous()
    expected, expected_norm = textbook_perturbation(weights, grads, **case)
    saved = flat_buffers_like(weights)
    with caplog.at_level("WARNING", logger="saft_hf.sharpness"):
        stats = perturb_weights_(weights, grads, saved, compiled=bool(path["compiled"]), **case)
    assert stats.finite
    assert_perturbed(weights, tensors(0), expected)
    assert max((w - w0).abs().max().item() for w, w0 in zip(weights, tensors(0))) > 1e-3
    assert stats.grad_norm.item() == pytest.approx(expected_norm, rel=1e-6)
    assert stats.perturbation_norm.item() == pytest.approx(
        math.sqrt(sum(float((e**2).sum()) for e in expected)), rel=1e-6
    )
    if path["compiled"]:
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, tensors(1))), "the fused sweeps only read gradients"
    warnings = [record.getMessage() for record in caplog.records]
    if path["compiled"] == "fails":
        assert warnings == [
            "torch.compile of the (A)SAM perturbation failed (RuntimeError: InvalidCxxCompiler: No working C++ "
            "compiler found); using eager ops instead."
        ]
    else:
        assert warnings == []
    restore_weights_(weights, saved)
    assert all(torch.equal(w, w0) for w, w0 in zip(weights, tensors(0)))


def test_after_a_failed_compile_the_multi_tensor_ops_are_used(monkeypatch, fresh_compiled_sweeps):
    monkeypatch.setattr(torch, "compile", failing_compile)
    perturb(tensors(0), tensors(1), mode="asam", rho=0.5, compiled=True)
    grads = tensors(1)
    perturb(tensors(0), grads, mode="asam", rho=0.5, compiled=True)
    # The multi-tensor path leaves T^2 g in the gradients as scratch; the fused sweeps would not write them.
    assert not torch.equal(grads[0], tensors(1)[0])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["asam", "sam"])
def test_compiled_sweeps_give_the_multi_tensor_numbers_in_every_dtype(mode, fresh_compiled_sweeps):
    # Half precision is computed in float32 and rounded once, float64 stays float64, a gradient norm of ~1e-6
    # (`rho / ||g||` beyond the fp16 range) stays finite; the two paths differ only in the summation order of norms.
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    for scale in (1.0, 1e-7):
        results = []
        for compiled in (False, True):
            weights = [w.to(dtype) for w, dtype in zip(tensors(0), dtypes)]
            grads = [g.to(dtype) for g, dtype in zip(tensors(1, scale=scale), dtypes)]
            stats, _ = perturb(weights, grads, mode=mode, rho=0.5, compiled=compiled)
            results.append((weights, stats.grad_norm.item(), stats.perturbation_norm.item()))
        (eager, *eager_norms), (fused, *fused_norms) = results
        assert fused_norms == pytest.approx(eager_norms, rel=1e-6)
        for a, b in zip(fused, eager):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-6 if a.dtype in (torch.float32, torch.float64) else 1e-2, atol=0)


def test_sam_perturbation_has_norm_rho_and_asam_does_not():
    sam, _ = perturb(tensors(0), tensors(1), mode="sam", rho=0.05)
    assert sam.perturbation_norm.item() == pytest.approx(0.05, rel=1e-6)
    asam, _ = perturb(tensors(0), tensors(1), mode="asam", rho=0.05)
    assert asam.perturbation_norm.item() != pytest.approx(0.05, rel=1e-2)


def test_tensors_of_several_dtypes_share_one_global_norm():
    # Each dtype is its own group of fused ops; the norm must still run over all of them, and the half-precision
    # tensors' share of it must be computed in float32 (a bfloat16 `T` would move the float32 results by ~1e-3).
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    weights = [w.to(dtype) for w, dtype in zip(tensors(0), dtypes)]
    grads = [g.to(dtype) for g, dtype in zip(tensors(1), dtypes)]
    before = [w.clone() for w in weights]
    expected, expected_norm = textbook_perturbation(weights, grads, mode="asam", rho=0.5)
    stats, _ = perturb(weights, grads, mode="asam", rho=0.5)
    assert stats.grad_norm.item() == pytest.approx(expected_norm, rel=1e-6)
    assert [w.dtype for w in weights] == dtypes
    assert_perturbed(weights[0::2], before[0::2], expected[0::2])
    assert_perturbed(weights[1::2], before[1::2], expected[1::2], tolerance=1e-2)


@pytest.mark.parametrize("mode", ["asam", "sam"])
def test_zero_gradient_leaves_the_weights_in_place(mode):
    weights = tensors(0)
    stats, _ = perturb(weights, [torch.zeros(shape) for shape in SHAPES], mode=mode, rho=0.5)
    assert stats.finite
    assert all(torch.equal(w, w0) for w, w0 in zip(weights, tensors(0)))
    assert stats.perturbation_norm.item() == 0.0


@pytest.mark.parametrize("mode", ["asam", "sam"])
@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_gradient_is_reported_and_the_weights_left_untouched(mode, bad_value):
    weights, grads = tensors(0), tensors(1)
    grads[2][1, 0, 3] = bad_value
    stats, _ = perturb(weights, grads, mode=mode, rho=0.5)
    assert not stats.finite
    assert not math.isfinite(stats.grad_norm.item())
    assert all(torch.equal(w, w0) for w, w0 in zip(weights, tensors(0)))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_perturbation_is_invariant_to_a_loss_scale(case):
    # fp16 training hands the ascent pass gradients multiplied by the GradScaler's scale; they must not be unscaled.
    plain, scaled = tensors(0), tensors(0)
    plain_stats, _ = perturb(plain, tensors(1), **case)
    scaled_stats, _ = perturb(scaled, tensors(1, scale=2.0**16), **case)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert scaled_stats.grad_norm.item() == pytest.approx(plain_stats.grad_norm.item() * 2.0**16, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["asam", "sam"])
def test_low_precision_gradients_with_a_tiny_norm_stay_finite(dtype, mode):
    # rho / ||g|| = 0.5 / 1e-6 exceeds the fp16 range: it must not be rounded to the gradient's dtype on its own.
    weights = [w.to(dtype) for w in tensors(0)]
    grads = [g.to(dtype) for g in tensors(1, scale=1e-7)]
    before = [w.clone() for w in weights]
    expected, _ = textbook_perturbation(weights, grads, mode=mode, rho=0.5)
    stats, saved = perturb(weights, grads, mode=mode, rho=0.5)
    assert stats.finite
    assert all(w.dtype == dtype for w in weights)
    assert_perturbed(weights, before, expected, tolerance=1e-2)
    restore_weights_(weights, saved)
    assert all(torch.equal(w, w0) for w, w0 in zip(weights, before))


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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="adam"), "mode"),
        (dict(mode="sam", adaptive=[True]), "one entry per tensor"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        perturb(tensors(0), tensors(1), rho=0.5, **kwargs)
