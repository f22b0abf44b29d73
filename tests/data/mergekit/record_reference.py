"""Record mergekit's outputs for tests/test_merge_parity.py and tests/test_mergekit_recipes.py.

Run in a separate environment with mergekit (not in the project's: it pins other versions), from this folder:

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 && /tmp/mkvenv/bin/pip install mergekit
    /tmp/mkvenv/bin/python record_reference.py

It writes, next to itself:
- ``kernels.safetensors`` / ``kernels.json``: mergekit's per-tensor methods (``mergekit.merge_methods.api``) on
  float64 inputs of odd sizes, 1-D included, for the cases in ``KERNEL_CASES``;
- ``models/{base,model_a,model_b,model_c}``: tiny random Llama checkpoints, and ``outputs/NAME.safetensors``: the
  result of ``mergekit.merge.run_merge`` on ``recipes/NAME.yaml`` (the recipes are read with mergekit's own parser).

Random methods (DARE, DELLA) draw their masks with ``torch.bernoulli`` from the global generator; here it is
replaced by the draws saft_hf documents (``torch.rand`` in float32 from ``torch.Generator().manual_seed(seed + t)``
for model t, keep where below the keep probability; recipes: ``seed`` derived per tensor name as
``saft_hf.merging.engine.tensor_seed`` does, re-implemented below), so both sides use the same masks and every
other step is mergekit's own.
"""

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import mergekit
import torch
import transformers
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import generalized_task_arithmetic
from mergekit.merge_methods.api import merge_tensors
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
SHAPES = [(37,), (13, 7), (4, 3, 5)]
_draw = {"seed": 0, "counter": None}


def fake_bernoulli(probability, *args, **kwargs):
    """The keep mask saft_hf draws for the next model in order (see the module docstring)."""
    index = next(_draw["counter"])
    generator = torch.Generator().manual_seed(_draw["seed"] + index)
    return (torch.rand(probability.shape, generator=generator, dtype=torch.float32) < probability).to(probability.dtype)


# Each case: (mergekit method, its shared parameters, per-model parameters, model count, shapes, mask seed).
KERNEL_CASES = {
    "linear": ("linear", {}, {"weight": [1.0, 0.3, 0.5]}, 3, SHAPES, None),
    "linear_equal": ("linear", {}, {"weight": [1.0, 1.0, 1.0]}, 3, SHAPES, None),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.7}, {"weight": [1.0, 0.5, -0.3]}, 3, SHAPES, None),
    "task_arithmetic_normalize": ("task_arithmetic", {"normalize": True}, {"weight": [1.0, 0.5, 2.0]}, 3, SHAPES, None),
    "ties": ("ties", {}, {"weight": [1.0, 1.0, 1.0], "density": 0.3}, 3, SHAPES, None),
    "ties_weighted": ("ties", {"lambda": 0.9}, {"weight": [1.0, 2.0, 0.5], "density": 0.2}, 3, SHAPES, None),
    "ties_negative_weight": ("ties", {}, {"weight": [1.0, -0.5, 1.0], "density": 0.5}, 3, SHAPES, None),
    "ties_unnormalized": ("ties", {"normalize": False}, {"weight": [0.6, 0.4, 1.0], "density": 0.7}, 3, SHAPES, None),
    "breadcrumbs": ("breadcrumbs", {}, {"weight": [1.0, 1.0, 1.0], "density": 0.6, "gamma": 0.1}, 3, SHAPES, None),
    "breadcrumbs_overlap": (
        "breadcrumbs",
        {"lambda": 0.5},
        {"weight": [1.0, 0.5, 1.0], "density": 0.9, "gamma": 0.2},
        3,
        SHAPES,
        None,
    ),
    "dare_linear": ("dare_linear", {}, {"weight": [1.0, 0.5, 1.0], "density": 0.4}, 3, SHAPES, 7),
    "dare_linear_no_rescale": (
        "dare_linear",
        {"rescale": False},
        {"weight": [1.0, 1.0, 1.0], "density": 0.6},
        3,
        SHAPES,
        8,
    ),
    "dare_ties": ("dare_ties", {}, {"weight": [1.0, 1.0, 1.0], "density": 0.5}, 3, SHAPES, 9),
    "dare_ties_normalize": (
        "dare_ties",
        {"normalize": True, "lambda": 1.5},
        {"weight": [0.5, 1.0, 0.8], "density": 0.3},
        3,
        SHAPES,
        10,
    ),
    "della": ("della", {}, {"weight": [1.0, 1.0, 1.0], "density": 0.5, "epsilon": 0.2}, 3, SHAPES[:2], 11),
    "della_linear": (
        "della_linear",
        {"lambda": 0.8},
        {"weight": [1.0, 0.5, 1.0], "density": 0.6, "epsilon": 0.15},
        3,
        SHAPES[:2],
        12,
    ),
    "della_no_rescale": (
        "della",
        {"rescale": False},
        {"weight": [1.0, 1.0, 1.0], "density": 0.4, "epsilon": 0.1},
        3,
        SHAPES[:2],
        13,
    ),
    "model_stock": ("model_stock", {}, {}, 3, SHAPES, None),
    "model_stock_two": ("model_stock", {}, {}, 2, SHAPES, None),
    "slerp": ("slerp", {"t": 0.3}, {}, 1, SHAPES, None),
    "slerp_collinear": ("slerp", {"t": 0.6}, {}, 1, SHAPES, None),
    # per-model values (mergekit's models[].parameters), each model its own
    "ties_per_model": ("ties", {}, {"weight": [1.0, 0.5, 1.0], "density": [0.2, 0.5, 0.9]}, 3, SHAPES, None),
    "dare_ties_per_model": ("dare_ties", {}, {"weight": [1.0, 1.0, 1.0], "density": [0.3, 0.6, 1.0]}, 3, SHAPES, 14),
    "breadcrumbs_per_model": (
        "breadcrumbs",
        {},
        {"weight": [1.0, 1.0, 1.0], "density": [0.5, 0.8, 0.9], "gamma": [0.05, 0.1, 0.2]},
        3,
        SHAPES,
        None,
    ),
    "della_linear_per_model": (
        "della_linear",
        {},
        {"weight": [1.0, 1.0, 1.0], "density": [0.4, 0.6, 0.7], "epsilon": [0.1, 0.2, 0.15]},
        3,
        SHAPES[:2],
        15,
    ),
}
NO_BASE = {"linear"}  # mergekit's linear merges its inputs only


def kernel_inputs(case_index: int, shape: tuple[int, ...], count: int, collinear: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * case_index + len(shape))
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    if collinear:
        return [base, 1.7 * base]
    return [base, *(base + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(count))]


def record_kernels() -> None:
    tensors, cases = {}, {}
    for case_index, (case, (method, shared, per_model, count, shapes, seed)) in enumerate(KERNEL_CASES.items()):
        cases[case] = {
            "method": method,
            "parameters": shared,
            "models": per_model,
            "count": count,
            "shapes": [list(shape) for shape in shapes],
            "seed": seed,
        }
        for shape in shapes:
            inputs = kernel_inputs(case_index, shape, count, case == "slerp_collinear")
            ids = ["base", *(f"m{index}" for index in range(len(inputs) - 1))]
            parameters = dict(shared)
            for name, values in per_model.items():
                parameters[name] = dict(zip(ids[1:], values if isinstance(values, list) else [values] * count))
            _draw.update(seed=seed or 0, counter=itertools.count())
            if method in NO_BASE:
                output = merge_tensors(inputs[1:], method, parameters=parameters, ids=ids[1:])
            else:
                output = merge_tensors(inputs, method, parameters=parameters, ids=ids, base_index=0)
            key = f"{case}/{'x'.join(map(str, shape))}"
            for index, tensor in enumerate(inputs):
                tensors[f"{key}/input{index}"] = tensor
            tensors[f"{key}/output"] = output.to(torch.float64).contiguous()
    save_file(tensors, HERE / "kernels.safetensors")
    (HERE / "kernels.json").write_text(
        json.dumps(
            {"mergekit": mergekit.__version__ if hasattr(mergekit, "__version__") else "0.1.5", "cases": cases},
            indent=1,
        )
        + "\n"
    )


MODELS = ("base", "model_a", "model_b", "model_c")


def tensor_seed(seed: int, tensor_name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def write_models() -> dict[str, dict[str, torch.Tensor]]:
    config = transformers.LlamaConfig(
        vocab_size=37,
        hidden_size=12,
        intermediate_size=21,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    states = {}
    for index, name in enumerate(MODELS):
        folder = HERE / "models" / name
        shutil.rmtree(folder, ignore_errors=True)
        generator = torch.Generator().manual_seed(100 + index)
        state = {key: value.detach().clone() for key, value in base.state_dict().items()}
        if index:
            state = {key: value + 0.05 * torch.randn(value.shape, generator=generator) for key, value in state.items()}
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(state)
        model.save_pretrained(folder)
        states[name] = load_file(folder / "model.safetensors")
    return states


def record_recipes(states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Run every recipe; GTA sparsification learns which tensor and model it is given from the delta itself."""
    deltas = {
        (name, index): states[model][name] - states["base"][name]
        for index, model in enumerate(MODELS[1:])
        for name in states["base"]
    }
    original = generalized_task_arithmetic.sparsify

    def sparsify(delta, **kwargs):
        matches = [key for key, value in deltas.items() if value.shape == delta.shape and torch.equal(value, delta)]
        ((name, index),) = matches
        _draw.update(seed=tensor_seed(0, name) + index, counter=itertools.repeat(0))
        return original(delta, **kwargs)

    generalized_task_arithmetic.sparsify = sparsify
    output_root = HERE / "outputs"
    output_root.mkdir(exist_ok=True)
    for recipe in sorted((HERE / "recipes").glob("*.yaml")):
        data = yaml.safe_load(recipe.read_text())
        out = HERE / "scratch" / recipe.stem
        config = MergeConfiguration.model_validate(data)
        run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
        merged = {}
        for path in sorted(out.glob("*.safetensors")):
            merged.update(load_file(path))
        save_file(merged, output_root / f"{recipe.stem}.safetensors")
    shutil.rmtree(HERE / "scratch")


if __name__ == "__main__":
    torch.bernoulli = fake_bernoulli
    record_kernels()
    import os

    (HERE / "models").mkdir(exist_ok=True)
    os.chdir(HERE / "models")  # recipes name the models by relative path
    record_recipes(write_models())
