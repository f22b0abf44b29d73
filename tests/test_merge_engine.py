"""The streaming merge engine on tiny saved models: equality with an in-memory merge, sharded loadable output,
atomicity and clear errors, recipes, task vector inputs, CLIP towers, coefficient search, CLI and recipe script."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merge_fixtures import clip_vision_family, finetune_like, save, tiny_clip, tiny_clip_vision, tiny_t5
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPVisionModel

from saft_hf.cli import main as cli_main
from saft_hf.errors import NonFiniteError, UnsafeOutputError
from saft_hf.hub import _folder_files
from saft_hf.io import CheckpointReader, ShardedSafetensorsWriter, TensorSpec
from saft_hf.merging import MergeConfig, get_method, merge, search_coefficients
from saft_hf.merging.engine import tensor_seed
from saft_hf.task_vectors import TaskVector

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return clip_vision_family(tmp_path_factory.mktemp("family"), count=3)


def recipe(family, output_dir, method="ties", parameters=None, **extra):
    base_dir, tuned = family
    return {
        "base_model": str(base_dir),
        "models": [{"model": str(path)} for path in tuned],
        "method": method,
        "parameters": parameters or {},
        "output_dir": str(output_dir),
        **extra,
    }


def merged_weights(folder):
    return dict(CheckpointReader(folder))


def in_memory_merge(config):
    """The merge done the naive way: every state dict fully loaded, the method applied name by name."""
    config = MergeConfig.coerce(config)
    method = get_method(config.method)
    base = {name: tensor.clone() for name, tensor in load_file(Path(config.base_model) / "model.safetensors").items()}
    states = [load_file(Path(spec.model) / "model.safetensors") for spec in config.models]
    weights = [spec.weight for spec in config.models]
    merged = {}
    for name, tensor in base.items():
        parameters = config.parameters_for(name)
        if method.seeded:
            parameters["seed"] = tensor_seed(parameters["seed"], name)
        if method.float32:  # the engine's choice for these float32 checkpoints
            parameters["dtype"] = torch.float32
        merged[name] = method.function(tensor, [state[name] for state in states], weights, **parameters).to(
            tensor.dtype
        )
    return merged


def no_leftovers(parent):
    return not [path.name for path in Path(parent).iterdir() if path.name.startswith(".")]


# ---- results ----------------------------------------------------------------------------------------------------

METHOD_CASES = [
    ("weight_average", {}, [1.0, 2.0, 0.5]),
    ("task_arithmetic", {"alpha": 0.4}, [1.0, -0.5, 2.0]),
    ("ties", {"alpha": 0.8, "density": 0.3}, [1.0, 2.0, 0.5]),
    ("ties", {"density": 0.2, "sign_election": "unweighted", "disjoint_mean": "count"}, [1.0, 1.0, 1.0]),
    ("dare_linear", {"density": 0.4, "seed": 3}, [1.0, 1.0, 1.0]),
    ("dare_ties", {"density": 0.5, "rescale": "l1_norm"}, [1.0, 0.5, 1.0]),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}, [1.0, 1.0, 1.0]),
    ("model_stock", {}, [1.0, 1.0, 1.0]),
]


@pytest.mark.parametrize(("method", "parameters", "weights"), METHOD_CASES)
def test_streaming_merge_equals_in_memory_merge_bit_for_bit(family, tmp_path, method, parameters, weights):
    config = recipe(family, tmp_path / "out", method, parameters, max_shard_size=5000)
    for spec, weight in zip(config["models"], weights):
        spec["weight"] = weight
    merge(config, progress=False)
    merged, expected = merged_weights(tmp_path / "out"), in_memory_merge(config)
    assert list(merged) == list(expected)
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


def test_linear_interpolation_of_two_models(family, tmp_path):
    base_dir, tuned = family
    config = {
        "base_model": str(base_dir),
        "models": [str(tuned[0]), str(tuned[1])],
        "method": "linear_interpolation",
        "parameters": {"alpha": 0.25},
        "output_dir": str(tmp_path / "out"),
    }
    merge(config, progress=False)
    first, second = load_file(tuned[0] / "model.safetensors"), load_file(tuned[1] / "model.safetensors")
    for name, tensor in merged_weights(tmp_path / "out").items():
        assert torch.equal(tensor, (0.75 * first[name].double() + 0.25 * second[name].double()).float())


def test_task_arithmetic_alpha_one_on_one_model_reproduces_it(family, tmp_path):
    base_dir, tuned = family
    merge(
        {
            "base_model": str(base_dir),
            "models": [str(tuned[0])],
            "method": "task_arithmetic",
            "parameters": {"alpha": 1.0},
            "output_dir": str(tmp_path / "out"),
        },
        progress=False,
    )
    expected = load_file(tuned[0] / "model.safetensors")
    assert all(torch.equal(tensor, expected[name]) for name, tensor in merged_weights(tmp_path / "out").items())


def test_sharded_output_is_a_loadable_model_with_recipe_and_card(family, tmp_path):
    config = recipe(family, tmp_path / "out", "ties", {"alpha": 1.0, "density": 0.2}, max_shard_size="20KB")
    out = merge(config, progress=False)
    files = sorted(path.name for path in out.iterdir())
    shards = [name for name in files if re.fullmatch(r"model-\d{5}-of-(\d{5})\.safetensors", name)]
    assert len(shards) > 1 and "model.safetensors" not in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged_weights(out).values())
    assert {"config.json", "preprocessor_config.json", "merge_config.yaml", "README.md"} <= set(files)
    model = CLIPVisionModel.from_pretrained(out)
    expected = in_memory_merge(config)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    card = (out / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert "- merge" in front_matter and "- ties" in front_matter and "density: 0.2" in card


def test_recorded_recipe_reruns_to_identical_weights(family, tmp_path):
    config = recipe(
        family,
        tmp_path / "first",
        "dare_ties",
        {"density": 0.5, "seed": 7},
        tensor_parameters=[{"filter": "re:layers\\.0\\.", "parameters": {"alpha": 0.3}}],
    )
    first = merge(config, progress=False)
    written = yaml.safe_load((first / "merge_config.yaml").read_text())
    assert MergeConfig.from_dict(written).to_dict() == MergeConfig.from_dict(config).to_dict()
    second = merge(
        MergeConfig.from_yaml(first / "merge_config.yaml").replace(output_dir=str(tmp_path / "second")), progress=False
    )
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    # Re-running into the first folder replaces the earlier merge in place.
    merge(first / "merge_config.yaml", progress=False)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_tensor_parameters_override_by_filter(family, tmp_path):
    config = recipe(
        family,
        tmp_path / "out",
        "task_arithmetic",
        {"alpha": 0.2},
        tensor_parameters=[
            {"filter": "layers.1.mlp", "parameters": {"alpha": 0.9}},
            {"filter": "re:mlp", "parameters": {"alpha": 0.0}},
        ],
    )
    merged = merged_weights(merge(config, progress=False))
    base = load_file(Path(config["base_model"]) / "model.safetensors")
    assert torch.equal(merged["encoder.layers.0.mlp.fc1.weight"], base["encoder.layers.0.mlp.fc1.weight"])
    for name, alpha in [("encoder.layers.1.mlp.fc1.weight", 0.9), ("encoder.layers.1.self_attn.q_proj.weight", 0.2)]:
        plain = merge(recipe(family, tmp_path / f"plain{alpha}", "task_arithmetic", {"alpha": alpha}), progress=False)
        assert torch.equal(merged[name], merged_weights(plain)[name])


def test_output_dtype_defaults_to_base_and_can_be_chosen(family, tmp_path):
    out = merge(recipe(family, tmp_path / "out", "task_arithmetic", dtype="bfloat16"), progress=False)
    assert {tensor.dtype for tensor in merged_weights(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert CLIPVisionModel.from_pretrained(out).dtype == torch.bfloat16


@pytest.mark.parametrize("max_shard_size", [40, "1GB"])
def test_writer_streams_every_dtype_and_shape_readably(tmp_path, max_shard_size):
    tensors = {
        "weight": torch.randn(3, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 5),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "transposed": torch.randn(4, 3).T,
    }
    specs = [TensorSpec(name, tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path, specs, max_shard_size=max_shard_size) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        files = writer.close()
    assert (len(files) > 2) == (max_shard_size == 40)
    for file in files:
        if file.suffix == ".safetensors":
            assert all(torch.equal(tensor, tensors[name]) for name, tensor in load_file(file).items())
    read = CheckpointReader(tmp_path)
    assert sorted(read) == sorted(tensors) and read.metadata == {"format": "pt"}
    assert all(torch.equal(read[name], tensor) and read.dtype(name) == tensor.dtype for name, tensor in tensors.items())


def test_writer_refuses_tensors_out_of_plan(tmp_path):
    with ShardedSafetensorsWriter(tmp_path, [TensorSpec("a", (2,), torch.float32)]) as writer:
        with pytest.raises(ValueError, match=r"tensor 'b' \[2\] torch.float32 is not the planned 'a'"):
            writer.add("b", torch.zeros(2))
        with pytest.raises(ValueError, match="only 0 of 1 planned tensors were written"):
            writer.close()


def test_pickle_weights_need_opt_in(family, tmp_path):
    base_dir, tuned = family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tuned[0] / "config.json").read_text())
    torch.save(load_file(tuned[0] / "model.safetensors"), pickled / "pytorch_model.bin")
    config = {**recipe(family, tmp_path / "out", "task_arithmetic"), "models": [str(pickled), str(tuned[1])]}
    with pytest.raises(ValueError, match=r"pickled: only pickle weights \(pytorch_model.bin\).*allow_pickle: true"):
        merge(config, progress=False)
    assert not (tmp_path / "out").exists()
    merge({**config, "allow_pickle": True}, progress=False)
    reference = merge(
        {**config, "models": [str(tuned[0]), str(tuned[1])], "output_dir": str(tmp_path / "ref")}, progress=False
    )
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


# ---- task vector inputs and CLIP towers -------------------------------------------------------------------------


def test_task_vector_folders_merge_like_their_models(family, tmp_path):
    base_dir, tuned = family
    vectors = [
        TaskVector.from_models(base_dir, path, dtype=torch.float64).save(tmp_path / f"tv{i}")
        for i, path in enumerate(tuned)
    ]
    from_models = merge(recipe(family, tmp_path / "a", "ties", {"density": 0.3}), progress=False)
    from_vectors = merge(
        {**recipe(family, tmp_path / "b", "ties", {"density": 0.3}), "models": [str(path) for path in vectors]},
        progress=False,
    )
    assert (from_models / "model.safetensors").read_bytes() == (from_vectors / "model.safetensors").read_bytes()


def test_task_vector_of_another_base_is_refused(family, tmp_path):
    base_dir, tuned = family
    other = save(tiny_clip_vision(seed=42), tmp_path / "other")
    vector = TaskVector.from_models(other, save(finetune_like(tiny_clip_vision(seed=42), 1), tmp_path / "o1"))
    config = {**recipe(family, tmp_path / "out", "task_arithmetic"), "models": [str(vector.save(tmp_path / "tv"))]}
    with pytest.raises(ValueError, match="weights differ from the base this task vector was computed from"):
        merge(config, progress=False)
    assert not (tmp_path / "out").exists()
    merge({**config, "allow_other_base": True}, progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("naming", ["transformers5", "transformers4"])
def test_vision_tower_finetunes_merge_into_a_full_clip_base(tmp_path, naming):
    full = tiny_clip(seed=0)
    full_dir = save(full, tmp_path / "clip", processor=True)
    tower = tiny_clip_vision(seed=1)
    tower.load_state_dict(
        {k.removeprefix("vision_model."): v for k, v in full.state_dict().items() if k.startswith("vision_model.")}
    )
    tuned = []
    for index in range(2):
        folder = save(finetune_like(tower, seed=10 + index), tmp_path / f"ft{index}")
        if naming == "transformers4":  # the Hub fine-tunes were saved by transformers 4: vision_model.* names
            state = {f"vision_model.{k}": v.clone() for k, v in load_file(folder / "model.safetensors").items()}
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        tuned.append(folder)
    out = merge(
        {
            "base_model": str(full_dir),
            "models": [str(path) for path in tuned],
            "method": "task_arithmetic",
            "parameters": {"alpha": 0.5},
            "output_dir": str(tmp_path / "out"),
        },
        progress=False,
    )
    merged = CLIPModel.from_pretrained(out).state_dict()
    base = full.state_dict()
    tuned_states = [CLIPVisionModel.from_pretrained(path).state_dict() for path in tuned]
    for name in base:
        if name.startswith("vision_model."):
            short = name.removeprefix("vision_model.")
            # float32 checkpoints are merged in float32 (test_merge_float32 bounds the difference to float64)
            taus = [state[short] - base[name] for state in tuned_states]
            assert torch.equal(merged[name], base[name] + 0.5 * (taus[0] + taus[1])), name
        else:
            assert torch.equal(merged[name], base[name]), name
    assert CLIPVisionModel.from_pretrained(out).state_dict().keys() == tuned_states[0].keys()


def test_tied_weights_are_merged_once(tmp_path):
    base = tiny_t5(seed=0)
    base_dir = save(base, tmp_path / "base")
    tuned = [save(finetune_like(base, seed=s), tmp_path / f"ft{s}") for s in (1, 2)]
    out = merge(
        {
            "base_model": str(base_dir),
            "models": [str(p) for p in tuned],
            "method": "weight_average",
            "output_dir": str(tmp_path / "out"),
        },
        progress=False,
    )
    merged = merged_weights(out)
    states = [load_file(path / "model.safetensors") for path in tuned]
    assert set(merged) == set(states[0])
    assert torch.equal(
        merged["shared.weight"],
        ((states[0]["shared.weight"].double() + states[1]["shared.weight"].double()) / 2).float(),
    )


def test_parallel_merge_keeps_the_base_order_for_results_and_errors(family, tmp_path):
    base_dir, tuned = family
    names = list(CheckpointReader(base_dir))
    merged = merged_weights(merge(recipe(family, tmp_path / "out", max_shard_size=5000), progress=False))
    assert list(merged) == names
    # NaN in a tensor near the start and in the last one: the first in the base's order is reported, even though
    # the next tensors are merged at the same time.
    first, last = names[1], names[-1]
    bad = _broken_copy(
        tuned[1],
        tmp_path / "ft_bad",
        lambda path: _resave(
            path, lambda state: [state[name].view(-1).__setitem__(0, float("nan")) for name in (first, last)]
        ),
    )
    with pytest.raises(NonFiniteError, match=rf"^models\[1\] \({re.escape(str(bad))}\): tensor '{re.escape(first)}' "):
        merge({**recipe(family, tmp_path / "out2"), "models": [str(tuned[0]), str(bad)]}, progress=False)


# ---- bad inputs: clear errors, no output ------------------------------------------------------------------------


def _broken_copy(source, target, edit):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    edit(target / "model.safetensors")
    return target


def _resave(path, change):
    state = {name: tensor.clone() for name, tensor in load_file(path).items()}
    change(state)
    save_file(state, path, metadata={"format": "pt"})


BAD_INPUTS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-1000]), r"ft_bad/model\.safetensors: corrupt or truncated"),
    "bad_header": (
        lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"),
        r"ft_bad/model\.safetensors: corrupt or truncated",
    ),
    "missing_tensor": (
        lambda p: _resave(p, lambda s: s.pop("encoder.layers.1.mlp.fc1.weight")),
        r"models\[1\] .*has no tensor 'encoder\.layers\.1\.mlp\.fc1\.weight'",
    ),
    "shape_mismatch": (
        lambda p: _resave(p, lambda s: s.__setitem__("post_layernorm.bias", torch.zeros(5))),
        r"models\[1\] .*tensor 'post_layernorm\.bias' has shape \[5\], the base's 'post_layernorm\.bias' has \[32\]",
    ),
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUTS))
def test_bad_input_gives_clear_error_and_no_output(family, tmp_path, problem):
    edit, message = BAD_INPUTS[problem]
    base_dir, tuned = family
    broken = _broken_copy(tuned[1], tmp_path / "ft_bad", edit)
    config = recipe((base_dir, [tuned[0], broken, tuned[2]]), tmp_path / "out", "ties")
    with pytest.raises(ValueError, match=message):
        merge(config, progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_wrong_architecture_is_refused_before_reading_weights(family, tmp_path):
    t5_dir = save(tiny_t5(), tmp_path / "t5")
    (t5_dir / "model.safetensors").write_bytes(b"never read")
    base_dir, tuned = family
    with pytest.raises(ValueError, match=r"Input '.*t5' does not have the architecture of base"):
        merge(recipe((base_dir, [tuned[0], t5_dir]), tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_keeps_the_previous_output(family, tmp_path, monkeypatch):
    config = recipe(family, tmp_path / "out", "task_arithmetic", max_shard_size=3000)
    merge(config, progress=False)
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    calls = {"count": 0}
    original = ShardedSafetensorsWriter.add

    def failing(self, name, tensor):
        calls["count"] += 1
        if calls["count"] == 10:
            raise RuntimeError("interrupted")
        return original(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "add", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        merge({**config, "parameters": {"alpha": 0.9}}, progress=False)
    assert calls["count"] == 10  # shards had been flushed when it failed
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before and no_leftovers(tmp_path)


def test_existing_unrelated_folder_is_never_replaced(family, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutputError, match="was not written by saft_hf"):
        merge(recipe(family, tmp_path / "out"), progress=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "soup"}, "method: unknown merge method 'soup'"),
        ({"parameters": {"lambda": 1}}, "parameters.lambda: unknown parameter for method 'ties'"),
        ({"models": []}, "models: at least one model is required"),
        ({"tensor_parameters": [{"filter": "re:(", "parameters": {}}]}, "tensor_parameters[0].filter: invalid regex"),
        (
            {"tensor_parameters": [{"filter": "x", "parameters": {"density": 2}}]},
            "tensor_parameters[0].parameters.density: must be <= 1.0",
        ),
        ({"dtype": "float8"}, "dtype: must be one of"),
        ({"max_shard_size": "big"}, "max_shard_size: expected a size"),
        ({"colour": "blue"}, "colour: unknown field"),
        ({"models": [{"path": "x"}]}, "models[0].path: unknown field"),
        ({"push_to_hub": {"private": True}}, "push_to_hub.repo_id: required"),
    ],
)
def test_recipe_validation_names_the_field(family, tmp_path, change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MergeConfig.from_dict({**recipe(family, tmp_path / "out"), **change})


# ---- coefficient search -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("evaluate_on", ["state_dict", "folder"])
def test_search_scores_every_grid_point_and_writes_the_best(family, tmp_path, evaluate_on):
    base_dir, tuned = family
    target = load_file(tuned[0] / "model.safetensors")  # the score prefers merges close to the first fine-tune

    def evaluate(merged):
        state = merged if evaluate_on == "state_dict" else dict(CheckpointReader(merged))
        return -sum(float((state[name] - target[name]).pow(2).sum()) for name in target)

    result = search_coefficients(
        recipe(family, tmp_path / "out", "ties"), evaluate, evaluate_on=evaluate_on, progress=False
    )
    assert [(row["alpha"], row["density"]) for row in result.table] == [
        (alpha, density) for alpha in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0) for density in (0.3, 0.2, 0.1)
    ]
    best = max(result.table, key=lambda row: row["score"])
    assert result.best_parameters == {"alpha": best["alpha"], "density": best["density"]}
    reference = merge(recipe(family, tmp_path / "ref", "ties", result.best_parameters), progress=False)
    assert (result.output_dir / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert json.loads((result.output_dir / "search_table.json").read_text()) == result.table
    assert (result.output_dir / "search_table.csv").read_text().splitlines()[0] == "alpha,density,score"
    assert yaml.safe_load((result.output_dir / "merge_config.yaml").read_text())["parameters"] == result.best_parameters
    assert (
        evaluate(result.output_dir if evaluate_on == "folder" else merged_weights(result.output_dir)) == best["score"]
    )


# ---- command line and recipe script -----------------------------------------------------------------------------


def _run(*command, cwd):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two fresh interpreters importing torch and transformers
def test_console_script_and_recipe_script_merge_like_the_api(family, tmp_path):
    config_path = tmp_path / "recipe.yaml"
    config_path.write_text(yaml.safe_dump(recipe(family, tmp_path / "unused", "ties", {"density": 0.3})))
    api = merge(MergeConfig.from_yaml(config_path).replace(output_dir=str(tmp_path / "api")), progress=False)
    console_script = Path(sys.executable).with_name("saft-hf")  # installed from pyproject's [project.scripts]
    cli = _run(
        str(console_script),
        "merge",
        str(config_path),
        "--output_dir",
        str(tmp_path / "cli"),
        "--no_progress",
        cwd=tmp_path,
    )
    script = _run(
        sys.executable,
        str(REPO / "recipes" / "merge.py"),
        "--config",
        str(config_path),
        "--output_dir",
        str(tmp_path / "script"),
        cwd=tmp_path,
    )
    assert cli.returncode == 0 and script.returncode == 0, cli.stderr + script.stderr
    for folder in ("cli", "script"):
        assert (tmp_path / folder / "model.safetensors").read_bytes() == (api / "model.safetensors").read_bytes()


def test_cli_task_vector_matches_the_api(family, tmp_path):
    base_dir, tuned = family
    assert (
        cli_main(
            [
                "task-vector",
                "--base",
                str(base_dir),
                "--finetuned",
                str(tuned[0]),
                "-o",
                str(tmp_path / "tv"),
                "--task",
                "digits",
                "--sam_mode",
                "asam",
                "--sam_rho",
                "0.5",
                "--max_shard_size",
                "4KB",
            ]
        )
        == 0
    )
    loaded, expected = TaskVector.load(tmp_path / "tv"), TaskVector.from_models(base_dir, tuned[0])
    assert (tmp_path / "tv" / "task_vector.safetensors.index.json").is_file()
    assert (loaded.metadata["task"], loaded.metadata["sam_mode"], loaded.metadata["sam_rho"]) == (
        "digits",
        "asam",
        "0.5",
    )
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_push_to_hub_uploads_the_finished_folder_once(family, tmp_path, monkeypatch):
    pushed = []

    def push_folder(folder, repo_id, *, private=False, commit_message="", token=None, revision=None):
        pushed.append((repo_id, private, _folder_files(Path(folder)), token))  # what the real push uploads
        return "0" * 40

    monkeypatch.setattr("saft_hf.hub.push_folder", push_folder)
    checked = []  # the push target is checked first, with the same token (tests/test_hub.py checks the rule)
    monkeypatch.setattr(
        "saft_hf.hub.check_push_target", lambda repo_id, kind, **kw: checked.append((repo_id, kind, kw))
    )
    merge(
        recipe(family, tmp_path / "out", "ties", push_to_hub={"repo_id": "org/merged", "private": True}),
        token="hf_secret",
        progress=False,
    )
    vector = TaskVector.from_models(*family[0:1], family[1][0], task="digits")
    vector.push_to_hub("org/vector", token="hf_secret")
    (merged_push, vector_push) = pushed
    assert [(repo_id, kind, kw["token"]) for repo_id, kind, kw in checked] == [
        ("org/merged", "merge", "hf_secret"),
        ("org/merged", "merge", "hf_secret"),  # again right before writing (check_output_dir)
        ("org/vector", "task-vector", "hf_secret"),
    ]
    assert merged_push[:2] == ("org/merged", True) and merged_push[3] == "hf_secret"
    assert {"model.safetensors", "config.json", "merge_config.yaml", "README.md"} <= set(merged_push[2])
    assert vector_push[:2] == ("org/vector", False) and set(vector_push[2]) == {"task_vector.safetensors", "README.md"}
    written = "".join(path.read_text(errors="ignore") for path in (tmp_path / "out").iterdir())
    assert "hf_secret" not in written


def test_shipped_clip_ties_recipe_is_valid():
    config = MergeConfig.from_yaml(REPO / "recipes" / "configs" / "merge_clip_vit_b32_ties.yaml")
    assert (config.base_model, config.method) == ("openai/clip-vit-base-patch32", "ties")
    tasks = sorted(spec.model.removeprefix("tanganke/clip-vit-base-patch32_") for spec in config.models)
    assert tasks == ["dtd", "eurosat", "gtsrb", "mnist", "resisc45", "stanford-cars", "sun397", "svhn"]


def test_search_with_the_built_in_validation_accuracy(tmp_path):
    from saft_hf.evaluation import evaluate_model
    from saft_hf.merging import task_accuracy_evaluator
    from saft_hf.testing import save_tiny_clip

    base_dir = save_tiny_clip(tmp_path / "base", seed=0)
    base = CLIPModel.from_pretrained(base_dir)
    tuned = [save(finetune_like(base, seed=seed, scale=0.2), tmp_path / f"ft{seed}") for seed in (1, 2)]
    config = {
        "base_model": str(base_dir),
        "models": [str(path) for path in tuned],
        "method": "task_arithmetic",
        "output_dir": str(tmp_path / "out"),
    }
    options = dict(max_samples=24, batch_size=8, progress=False)
    evaluate = task_accuracy_evaluator(["digits", "digits_parity"], model=base_dir, **options)
    result = search_coefficients(config, evaluate, grid={"alpha": [0.5, 1.0]}, progress=False)
    for row in result.table:
        merged = merge(
            {**config, "parameters": {"alpha": row["alpha"]}, "output_dir": str(tmp_path / f"a{row['alpha']}")},
            progress=False,
        )
        direct = [
            evaluate_model(merged, task, "validation", **options)["accuracy"] for task in ("digits", "digits_parity")
        ]
        assert row["score"] == pytest.approx(sum(direct) / 2)
