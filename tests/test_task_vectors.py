"""TaskVector: differences, LoRA deltas vs PEFT's merge_and_unload, fingerprints, lazy safetensors round trips."""

import copy
import json
import re

import pytest
import torch
from merge_fixtures import clip_vision_family, finetune_like, save, tiny_clip, tiny_clip_vision, tiny_gpt2, tiny_t5
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from saft_hf.errors import NonFiniteError
from saft_hf.hub import push_folder
from saft_hf.task_vectors import METADATA_FIELDS, TaskVector


def weights_of(folder):
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return clip_vision_family(tmp_path_factory.mktemp("family"), count=2)


# ---- differences ------------------------------------------------------------------------------------------------


def test_vector_is_finetuned_minus_base_with_metadata(family):
    base_dir, (tuned_dir, _) = family
    vector = TaskVector.from_models(
        base_dir, tuned_dir, task="digits", finetune_mode="full", sam_mode="asam", sam_rho=0.5, sam_eta=0.01
    )
    base, tuned = weights_of(base_dir), weights_of(tuned_dir)
    assert set(vector) == set(base)
    for name in vector:
        expected = (tuned[name].double() - base[name].double()).float()
        assert torch.equal(vector[name], expected), name
    assert set(METADATA_FIELDS) <= set(vector.metadata)
    assert vector.metadata["format"] == "saft_hf.task_vector"
    assert (vector.metadata["task"], vector.metadata["sam_mode"], vector.metadata["sam_rho"]) == (
        "digits",
        "asam",
        "0.5",
    )
    assert vector.metadata["source"] == str(tuned_dir) and vector.metadata["base_model"] == str(base_dir)
    assert vector.metadata["base_fingerprint"].startswith("sha256:")


def test_apply_with_alpha_one_reproduces_the_finetune(family):
    base_dir, (tuned_dir, _) = family
    tuned = weights_of(tuned_dir)
    exact = TaskVector.from_models(base_dir, tuned_dir, dtype=torch.float64).apply_to(base_dir, alpha=1.0)
    assert all(torch.equal(exact[name], tuned[name]) for name in tuned)
    # Stored in float32 the difference is rounded once; applying it is then within one rounding of the fine-tune.
    rounded = TaskVector.from_models(base_dir, tuned_dir).apply_to(base_dir, alpha=1.0)
    for name in tuned:
        torch.testing.assert_close(rounded[name], tuned[name], rtol=2**-23, atol=1e-9)


def test_apply_scales_by_alpha(family):
    base_dir, (tuned_dir, _) = family
    base, tuned = weights_of(base_dir), weights_of(tuned_dir)
    half = TaskVector.from_models(base_dir, tuned_dir, dtype=torch.float64).apply_to(base_dir, alpha=0.5)
    for name in base:
        expected = (base[name].double() + 0.5 * (tuned[name].double() - base[name].double())).float()
        assert torch.equal(half[name], expected)


def test_arithmetic_is_elementwise_and_lazy(family):
    base_dir, (first_dir, second_dir) = family
    first, second = (
        TaskVector.from_models(base_dir, first_dir, task="a"),
        TaskVector.from_models(base_dir, second_dir, task="b"),
    )
    combos = {
        "sum": (first + second, lambda a, b: a + b),
        "difference": (first - second, lambda a, b: a - b),
        "scaled": (0.5 * first, lambda a, b: 0.5 * a),
        "negated": (-first, lambda a, b: -a),
        "divided": (second / 4, lambda a, b: b * 0.25),
    }
    for label, (vector, reference) in combos.items():
        for name in first:
            assert torch.equal(vector[name], reference(first[name], second[name])), (label, name)
    assert (first + second).task == "(a + b)" and (-first).task == "-1*a"
    assert (first + second).metadata["base_fingerprint"] == first.metadata["base_fingerprint"]


def test_negation_forgets_a_task(family):
    base_dir, (tuned_dir, _) = family
    vector = TaskVector.from_models(base_dir, tuned_dir, dtype=torch.float64)
    back = (-vector).apply_to(tuned_dir, alpha=1.0, allow_other_base=True)
    base = weights_of(base_dir)
    assert all(torch.equal(back[name], base[name]) for name in base)


# ---- saving and loading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_shard_size", "sharded"), [("2GB", False), (3000, True)])
def test_save_load_round_trip_is_identical(family, tmp_path, max_shard_size, sharded):
    base_dir, (tuned_dir, _) = family
    vector = TaskVector.from_models(base_dir, tuned_dir, task="digits", sam_mode="sam", sam_rho=0.05)
    folder = vector.save(tmp_path / "tv", max_shard_size=max_shard_size)
    index = folder / "task_vector.safetensors.index.json"
    assert index.is_file() == sharded
    if sharded:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(vector) and len(set(weight_map.values())) > 1
        assert all(re.fullmatch(r"task_vector-\d{5}-of-\d{5}\.safetensors", f) for f in weight_map.values())
    loaded = TaskVector.load(folder)
    assert loaded.metadata == vector.metadata
    assert list(loaded) == list(vector)
    assert all(torch.equal(loaded[name], vector[name]) for name in vector)
    assert loaded.apply_to(base_dir)["post_layernorm.weight"].equal(vector.apply_to(base_dir)["post_layernorm.weight"])


def test_load_refuses_a_model_folder(family):
    with pytest.raises(ValueError, match="not a saft_hf task vector"):
        TaskVector.load(family[0])


def test_from_models_refuses_a_task_vector_as_either_model(family, tmp_path):
    """A task vector has the model's tensor names and shapes, so it used to pass for a fine-tune (or a base) and
    give a meaningless `tv - base`."""
    base_dir, (tuned_dir, _) = family
    vector_dir = TaskVector.from_models(base_dir, tuned_dir).save_pretrained(tmp_path / "tv")
    message = f"{vector_dir} holds a saft_hf task vector, not a model: load it with TaskVector.from_pretrained"
    for base, finetuned in [(base_dir, vector_dir), (vector_dir, tuned_dir)]:
        with pytest.raises(ValueError, match=re.escape(message)):
            TaskVector.from_models(base, finetuned)


def test_save_pretrained_and_from_pretrained_are_save_and_load():
    assert TaskVector.save is TaskVector.save_pretrained
    assert TaskVector.load.__func__ is TaskVector.from_pretrained.__func__


def test_from_pretrained_refuses_a_revision_for_a_local_folder(family, tmp_path):
    base_dir, (tuned_dir, _) = family
    folder = TaskVector.from_models(base_dir, tuned_dir).save_pretrained(tmp_path / "tv")
    with pytest.raises(ValueError, match=r"revision='main' is for Hub repos, and this is a local folder"):
        TaskVector.from_pretrained(folder, revision="main")


@pytest.mark.parametrize("max_shard_size", ["2GB", 3000])
def test_push_to_hub_round_trip_by_id_and_commit(hub_server, family, max_shard_size):
    base_dir, (tuned_dir, _) = family
    vector = TaskVector.from_models(base_dir, tuned_dir, task="digits", sam_mode="asam", sam_rho=0.5)
    sha = vector.push_to_hub("org/tv-digits", max_shard_size=max_shard_size)
    second = (vector * 0.5).push_to_hub("org/tv-digits", max_shard_size=max_shard_size)  # main moves on
    pushes = hub_server.state.file_requests("org/tv-digits")
    assert ("GET", "README.md") in pushes  # the second push checked that saft_hf pushed a task vector there
    for ref, revision, scale in [
        ("org/tv-digits", None, 0.5),
        (f"org/tv-digits@{sha}", None, 1.0),
        ("org/tv-digits", sha, 1.0),
        ("org/tv-digits", second, 0.5),
    ]:
        loaded = TaskVector.from_pretrained(ref, revision=revision)
        assert list(loaded) == list(vector)
        assert all(torch.equal(loaded[name], vector[name] * scale) for name in vector), (ref, revision)
        assert loaded.metadata["base_fingerprint"] == vector.metadata["base_fingerprint"]
        assert loaded.metadata["base_model"] == f"{base_dir.name} (local folder)"  # never the absolute path
        assert loaded.metadata["sam_rho"] == "0.5"
    card = hub_server.state.repos["org/tv-digits"].resolve(sha).files["README.md"].content.decode()
    assert 'TaskVector.from_pretrained("org/tv-digits")' in card and "- model: org/tv-digits" in card
    loads = {name for _, name in hub_server.state.file_requests("org/tv-digits")[len(pushes) :]}
    assert loads and all(name.startswith("task_vector") for name in loads)  # loading reads no card
    # The pushed copy applies to the base it was computed from, like the local one.
    assert (
        TaskVector.load(f"org/tv-digits@{sha}")
        .apply_to(base_dir)["post_layernorm.weight"]
        .equal(vector.apply_to(base_dir)["post_layernorm.weight"])
    )


def test_from_pretrained_checks_the_listing_before_downloading(hub_server, family):
    push_folder(family[0], "org/model")
    with pytest.raises(
        FileNotFoundError,
        match=r"Hub repo 'org/model@[0-9a-f]{40}' holds no saft_hf task vector .*"
        r"files: \[.*'config.json', 'model.safetensors'",
    ):
        TaskVector.from_pretrained("org/model")
    assert hub_server.state.served_files("org/model") == set()
    with pytest.raises(FileNotFoundError, match="Revision 'v9' does not exist in Hub repo 'org/model'"):
        TaskVector.from_pretrained("org/model@v9")


# ---- base fingerprint and mismatches ----------------------------------------------------------------------------


def test_other_base_is_refused_unless_allowed(family, tmp_path):
    base_dir, (tuned_dir, _) = family
    other_dir = save(tiny_clip_vision(seed=99), tmp_path / "other")
    vector = TaskVector.from_models(base_dir, tuned_dir)
    with pytest.raises(ValueError, match=r"weights differ from the base .*allow_other_base=True"):
        vector.apply_to(other_dir)
    other = weights_of(other_dir)
    applied = vector.apply_to(other_dir, allow_other_base=True)
    assert torch.equal(
        applied["post_layernorm.weight"], other["post_layernorm.weight"] + vector["post_layernorm.weight"]
    )


def _write_variant(source, target, edit):
    """A copy of the model folder at ``source`` whose weights went through ``edit(state)``."""
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    state = {name: tensor.clone() for name, tensor in weights_of(source).items()}
    edit(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.__setitem__("post_layernorm.weight", torch.zeros(7)),
            "tensor 'post_layernorm.weight' has shape [7], the base's 'post_layernorm.weight' has [32]",
        ),
        (lambda s: s.pop("encoder.layers.1.mlp.fc2.bias"), "has no tensor 'encoder.layers.1.mlp.fc2.bias'"),
        (
            lambda s: s.__setitem__("extra_head.weight", torch.zeros(2)),
            "has tensor 'extra_head.weight', which matches no",
        ),
    ],
)
def test_mismatches_name_the_tensor(family, tmp_path, edit, message):
    base_dir, (tuned_dir, _) = family
    broken = _write_variant(tuned_dir, tmp_path / "broken", edit)
    with pytest.raises(ValueError, match=re.escape(message)):
        TaskVector.from_models(base_dir, broken)


# ---- tied weights and sub-models --------------------------------------------------------------------------------


def test_tied_tensors_are_handled_once_in_memory():
    base = tiny_t5(seed=0)
    tuned = finetune_like(base, seed=3)
    vector = TaskVector.from_models(base, tuned, dtype=torch.float64)
    tied = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    assert "shared.weight" in vector and not any(name in vector for name in tied)
    assert set(vector.tied_weights) >= set(tied)
    applied = vector.apply_to(base)
    expected = tuned.state_dict()
    assert all(torch.equal(applied[name].float(), expected[name]) for name in expected)
    assert applied["encoder.embed_tokens.weight"] is applied["shared.weight"]


def test_tied_names_stored_twice_in_a_checkpoint_are_one_tensor(tmp_path):
    base_dir = save(tiny_t5(seed=0), tmp_path / "base")
    tuned = finetune_like(tiny_t5(seed=0), seed=4)
    # A checkpoint written without de-duplication: every tied name holds its own copy.
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    (tuned_dir / "config.json").write_text((base_dir / "config.json").read_text())
    save_file({name: tensor.clone() for name, tensor in tuned.state_dict().items()}, tuned_dir / "model.safetensors")
    vector = TaskVector.from_models(base_dir, tuned_dir)
    assert set(vector) == set(weights_of(base_dir))
    expected = tuned.state_dict()["shared.weight"] - weights_of(base_dir)["shared.weight"]
    torch.testing.assert_close(vector["shared.weight"], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("naming", ["transformers5", "transformers4"])
def test_vision_tower_finetune_of_a_full_clip_base(tmp_path, naming):
    """`CLIPVisionModel` fine-tunes (named `embeddings.*` by transformers 5, `vision_model.embeddings.*` by 4 as on
    the Hub) against a `CLIPModel` base: the vector covers the vision tower under the base's names."""
    full = tiny_clip(seed=0)
    full_dir = save(full, tmp_path / "clip")
    tower = tiny_clip_vision(seed=1)
    tower.load_state_dict(
        {k.removeprefix("vision_model."): v for k, v in full.state_dict().items() if k.startswith("vision_model.")}
    )
    tuned = finetune_like(tower, seed=5)
    tuned_dir = save(tuned, tmp_path / "tower")
    if naming == "transformers4":
        state = {f"vision_model.{name}": tensor.clone() for name, tensor in weights_of(tuned_dir).items()}
        save_file(state, tuned_dir / "model.safetensors", metadata={"format": "pt"})
    vector = TaskVector.from_models(full_dir, tuned_dir, dtype=torch.float64)
    assert set(vector) == {name for name in weights_of(full_dir) if name.startswith("vision_model.")}
    applied = vector.apply_to(full_dir)
    reference = full.state_dict()
    for name, tensor in tuned.state_dict().items():
        assert torch.equal(applied[f"vision_model.{name}"], tensor)
    assert torch.equal(applied["text_projection.weight"], reference["text_projection.weight"])
    # Applied to the tower saved on its own, the vector finds its tensors under the shorter names.
    tower_dir = save(tower, tmp_path / "tower_base")
    assert torch.equal(vector.apply_to(tower_dir)["post_layernorm.weight"], tuned.state_dict()["post_layernorm.weight"])


# ---- LoRA -------------------------------------------------------------------------------------------------------

LORA_CASES = {
    "lora": (tiny_clip_vision, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora": (tiny_clip_vision, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], use_rslora=True)),
    "rank_alpha_pattern": (
        tiny_clip_vision,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 2},
            alpha_pattern={"v_proj": 16},
        ),
    ),
    # GPT-2 Conv1D weights are (in, out): fan_in_fan_out; attn c_proj is square, so only the module type tells.
    "fan_in_fan_out": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "embedding_and_biases": (
        tiny_gpt2,
        dict(r=2, lora_alpha=4, target_modules=["wte", "c_fc"], bias="all", fan_in_fan_out=True),
    ),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_vector_equals_merge_and_unload_minus_base(tmp_path, case):
    build, options = LORA_CASES[case]
    base = build(seed=0)
    base_dir = save(base, tmp_path / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **options))
    with torch.no_grad():  # trained biases: give them a visible update
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad and name.endswith("bias"):
                parameter.add_(0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    if case == "rank_alpha_pattern":
        adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        assert adapter["base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2
        assert adapter["base_model.model.encoder.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 4
    merged = peft_model.merge_and_unload().state_dict()
    original = base.state_dict()

    vector = TaskVector.from_lora(base_dir, tmp_path / "adapter", task=case)
    assert vector.metadata["finetune_mode"] == "lora" and vector.metadata["source"] == str(tmp_path / "adapter")
    changed = {name for name in merged if not torch.equal(merged[name], original[name])}
    assert changed and changed - set(base.all_tied_weights_keys) <= set(vector)  # GPT-2's lm_head is wte
    for name in vector:
        assert torch.equal(original[name] + vector[name], merged[name]), name
        torch.testing.assert_close(vector[name], merged[name] - original[name], rtol=0, atol=1e-6)
    applied = vector.apply_to(base)  # in memory: tied names share storage and follow their source
    assert all(torch.equal(applied[name], merged[name]) for name in merged)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "use_dora=True is not supported"),
        (IA3Config(target_modules=["q_proj", "fc1"], feedforward_modules=["fc1"]), "peft_type 'IA3'"),
    ],
)
def test_variants_a_weight_delta_cannot_express_are_refused(tmp_path, config, message):
    base = tiny_clip_vision()
    base_dir = save(base, tmp_path / "base")
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=re.escape(message)):
        TaskVector.from_lora(base_dir, tmp_path / "adapter")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text[:-2], "adapter_config.json: not valid JSON ("),
        (lambda text: "[1]", "adapter_config.json: expected a JSON object (PEFT's adapter config), got list"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "r"}), "r must be a positive"),
        (lambda text: json.dumps({**json.loads(text), "lora_alpha": "8"}), "lora_alpha must be a positive number, got"),
    ],
    ids=["truncated", "not-an-object", "no-rank", "alpha-string"],
)
def test_malformed_adapter_config_is_one_line_naming_the_file(tmp_path, edit, message):
    base = tiny_clip_vision()
    base_dir = save(base, tmp_path / "base")
    get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "ad")
    config_path = tmp_path / "ad" / "adapter_config.json"
    config_path.write_text(edit(config_path.read_text()))
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        TaskVector.from_lora(base_dir, tmp_path / "ad")
    assert str(refused.value).startswith(str(config_path)) and "\n" not in str(refused.value)


def test_scaling_that_overflows_the_dtype_is_refused_naming_the_tensor(family, tmp_path):
    base_dir, (tuned_dir, _) = family
    vector = TaskVector.from_models(base_dir, tuned_dir, dtype=torch.float16)
    name = next(name for name in vector if bool((vector[name].abs() > 1e-2).any()))
    with pytest.raises(NonFiniteError, match=re.escape(f"tensor {name!r}: 1e+07 times the task vector overflows")):
        (vector * 1e7)[name]  # it used to hold inf, and save_pretrained wrote it
    with pytest.raises(NonFiniteError):
        (vector * 1e7).save_pretrained(tmp_path / "scaled")
    assert not (tmp_path / "scaled").exists()
    assert torch.equal((vector * 2.0)[name], vector[name] * 2.0)


def test_relative_local_inputs_are_recorded_absolute_and_pushed_as_local_folders(hub_server, family, monkeypatch):
    """A vector built from `m/base` and `m/ft` and pushed from another working directory published them as if they
    were the Hub ids `m/base` and `m/ft`."""
    base_dir, (tuned_dir, _) = family
    monkeypatch.chdir(base_dir.parent)
    vector = TaskVector.from_models(base_dir.name, tuned_dir.name)
    assert (vector.metadata["base_model"], vector.metadata["source"]) == (str(base_dir), str(tuned_dir))
    monkeypatch.chdir(base_dir.parent.parent)
    sha = vector.push_to_hub("org/tv-relative")
    pushed = TaskVector.from_pretrained(f"org/tv-relative@{sha}").metadata
    assert (pushed["base_model"], pushed["source"]) == (
        f"{base_dir.name} (local folder)",
        f"{tuned_dir.name} (local folder)",
    )
