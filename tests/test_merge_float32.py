"""Task arithmetic in float32 (the engine's choice for float32 inputs and output) against the float64 path: within
float32 summation's error bound (and 1e-6), on tensors shaped and scaled like a fine-tuned ViT's; float64 where it
is not."""

from __future__ import annotations

import pytest
import torch
from merge_fixtures import clip_vision_family
from safetensors.torch import load_file

from saft_hf.merging import MergeConfig, MergePlan, merge
from saft_hf.merging.methods import get_method, task_arithmetic
from saft_hf.task_vectors import TaskVector

EPS32 = torch.finfo(torch.float32).eps


def vit_like_tensors(count: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A base with a projection (std 0.02), a LayerNorm weight (about 1), a bias (about 0) and an embedding with
    entries up to about 4, and ``count`` fine-tunes moved by 1e-3-sized updates, float32."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=generator)

    base = {
        "proj": normal(512, 512, scale=0.02),
        "norm": 1 + normal(512, scale=0.05),
        "bias": normal(512, scale=1e-3),
        "embedding": normal(50, 512),
    }
    tuned = [{name: tensor + normal(*tensor.shape, scale=1e-3) for name, tensor in base.items()} for _ in range(count)]
    return base, tuned


@pytest.mark.parametrize(("alpha", "weights"), [(0.3, [1.0] * 8), (1.0, [0.7, 0.5, -0.2, 1.3, 0.1, 0.9, 1.0, 0.4])])
def test_float32_task_arithmetic_is_within_one_rounding_of_float64(alpha, weights):
    base, tuned = vit_like_tensors(8)
    for name, tensor in base.items():
        finetuned = [state[name] for state in tuned]
        exact = task_arithmetic(tensor, finetuned, weights, alpha=alpha)
        fast = task_arithmetic(tensor, finetuned, weights, alpha=alpha, dtype=torch.float32)
        assert exact.dtype == torch.float64 and fast.dtype == torch.float32
        reference = exact.float()
        difference = (fast - reference).abs()
        assert difference.max() <= 1e-6, name
        # float32 summation's error bound: eps * (|result| + T |alpha| sum_t |w_t tau_t|)
        spread = sum(abs(w) * (state.double() - tensor.double()).abs() for w, state in zip(weights, finetuned))
        bound = EPS32 * (exact.abs() + len(weights) * abs(alpha) * spread)
        assert bool((difference <= bound).all()), name


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16])
def test_float32_task_arithmetic_is_the_plain_float32_sum_bit_for_bit(input_dtype):
    # computed block by block over all models at once: 2**16 + 3 entries end in a partial block
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(2**16 + 3, generator=generator)
    tuned = [(base + 1e-3 * torch.randn(base.shape, generator=generator)).to(input_dtype) for _ in range(3)]
    weights = [0.7, 1.0, -0.2]
    total = torch.zeros_like(base)
    for weight, tensor in zip(weights, tuned):
        total.add_(tensor.float() - base, alpha=weight)
    expected = torch.add(base, total, alpha=0.3)
    fast = task_arithmetic(base, tuned, weights, alpha=0.3, dtype=torch.float32)
    assert fast.dtype == torch.float32 and torch.equal(fast, expected)


def test_only_task_arithmetic_opts_into_float32():
    assert [
        name
        for name in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs", "weight_average", "slerp")
        if get_method(name).float32
    ] == ["task_arithmetic"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return clip_vision_family(tmp_path_factory.mktemp("family"), count=3)


def merged(folder) -> dict[str, torch.Tensor]:
    return {name: tensor for path in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(path).items()}


def recipe(family, output_dir, **changes) -> dict:
    base_dir, tuned = family
    return {
        "base_model": str(base_dir),
        "models": [str(path) for path in tuned],
        "method": "task_arithmetic",
        "parameters": {"alpha": 0.4},
        "output_dir": str(output_dir),
        **changes,
    }


def test_engine_merges_float32_models_in_float32(family, tmp_path):
    out = merged(merge(recipe(family, tmp_path / "out"), progress=False))
    base_dir, tuned_dirs = family
    base, tuned = load_file(base_dir / "model.safetensors"), [load_file(d / "model.safetensors") for d in tuned_dirs]
    for name, tensor in base.items():
        finetuned = [state[name] for state in tuned]
        fast = task_arithmetic(tensor, finetuned, [1.0] * 3, alpha=0.4, dtype=torch.float32)
        assert torch.equal(out[name], fast), name  # the float32 path, bit for bit
        exact = task_arithmetic(tensor, finetuned, [1.0] * 3, alpha=0.4).float()
        assert (out[name] - exact).abs().max() <= 1e-6, name


def test_engine_keeps_float64_for_a_float64_output_or_a_task_vector_input(family, tmp_path):
    base_dir, tuned_dirs = family
    plan = MergePlan(MergeConfig.coerce(recipe(family, tmp_path / "unused", dtype="float64")))
    base, tuned = load_file(base_dir / "model.safetensors"), [load_file(d / "model.safetensors") for d in tuned_dirs]
    name = "post_layernorm.weight"
    exact = task_arithmetic(base[name], [state[name] for state in tuned], [1.0] * 3, alpha=0.4)
    assert torch.equal(plan.merge_tensor(name), exact)  # float64 output: computed in float64
    TaskVector.from_models(base_dir, tuned_dirs[0]).save_pretrained(tmp_path / "tv")
    with_vector = recipe(family, tmp_path / "unused", models=[str(tmp_path / "tv"), *map(str, tuned_dirs[1:])])
    plan = MergePlan(MergeConfig.coerce(with_vector))
    assert not plan._float32_enough(name)
    assert MergePlan(MergeConfig.coerce(recipe(family, tmp_path / "unused")))._float32_enough(name)
