"""mergekit recipes read as they are: converted with mergekit's semantics, merged by saft_hf's engine, and compared
with what mergekit 0.1.5 wrote for the same recipes on the same tiny Llama checkpoints (recorded by
tests/data/mergekit/record_reference.py, with DARE/DELLA masks replaced by saft_hf's seeded draws)."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saft_hf.merging import MergeConfig, merge
from saft_hf.merging.mergekit_format import from_mergekit

DATA = Path(__file__).parent / "data" / "mergekit"
RECIPES = sorted(path.stem for path in (DATA / "recipes").glob("*.yaml"))


@pytest.fixture
def in_models(monkeypatch):
    monkeypatch.chdir(DATA / "models")  # the recipes name the models by relative path, as mergekit users do


def merged_weights(folder):
    merged = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        merged.update(load_file(path))
    return merged


def test_every_documented_method_has_a_recipe():
    assert set(RECIPES) >= {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "model_stock",
        "slerp",
    }


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_gives_mergekits_tensors(in_models, tmp_path, name):
    recipe = yaml.safe_load((DATA / "recipes" / f"{name}.yaml").read_text())
    out = merge({**recipe, "output_dir": str(tmp_path / "out")}, progress=False)
    ours, theirs = merged_weights(out), load_file(DATA / "outputs" / f"{name}.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, expected in theirs.items():
        assert ours[key].dtype == expected.dtype, key
        # mergekit computes in float32 here, saft_hf in float64: equal to float32 (or bfloat16 output) rounding
        tolerance = {"rtol": 1.6e-2, "atol": 1e-5} if expected.dtype == torch.bfloat16 else {"rtol": 0, "atol": 1e-6}
        torch.testing.assert_close(ours[key], expected, **tolerance, msg=f"{name}: {key}")
    recorded = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert "merge_method" not in recorded and recorded["method"]  # recorded in saft_hf's format


def test_conversion_maps_mergekit_semantics():
    # normalize on a linear sum divides lambda by the weight sum; ties' divisor and sign rule are mergekit's
    converted = from_mergekit(
        {
            "merge_method": "task_arithmetic",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": 0.5}}, {"model": "y", "parameters": {"weight": 1.5}}],
            "parameters": {"normalize": True, "lambda": 0.8},
        }
    )
    assert converted["parameters"] == {"alpha": 0.4}
    converted = from_mergekit(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": ["b", "x", "y"],
            "parameters": {"weight": 1.0, "density": 1.7, "normalize": False, "lambda": 2},
        }
    )
    assert [model["model"] for model in converted["models"]] == ["x", "y"]  # the base is not merged with itself
    assert converted["parameters"] == {"alpha": 2, "sign_election": "weighted", "disjoint_mean": "none", "density": 1.0}
    converted = from_mergekit(
        {
            "merge_method": "dare_ties",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": 1, "density": 0.4}}],
            "parameters": {"rescale": False},
            "out_dtype": "float16",
            "dtype": "float32",
            "output_dir": "merged",
        }
    )
    assert converted["parameters"]["rescale"] == "none" and converted["parameters"]["disjoint_mean"] == "none"
    assert converted["dtype"] == "float16" and converted["output_dir"] == "merged"
    slerp = from_mergekit(
        {"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}], "parameters": {"t": 0.2}}
    )
    assert slerp["models"] == ["b", "a"] and slerp["parameters"] == {"t": 0.2}


def test_filters_on_two_parameters_become_exclusive_regexes(in_models):
    config = MergeConfig.from_dict(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [
                {"model": "model_a", "parameters": {"weight": 1.0}},
                {"model": "model_b", "parameters": {"weight": 1.0}},
            ],
            "parameters": {
                "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}],
                "lambda": [{"filter": "self_attn", "value": 0.5}, {"filter": "up_proj", "value": 2.0}],
            },
        }
    )
    expected = {  # tensor name -> (density, alpha), by mergekit's rule: each parameter's first matching filter
        "model.layers.0.mlp.up_proj.weight": (0.3, 2.0),
        "model.layers.0.mlp.down_proj.weight": (0.3, 1.0),
        "model.layers.0.self_attn.q_proj.weight": (0.6, 0.5),
        "model.norm.weight": (0.6, 1.0),
    }
    for name, (density, alpha) in expected.items():
        parameters = config.parameters_for(name)
        assert (parameters["density"], parameters["alpha"]) == (density, alpha), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}]}]}, "slices: mergekit's layer slices are not"),
        ({"tokenizer_source": "union"}, "tokenizer_source: only the base model's tokenizer is supported"),
        ({"tokenizer": {"source": "union"}}, "tokenizer: tokenizer surgery is not supported"),
        ({"chat_template": "chatml"}, "chat_template: setting a chat template is not supported"),
        ({"merge_method": "nuslerp"}, "merge_method: mergekit method 'nuslerp' is not supported"),
        (
            {"models": [{"model": "a", "parameters": {"weight": 1.0}}], "parameters": {"density": [1, 0.7, 0.1]}},
            "parameters.density: gradients (lists of values over layers) are not supported",
        ),
        (
            {"models": [{"model": "a", "parameters": {"weight": 1, "density": [{"filter": "mlp", "value": 0.5}]}}]},
            "models[0].parameters.density: filters and gradients are not supported here",
        ),
        (
            {"models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}}]},
            "models[0].parameters.weight: filters and gradients are not supported here",
        ),
        ({"models": [{"model": "a"}]}, "models[0].parameters.weight: required by mergekit"),
        ({"models": [{"model": "a+lora", "parameters": {"weight": 1}}]}, "models[0].model: mergekit's `model+lora`"),
        ({"parameters": {"rescale": True}}, "parameters.rescale: saft_hf's ties does not rescale"),
        ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon: not a parameter of mergekit's ties"),
        ({"base_model": None}, "base_model: required by mergekit's ties"),
        ({"lora_merge_cache": "/tmp"}, "lora_merge_cache: unknown field in a mergekit recipe"),
        # Wrong types: YAML reads `5e-1` as a string; mergekit takes any truthy value as true.
        ({"parameters": {"density": "5e-1"}}, "parameters.density: expected a finite number, got '5e-1'"),
        ({"parameters": {"density": float("nan")}}, "parameters.density: expected a finite number, got nan"),
        ({"parameters": {"lambda": "0.5"}}, "parameters.lambda: expected a finite number, got '0.5'"),
        ({"parameters": {"normalize": "false"}}, "parameters.normalize: expected true or false, got 'false'"),
        ({"parameters": {"int8_mask": 7}}, "parameters.int8_mask: expected true or false, got 7"),
        (
            {"parameters": {"lambda": [{"filter": "mlp", "value": "x"}, {"value": 1.0}]}},
            "parameters.lambda[0].value: expected a finite number, got 'x'",
        ),
        (
            {"models": [{"model": "a", "parameters": {"weight": 1, "density": float("nan")}}]},
            "models[0].parameters.density: expected a finite number, got nan",
        ),
        ({"merge_method": ["ties"]}, "merge_method: mergekit method ['ties'] is not supported"),
        (
            {"models": [{"model": m, "parameters": {"weight": 1e308}} for m in "ac"]},
            "models: the weights sum to more than a float64 holds; use smaller weights",
        ),
        (
            {"models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "a", "parameters": {"weight": 1}}]},
            "models[1]: the same model as models[0] (a); list each model once and give it the weight it should have "
            "(mergekit counts a repeated model once)",
        ),
    ],
)
def test_unsupported_mergekit_features_are_refused_in_one_line(change, message):
    recipe = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}],
        **change,
    }
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        MergeConfig.from_dict(recipe)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            {
                "merge_method": "linear",
                "models": [
                    {"model": "a", "parameters": {"weight": 0.5}},
                    {"model": "c", "parameters": {"weight": 0.2}},
                ],
                "parameters": {"normalize": False},
            },
            "parameters.normalize: saft_hf's weight_average normalises",
        ),
        (
            {"merge_method": "linear", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}]},
            "base_model: mergekit's linear would merge it as one more input",
        ),
        (
            {
                "merge_method": "model_stock",
                "base_model": "b",
                "models": ["a", "c"],
                "parameters": {"filter_wise": True},
            },
            "parameters.filter_wise: per-row model stock is not supported",
        ),
        (
            {"merge_method": "slerp", "base_model": "b", "models": ["a", "c"], "parameters": {"t": 0.5}},
            "models: mergekit's slerp needs the base model and one other, got 2 others",
        ),
        ({"merge_method": "slerp", "base_model": "b", "models": ["a"]}, "parameters.t: required by mergekit's slerp"),
    ],
)
def test_method_specific_refusals(recipe, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MergeConfig.from_dict(recipe)


def test_int8_mask_is_accepted_and_changes_nothing(in_models):
    recipe = yaml.safe_load((DATA / "recipes" / "ties.yaml").read_text())
    assert recipe["parameters"]["int8_mask"] is True
    without = {**recipe, "parameters": {"normalize": True}}
    assert MergeConfig.from_dict(recipe) == MergeConfig.from_dict(without)


def test_command_line_merges_a_mergekit_recipe_file(in_models, tmp_path):
    from saft_hf.cli import run_merge

    out = run_merge(DATA / "recipes" / "slerp.yaml", output_dir=str(tmp_path / "out"), progress=False)
    ours, theirs = merged_weights(out), load_file(DATA / "outputs" / "slerp.safetensors")
    assert all(torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-6) for key in theirs)
    recorded = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert recorded["method"] == "slerp" and recorded["tensor_parameters"][0] == {
        "filter": "self_attn",
        "parameters": {"t": 0.3},
    }


def test_coefficient_search_varies_slerps_t(in_models):
    from saft_hf.merging import search_coefficients

    config = MergeConfig.from_dict(
        {"merge_method": "slerp", "base_model": "base", "models": ["model_a"], "parameters": {"t": 0.5}}
    )
    target = load_file(Path("model_a") / "model.safetensors")

    def closeness(state):  # highest at t = 1, the second model
        return -sum(float((state[key].double() - target[key].double()).norm()) for key in target)

    result = search_coefficients(config, closeness, write_best=False, progress=False)
    assert [row["t"] for row in result.table] == [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    assert result.best_parameters == {"t": 1.0} and result.best_score == pytest.approx(0.0, abs=1e-6)
