"""Per-model method parameters (density, gamma, epsilon) in saft_hf recipes (``models[i].parameters``) and in method
calls (one value per model); mergekit recipes with per-model values are checked against mergekit's recorded outputs
in test_mergekit_recipes.py and test_merge_parity.py."""

import re
from pathlib import Path

import pytest
import torch
from merge_fixtures import clip_vision_family
from safetensors.torch import load_file

from saft_hf.io import CheckpointReader
from saft_hf.merging import MergeConfig, get_method, merge
from saft_hf.merging.engine import tensor_seed
from saft_hf.merging.mergekit_format import from_mergekit


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return clip_vision_family(tmp_path_factory.mktemp("family"), count=3)


def test_ties_trims_each_model_at_its_own_density():
    base = torch.zeros(4, dtype=torch.float64)
    first, second = torch.tensor([4.0, -1.0, 2.0, 0.5]), torch.tensor([-3.0, 2.0, 1.0, 1.0])
    ties = get_method("ties")
    # first keeps its 2 largest (4, 2), second its largest (-3), which the elected + sign outvotes
    assert ties(base, [first, second], density=[0.5, 0.25]).tolist() == [4.0, 0.0, 2.0, 0.0]
    # one density for both: second keeps -3 and 2, and 2 is elected at entry 1
    assert ties(base, [first, second], density=0.5).tolist() == [4.0, 2.0, 2.0, 0.0]


def test_breadcrumbs_bands_follow_each_models_density_and_gamma():
    base = torch.zeros(10, dtype=torch.float64)
    ramp = torch.arange(1.0, 11.0)  # magnitudes 1..10
    merged = get_method("breadcrumbs")(base, [ramp, -ramp], alpha=1.0, density=[0.3, 0.5], gamma=[0.1, 0.0])
    # model 0 drops 10 and keeps 9, 8, 7; model 1 drops nothing and keeps -10 .. -6
    expected = torch.zeros(10, dtype=torch.float64)
    expected[6:9] += ramp[6:9]
    expected[5:] -= ramp[5:]
    assert torch.equal(merged, expected)


def test_a_list_needs_one_value_per_model_and_each_is_validated():
    base, tensors = torch.zeros(3), [torch.ones(3), torch.ones(3)]
    with pytest.raises(ValueError, match=r"^density: 3 values for 2 models$"):
        get_method("ties")(base, tensors, density=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"^models\[1\]\.parameters\.density: must be <= 1\.0, got 2\.0$"):
        get_method("ties")(base, tensors, density=[0.1, 2.0])
    with pytest.raises(ValueError, match=r"^models\[0\]\.parameters\.alpha: not a per-model parameter of method"):
        get_method("ties")(base, tensors, alpha=[0.1, 0.2])


def test_a_models_own_value_wins_over_parameters_and_tensor_parameters(family, tmp_path):
    base_dir, tuned = family
    config = {
        "base_model": str(base_dir),
        "models": [
            {"model": str(tuned[0]), "parameters": {"density": 0.3}},
            {"model": str(tuned[1])},
            {"model": str(tuned[2]), "parameters": {"density": 0.5}},
        ],
        "method": "dare_ties",
        "parameters": {"density": 0.7, "seed": 3},
        "tensor_parameters": [{"filter": "mlp", "parameters": {"density": 0.9}}],
        "output_dir": str(tmp_path / "out"),
    }
    merged = dict(CheckpointReader(merge(config, progress=False)))
    base = load_file(base_dir / "model.safetensors")
    states = [load_file(path / "model.safetensors") for path in tuned]
    method = get_method("dare_ties")
    for name, densities in [
        ("encoder.layers.0.mlp.fc1.weight", (0.3, 0.9, 0.5)),
        ("encoder.layers.1.self_attn.k_proj.weight", (0.3, 0.7, 0.5)),
    ]:
        parameters = method.resolve_parameters({"seed": tensor_seed(3, name)})
        expected = method.function(
            base[name], [state[name] for state in states], [1.0] * 3, **parameters | {"density": densities}
        )
        assert torch.equal(merged[name], expected.to(torch.float32)), name
    recorded = MergeConfig.from_yaml(Path(config["output_dir"]) / "merge_config.yaml")
    assert [model.parameters for model in recorded.models] == [{"density": 0.3}, {}, {"density": 0.5}]


@pytest.mark.parametrize(
    ("method", "models", "extra", "message"),
    [
        (
            "ties",
            [{"parameters": {"alpha": 0.5}}],
            {},
            "models[0].parameters.alpha: not a per-model parameter of method 'ties' (per-model: density)",
        ),
        (
            "task_arithmetic",
            [{}, {"parameters": {"density": 0.5}}],
            {},
            "models[1].parameters.density: not a per-model parameter of method 'task_arithmetic' (per-model: none)",
        ),
        ("ties", [{"parameters": {"density": 0}}], {}, "models[0].parameters.density: must be > 0.0, got 0.0"),
        (
            "ties",
            [{"parameters": {"density": [0.1, 0.2]}}],
            {},
            "models[0].parameters.density: expected one value for this model, got [0.1, 0.2]",
        ),
        ("ties", [{"parameters": "dense"}], {}, "models[0].parameters: expected a mapping of per-model parameters"),
        (
            "della",
            [{}, {"parameters": {"density": 0.2, "epsilon": 0.3}}],
            {},
            "models[1].parameters.epsilon: density - epsilon and density + epsilon must lie in (0, 1), got 0.2 -+ 0.3",
        ),
        # valid with the recipe-wide epsilon, not with the one tensor_parameters gives some tensors
        (
            "della",
            [{"parameters": {"density": 0.3}}],
            {"tensor_parameters": [{"filter": "mlp", "parameters": {"epsilon": 0.35}}]},
            "models[0].parameters.epsilon: density - epsilon and density + epsilon must lie in (0, 1), got 0.3 -+ 0.35",
        ),
    ],
)
def test_per_model_parameters_are_validated_before_anything_is_read(method, models, extra, message):
    recipe = {
        "base_model": "missing/base",
        "models": [{"model": f"missing/m{index}", **entry} for index, entry in enumerate(models)],
        "method": method,
        **extra,
    }
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        MergeConfig.from_dict(recipe)


def test_mergekit_per_model_values_become_the_models_own():
    converted = from_mergekit(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [
                {"model": "x", "parameters": {"weight": 1.0, "density": 0.3}},
                {"model": "y", "parameters": {"weight": 0.5}},
                {"model": "z", "parameters": {"weight": 1.0, "density": 1.5}},
            ],
            "parameters": {"density": [{"filter": "mlp", "value": 0.6}, {"value": 0.4}]},
        }
    )
    assert [model["parameters"] for model in converted["models"]] == [{"density": 0.3}, {}, {"density": 1.0}]
    assert converted["parameters"]["density"] == 0.4
    assert converted["tensor_parameters"] == [{"filter": "mlp", "parameters": {"density": 0.6}}]
