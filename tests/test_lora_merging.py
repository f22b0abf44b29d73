"""LoRA adapters as merge inputs: merged as their dense deltas B @ A * scaling into a plain model of the base's
architecture (the shared zero-shot head copied), scored with the plain forward; and the base an input records (an
adapter's `base_model_name_or_path`, an FTTS fine-tune's `saft_base_model`) checked against the recipe's."""

import copy
import json
import re
import shutil

import pytest
import torch
from digits_clip import accuracy_of, digits_trained_clip, planted_labels
from safetensors.torch import load_file, save_file

from saft_hf.cli import main as cli_main
from saft_hf.data import get_task, load_digits_splits
from saft_hf.evaluation import evaluate_model
from saft_hf.hub import names_another_model, push_folder
from saft_hf.merging import merge
from saft_hf.models import HEAD_FILE
from saft_hf.modes import apply_finetune_mode
from saft_hf.task_vectors import TaskVector

DIGITS = get_task("digits")
NUM_ROWS = 24
RANK, LORA_ALPHA = 4, 8
QUERY = "vision_model.encoder.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A full tiny CLIP (the base) and two LoRA adapters of its digits classifier, with random B (PEFT starts B at
    zero) so each has an effect; saved as the fine-tuning recipe saves them (adapter + head + processor)."""
    root = tmp_path_factory.mktemp("lora_family")
    base, classifier, processor = digits_trained_clip(root, train_rows=256, steps=40)
    classifier.eval()
    classifier.name_or_path = str(base)  # what the adapter records as its base, as recipes/finetune.py sets it
    folders = []
    for index in range(2):
        lora = apply_finetune_mode(copy.deepcopy(classifier), "lora", r=RANK, lora_alpha=LORA_ALPHA)
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        folder = root / f"adapter{index}"
        lora.save_pretrained(folder)
        classifier.head.save(folder / HEAD_FILE)
        processor.save_pretrained(folder)
        folders.append(folder)
    rows = load_digits_splits()["test"].select(range(NUM_ROWS))
    return base, classifier, processor, folders, rows


def _recipe(base, models, output_dir, **fields):
    return {
        "base_model": str(base),
        "models": [str(m) for m in models],
        "method": "task_arithmetic",
        "parameters": {"alpha": 0.5},
        "output_dir": str(output_dir),
        **fields,
    }


def lora_deltas(folder, scaling=LORA_ALPHA / RANK):
    """``{base tensor name: B @ A * scaling}`` by hand from an adapter's file (float64)."""
    tensors = load_file(folder / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            deltas[name] = b.double() @ a.double() * scaling
    return deltas


def hand_merge(base_state, folders, alpha):
    """base + alpha * sum of the adapters' deltas, in float64, cast to the base's dtype."""
    merged = dict(base_state)
    for folder in folders:
        for name, delta in lora_deltas(folder).items():
            merged[name] = merged[name].double() + alpha * delta
    return {name: tensor.to(base_state[name].dtype) for name, tensor in merged.items()}


def test_adapters_merge_as_dense_deltas_into_a_plain_model_scored_plainly(tmp_path, adapters):
    base, classifier, processor, folders, rows = adapters
    merged = merge(_recipe(base, folders, tmp_path / "merged"), progress=False)

    base_state = load_file(base / "model.safetensors")
    expected = hand_merge(base_state, folders, alpha=0.5)
    actual = load_file(merged / "model.safetensors")
    assert actual.keys() == base_state.keys()
    adapted = set(lora_deltas(folders[0]))
    assert len(adapted) == 4  # q_proj and v_proj of both layers
    for name in base_state:
        if name in adapted:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6)
            assert (actual[name] - base_state[name]).abs().max() > 1e-2  # the adapters moved it
        else:
            assert torch.equal(actual[name], base_state[name]), name
    config = json.loads((merged / "config.json").read_text())
    assert (config["model_type"], config["saft_finetune_mode"]) == ("clip", "lora")
    assert "saft_base_model" not in config
    assert (merged / HEAD_FILE).read_bytes() == (folders[0] / HEAD_FILE).read_bytes()

    # Scored as the plain model it is: the hand-built classifier's forward at the merged weights.
    hand = copy.deepcopy(classifier)
    vision = {
        name.removeprefix("vision_model."): tensor
        for name, tensor in expected.items()
        if name.startswith("vision_model.")
    }
    hand.vision_model.load_state_dict(vision)
    pixel_values = processor(images=[image.convert("RGB") for image in rows["image"]], return_tensors="pt")
    with torch.no_grad():
        predictions = hand(pixel_values=pixel_values["pixel_values"]).logits.argmax(-1).tolist()
        before = classifier(pixel_values=pixel_values["pixel_values"]).logits.argmax(-1).tolist()
    data = planted_labels(rows, predictions)
    result = evaluate_model(merged, DIGITS, data=data, batch_size=8, device="cpu", progress=False)
    assert result == {"accuracy": accuracy_of(predictions, data), "num_samples": NUM_ROWS}
    assert accuracy_of(before, data) != result["accuracy"]  # the base's own answers differ: the check has teeth


def test_an_adapter_and_a_full_finetune_are_different_modes(tmp_path, adapters):
    base, classifier, _, folders, _ = adapters
    apply_finetune_mode(copy.deepcopy(classifier), "full").save_pretrained(tmp_path / "full")
    message = (
        f"models: inputs of different fine-tuning modes score with different forwards and cannot be merged "
        f"into one model (models[0] ({folders[0]}): lora; models[1] ({tmp_path / 'full'}): full); set "
        "allow_mixed_finetune_modes: true"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        merge(_recipe(base, [folders[0], tmp_path / "full"], tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def _retarget(folder, target, field, file, recorded):
    """A copy of ``folder`` at ``target`` whose ``file`` records ``recorded`` as its base in ``field``."""
    shutil.copytree(folder, target)
    config = json.loads((target / file).read_text())
    config[field] = str(recorded)
    (target / file).write_text(json.dumps(config))
    return target


def test_an_adapter_of_another_base_is_refused_before_anything_is_written(tmp_path, adapters, capsys):
    base, _, _, folders, _ = adapters
    other_base = shutil.copytree(base, tmp_path / "other_base")  # same weights, another folder
    adapter = _retarget(folders[0], tmp_path / "other", "base_model_name_or_path", "adapter_config.json", other_base)
    message = (
        f"models[1] ({adapter}): records base model '{other_base}' (adapter_config.json "
        f"base_model_name_or_path), not the base_model '{base}'; use the base it was fine-tuned from, or pass "
        "allow_other_base=True (recipe: allow_other_base: true; saft-hf: --allow_other_base) to use it anyway"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        merge(_recipe(base, [folders[0], adapter], tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=re.escape(f"adapter {adapter}: records base model '{other_base}'")):
        TaskVector.from_lora(base, adapter)
    assert cli_main(["task-vector", "--base", str(base), "--lora", str(adapter), "-o", str(tmp_path / "tv")]) == 1
    assert f"records base model '{other_base}'" in capsys.readouterr().err and not (tmp_path / "tv").exists()
    # Opted out, it is used (here on the same weights).
    assert (
        cli_main(
            [
                "task-vector",
                "--base",
                str(base),
                "--lora",
                str(adapter),
                "-o",
                str(tmp_path / "tv"),
                "--allow_other_base",
            ]
        )
        == 0
    )
    assert sorted(TaskVector.load(tmp_path / "tv")) == sorted(lora_deltas(adapter))
    merged = merge(_recipe(base, [folders[0], adapter], tmp_path / "out", allow_other_base=True), progress=False)
    twice = hand_merge(load_file(base / "model.safetensors"), [folders[0], folders[0]], alpha=0.5)
    torch.testing.assert_close(load_file(merged / "model.safetensors")[QUERY], twice[QUERY], rtol=0, atol=1e-6)


def test_a_recorded_base_that_no_longer_exists_is_no_mismatch(tmp_path, adapters):
    base, _, _, folders, _ = adapters
    moved = _retarget(
        folders[0], tmp_path / "moved", "base_model_name_or_path", "adapter_config.json", tmp_path / "gone" / "base"
    )
    merged = merge(_recipe(base, [moved, folders[1]], tmp_path / "out"), progress=False)
    assert json.loads((merged / "config.json").read_text())["saft_finetune_mode"] == "lora"


def test_an_ftts_finetune_of_another_base_is_refused(tmp_path, adapters):
    base, classifier, _, _, _ = adapters
    other_base = shutil.copytree(base, tmp_path / "other_base")
    ftts = apply_finetune_mode(copy.deepcopy(classifier), "ftts", base_model_name_or_path=str(other_base))
    ftts.save_pretrained(tmp_path / "ftts")
    message = (
        f"models[0] ({tmp_path / 'ftts'}): records base model '{other_base}' (config.json saft_base_model), "
        f"not the base_model '{base}'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        merge(_recipe(base, [tmp_path / "ftts"], tmp_path / "out"), progress=False)
    merged = merge(_recipe(base, [tmp_path / "ftts"], tmp_path / "out", allow_other_base=True), progress=False)
    # The merge is linearised around the recipe's base, which it records.
    assert json.loads((merged / "config.json").read_text())["saft_base_model"] == str(base.resolve())


@pytest.mark.parametrize(
    "recorded, wanted, differs",
    [
        ("org/a", "org/b", True),  # two Hub ids
        ("org/a@v1", "ORG/A", False),  # revisions and letter case aside
        ("gpt2", "org/gpt2", True),
        ("{a}", "{b}", True),  # two existing folders
        ("{a}", "{a}/../a", False),  # the same folder
        ("{gone}", "{b}", False),  # moved away: cannot tell
        ("{gone}", "org/b", False),
        ("org/a", "{b}", False),  # a Hub id against a folder (its download?)
        ("{b}", "org/a", False),
    ],
)
def test_names_another_model_only_on_an_established_mismatch(tmp_path, recorded, wanted, differs):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = {"a": tmp_path / "a", "b": tmp_path / "b", "gone": tmp_path / "gone"}
    assert names_another_model(recorded.format(**paths), wanted.format(**paths)) is differs


def test_hub_adapters_are_checked_from_their_config_before_any_weight_download(hub_server, tmp_path, adapters):
    base, _, _, folders, _ = adapters
    push_folder(base, "org/base")
    for name, recorded in (("other", "org/other-base"), ("own", "org/base")):
        retargeted = _retarget(folders[0], tmp_path / name, "base_model_name_or_path", "adapter_config.json", recorded)
        (retargeted / "README.md").unlink()  # PEFT's card has a base_model entry the Hub refuses
        push_folder(retargeted, f"org/adapter-{name}")
    message = (
        "models[0] (org/adapter-other): records base model 'org/other-base' (adapter_config.json "
        "base_model_name_or_path), not the base_model 'org/base'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        merge(_recipe("org/base", ["org/adapter-other"], tmp_path / "out"), progress=False)
    assert hub_server.state.served_files("org/adapter-other") == {"adapter_config.json"}
    assert "model.safetensors" not in hub_server.state.served_files("org/base")
    # An adapter recording the recipe's Hub base merges as the same adapter read locally does.
    from_hub = merge(_recipe("org/base", ["org/adapter-own"], tmp_path / "hub"), progress=False)
    local = merge(_recipe(base, [folders[0]], tmp_path / "local"), progress=False)
    assert (from_hub / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    assert (from_hub / HEAD_FILE).read_bytes() == (folders[0] / HEAD_FILE).read_bytes()


def test_hub_adapter_source_records_the_repo_at_its_commit_once(hub_server, tmp_path, adapters):
    base, _, _, folders, _ = adapters
    adapter = shutil.copytree(folders[0], tmp_path / "adapter")
    (adapter / "README.md").unlink()  # PEFT's card has a base_model entry the Hub refuses
    sha = push_folder(adapter, "org/adapter")
    for ref in ("org/adapter", "org/adapter@main", f"org/adapter@{sha[:10]}"):
        vector = TaskVector.from_lora(base, ref, allow_other_base=True)
        assert vector.metadata["source"] == f"org/adapter@{sha}", ref  # was `org/adapter@main@<sha>`


def test_task_vector_command_refuses_dtype_with_lora(tmp_path, adapters, capsys):
    base, _, _, folders, _ = adapters
    command = ["task-vector", "--base", str(base), "--lora", str(folders[0]), "-o", str(tmp_path / "tv")]
    assert cli_main([*command, "--dtype", "float64"]) == 1  # it used to be ignored silently
    assert capsys.readouterr().err == "saft-hf: error: --dtype: not supported with --lora; leave it out\n"
    assert not (tmp_path / "tv").exists()


def test_nonfinite_adapter_delta_is_refused_unless_allowed(tmp_path, adapters, capsys):
    base, _, _, folders, _ = adapters
    adapter = shutil.copytree(folders[0], tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    a_key = next(key for key in tensors if key.endswith("lora_A.weight"))
    tensors[a_key][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    command = ["task-vector", "--base", str(base), "--lora", str(adapter), "-o", str(tmp_path / "tv")]

    assert cli_main(command) == 1  # it used to save a vector holding NaN
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith(f"saft-hf: error: adapter {adapter}: tensor ") and " NaN " in error
    assert not (tmp_path / "tv").exists()
    assert cli_main([*command, "--allow_nonfinite"]) == 0
    saved = load_file(tmp_path / "tv" / "task_vector.safetensors")
    assert sum(int(tensor.isnan().sum()) for tensor in saved.values()) > 0  # kept as asked
