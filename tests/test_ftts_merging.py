"""Merges of FTTS fine-tunes keep their mode and head, and are scored with the linearised forward around the merge's
base, f(w0) + J(w0) (w - w0), checked against a hand Jacobian-vector product; inputs of different modes are refused
unless the recipe allows them, and then merge into a plain model."""

import copy
import json

import pytest
import torch
from digits_clip import accuracy_of, digits_trained_clip, planted_labels
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from saft_hf.data import get_task, load_digits_splits
from saft_hf.evaluation import evaluate_model
from saft_hf.merging import MergeConfig, merge, search_coefficients, task_accuracy_evaluator
from saft_hf.models import HEAD_FILE, CLIPVisionClassifier
from saft_hf.modes import apply_finetune_mode

DIGITS = get_task("digits")
NUM_ROWS = 24
ALPHAS = (0.5, 1.0)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A full tiny CLIP (the merge's base) and two FTTS fine-tunes of its digits classifier, saved as folders."""
    root = tmp_path_factory.mktemp("ftts_family")
    base, classifier, processor = digits_trained_clip(root, train_rows=256, steps=40)
    classifier.eval()
    folders = []
    for index in range(2):
        linearized = apply_finetune_mode(copy.deepcopy(classifier), "ftts", base_model_name_or_path=str(base))
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for param in linearized.model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        linearized.save_pretrained(root / f"ft{index}")
        processor.save_pretrained(root / f"ft{index}")
        folders.append(root / f"ft{index}")
    rows = load_digits_splits()["test"].select(range(NUM_ROWS))
    pixel_values = processor(images=[image.convert("RGB") for image in rows["image"]], return_tensors="pt")
    return base, classifier, folders, rows, pixel_values["pixel_values"]


def _recipe(base, models, output_dir, alpha=0.5):
    return {
        "base_model": str(base),
        "models": [str(m) for m in models],
        "method": "task_arithmetic",
        "parameters": {"alpha": alpha},
        "output_dir": str(output_dir),
    }


def _hand_predictions(classifier, folders, pixel_values, alpha):
    """Argmax of the linearised logits at w = w0 + alpha * sum of the fine-tunes' deltas, by reverse-mode autograd
    in float64, and of the plain logits f(w); with the smallest gap between the two best linearised logits."""
    model = copy.deepcopy(classifier).double().eval()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    tuned = [CLIPVisionClassifier.from_pretrained(folder).double().state_dict() for folder in folders]
    delta = {name: alpha * sum(state[name] - base[name] for state in tuned) for name in base}
    inputs = pixel_values.double()

    def logits(*weights):
        return functional_call(model, dict(zip(base, weights)), args=(inputs,)).logits

    with sdpa_kernel(SDPBackend.MATH):
        value, tangent = torch.autograd.functional.jvp(logits, tuple(base.values()), tuple(delta.values()))
        plain = logits(*(base[name] + delta[name] for name in base)).detach()
    top2 = (value + tangent).topk(2).values
    return (value + tangent).argmax(-1).tolist(), plain.argmax(-1).tolist(), (top2[:, 0] - top2[:, 1]).min()


def test_pushed_ftts_merge_of_a_local_base_records_no_local_path(hub_server, tmp_path, family):
    base, _, folders, _, _ = family
    merged = merge({**_recipe(base, folders, tmp_path / "merged"), "push_to_hub": "org/ftts-merge"}, progress=False)

    remote = hub_server.state.repos["org/ftts-merge"].resolve("main").files
    config = json.loads(remote["config.json"].content)
    # The mode is kept; the base is not named (its absolute path would leave the machine): score with base=.
    assert config["saft_finetune_mode"] == "ftts" and "saft_base_model" not in config
    assert remote["config.json"].content == (merged / "config.json").read_bytes()
    texts = [file.content.decode(errors="ignore") for file in remote.values() if not file.is_lfs]
    assert not any(str(tmp_path.parent) in text for text in texts)


def test_merged_ftts_folder_records_the_mode_keeps_the_head_and_scores_linearised(tmp_path, family):
    base, classifier, folders, rows, pixel_values = family
    merged = merge(_recipe(base, folders, tmp_path / "merged"), progress=False)

    config = json.loads((merged / "config.json").read_text())
    assert (config["saft_finetune_mode"], config["saft_base_model"]) == ("ftts", str(base.resolve()))
    assert config["model_type"] == "clip"  # still the base's config otherwise
    assert (merged / HEAD_FILE).read_bytes() == (folders[0] / HEAD_FILE).read_bytes()

    linearized, plain, gap = _hand_predictions(classifier, folders, pixel_values, alpha=0.5)
    assert gap > 1e-3 and len(set(linearized)) > 1
    data = planted_labels(rows, linearized)
    result = evaluate_model(merged, DIGITS, data=data, batch_size=8, device="cpu", progress=False)
    assert result == {"accuracy": accuracy_of(linearized, data), "num_samples": NUM_ROWS}
    # The plain forward at the merged weights answers otherwise: the comparison has teeth.
    assert accuracy_of(plain, data) != result["accuracy"]


@pytest.mark.parametrize("evaluate_on", ["state_dict", "folder"])
def test_a_search_over_ftts_inputs_scores_every_point_linearised(tmp_path, family, evaluate_on):
    base, classifier, folders, rows, pixel_values = family
    hand = {alpha: _hand_predictions(classifier, folders, pixel_values, alpha) for alpha in ALPHAS}
    assert all(gap > 1e-3 for _, _, gap in hand.values())
    data = planted_labels(rows, hand[ALPHAS[0]][0])
    if evaluate_on == "state_dict":
        # The base folder as the model, as the search's docstring suggests: the merged weights carry their mode.
        evaluate_fn = task_accuracy_evaluator(
            ["digits"], model=base, split="test", data=data, batch_size=8, device="cpu", progress=False
        )
    else:

        def evaluate_fn(folder):
            return evaluate_model(folder, DIGITS, data=data, batch_size=8, progress=False)["accuracy"]

    result = search_coefficients(
        _recipe(base, folders, tmp_path / "best"),
        evaluate_fn,
        {"alpha": list(ALPHAS)},
        evaluate_on=evaluate_on,
        write_best=False,
        progress=False,
    )
    assert result.table == [{"alpha": alpha, "score": accuracy_of(hand[alpha][0], data)} for alpha in ALPHAS]
    assert [accuracy_of(hand[alpha][1], data) for alpha in ALPHAS] != [row["score"] for row in result.table]


def test_inputs_of_different_modes_are_refused(tmp_path, family):
    base, classifier, folders, _, _ = family
    full = apply_finetune_mode(copy.deepcopy(classifier), "full")
    full.save_pretrained(tmp_path / "full")
    with pytest.raises(
        ValueError,
        match=r"different fine-tuning modes.*models\[0\] \(.*ft0\): ftts; "
        r"models\[1\] \(.*full\): full\); set allow_mixed_finetune_modes: true in the recipe",
    ):
        merge(_recipe(base, [folders[0], tmp_path / "full"], tmp_path / "mixed"), progress=False)
    # A fine-tune that records no mode (a public one) may be anything: FTTS merges refuse it too.
    classifier.vision_model.save_pretrained(tmp_path / "unmarked")
    with pytest.raises(ValueError, match=r"\(.*unmarked\): none recorded"):
        merge(_recipe(base, [folders[0], tmp_path / "unmarked"], tmp_path / "mixed"), progress=False)
    assert not (tmp_path / "mixed").exists()
    # ... while a plain-forward merge takes it, and records the one mode recorded.
    with pytest.warns(UserWarning, match=r"no input's zero_shot_head.safetensors: only models\[0\] \(.*full\) of"):
        merged = merge(_recipe(base, [tmp_path / "full", tmp_path / "unmarked"], tmp_path / "plain"), progress=False)
    config = json.loads((merged / "config.json").read_text())
    assert config["saft_finetune_mode"] == "full" and "saft_base_model" not in config


def test_inputs_with_different_heads_merge_without_one(tmp_path, family):
    base, _, folders, _, _ = family
    parity = get_task("digits_parity")
    other = CLIPVisionClassifier.from_clip(base, parity.class_names, parity.templates)
    apply_finetune_mode(other, "ftts", base_model_name_or_path=str(base)).save_pretrained(tmp_path / "parity")
    with pytest.warns(UserWarning, match=r"no input's zero_shot_head.safetensors: .*ft0.*parity\) hold different"):
        merged = merge(_recipe(base, [folders[0], tmp_path / "parity"], tmp_path / "merged"), progress=False)
    assert not (merged / HEAD_FILE).exists()
    assert json.loads((merged / "config.json").read_text())["saft_finetune_mode"] == "ftts"


def test_mixed_modes_merge_when_the_recipe_allows_it_into_a_plain_model(tmp_path, family):
    """`allow_mixed_finetune_modes: true`: an FTTS and a full fine-tune merge into a folder that records no mode,
    scored with the plain forward f(w) at w = w0 + alpha * (the FTTS delta + the full fine-tune's zero delta)."""
    base, classifier, folders, rows, pixel_values = family
    full = apply_finetune_mode(copy.deepcopy(classifier), "full")
    full.save_pretrained(tmp_path / "full")
    recipe = _recipe(base, [folders[0], tmp_path / "full"], tmp_path / "mixed") | {"allow_mixed_finetune_modes": True}
    merged = merge(recipe, progress=False)
    config = json.loads((merged / "config.json").read_text())
    assert "saft_finetune_mode" not in config and "saft_base_model" not in config
    assert (merged / HEAD_FILE).read_bytes() == (folders[0] / HEAD_FILE).read_bytes()  # the same head: kept

    linearized, plain, gap = _hand_predictions(classifier, folders[:1], pixel_values, alpha=0.5)
    data = planted_labels(rows, plain)
    result = evaluate_model(merged, DIGITS, data=data, batch_size=8, device="cpu", progress=False)
    assert result["accuracy"] == accuracy_of(plain, data) != accuracy_of(linearized, data)


def test_allow_mixed_finetune_modes_must_be_a_boolean(family):
    base, _, folders, _, _ = family
    recipe = _recipe(base, folders, "out") | {"allow_mixed_finetune_modes": "yes"}
    with pytest.raises(ValueError, match="^allow_mixed_finetune_modes: expected true or false, got 'yes'$"):
        MergeConfig.from_dict(recipe)
