"""saft_hf.evaluation: accuracy of every saved-model kind against a hand count, text metrics against scikit-learn,
loading merged weights, and the errors for inputs that cannot be scored."""

import copy
import random

import pytest
import torch
from datasets import Dataset
from digits_clip import digits_trained_clip
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from saft_hf.data import get_task, load_digits_splits
from saft_hf.evaluation import (
    evaluate_model,
    label_word_max_new_tokens,
    load_weights_,
    score_label_words,
    zero_shot_head_for,
)
from saft_hf.models import HEAD_FILE, CLIPVisionClassifier
from saft_hf.modes import apply_finetune_mode
from saft_hf.testing import build_tiny_t5

DIGITS = get_task("digits")
NUM_ROWS = 30


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP whose vision tower had 60 steps on digits (`digits_clip`)."""
    return digits_trained_clip(tmp_path_factory.mktemp("clip"), train_rows=320, steps=60)[0]


@pytest.fixture(scope="module")
def processor(clip_dir):
    return AutoImageProcessor.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def rows():
    return load_digits_splits()["test"].select(range(NUM_ROWS))


def _classifier(clip_dir) -> CLIPVisionClassifier:
    classifier = CLIPVisionClassifier.from_clip(clip_dir, DIGITS.class_names, DIGITS.templates)
    classifier.name_or_path = str(clip_dir)
    return classifier


@torch.no_grad()
def _perturb_(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """A stand-in for fine-tuning: move every trainable tensor by seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(scale * torch.randn(param.shape, generator=generator))


@torch.no_grad()
def _predictions(model, processor, rows) -> list[int]:
    """The reference: the processor's pixel values through the model's own forward, one batch."""
    pixel_values = processor(images=[image.convert("RGB") for image in rows["image"]], return_tensors="pt")
    return model.eval()(pixel_values=pixel_values["pixel_values"]).logits.argmax(-1).tolist()


def _planted(rows, predictions: list[int]):
    """Labels the model gets right exactly on rows 0, 3, 6, ... (wrong on the others), and that accuracy."""
    labels = [p if i % 3 == 0 else (p + 1) % 10 for i, p in enumerate(predictions)]
    accuracy = sum(i % 3 == 0 for i in range(len(labels))) / len(labels)
    return rows.remove_columns("label").add_column("label", labels), accuracy


# Each kind returns (model_or_path, evaluate_model keyword arguments, the reference predictions).
def _classifier_folder(tmp_path, clip_dir, processor, rows):
    classifier = _classifier(clip_dir)
    _perturb_(classifier, seed=1)
    classifier.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return tmp_path / "model", {}, _predictions(classifier, processor, rows)


def _vision_tower_with_head(tmp_path, clip_dir, processor, rows):
    classifier = _classifier(clip_dir)
    _perturb_(classifier, seed=2)
    classifier.vision_model.save_pretrained(tmp_path / "tower")  # a public-style CLIPVisionModel fine-tune
    return tmp_path / "tower", {"head": classifier.head, "base": clip_dir}, _predictions(classifier, processor, rows)


def _vision_tower_head_from_base(tmp_path, clip_dir, processor, rows):
    classifier = _classifier(clip_dir)
    _perturb_(classifier, seed=3)
    classifier.vision_model.save_pretrained(tmp_path / "tower")
    return tmp_path / "tower", {"base": clip_dir}, _predictions(classifier, processor, rows)


def _full_clip_zero_shot(tmp_path, clip_dir, processor, rows):
    return clip_dir, {}, _predictions(_classifier(clip_dir), processor, rows)


def _ftts_folder(tmp_path, clip_dir, processor, rows):
    linearized = apply_finetune_mode(_classifier(clip_dir), "ftts", base_model_name_or_path=str(clip_dir))
    _perturb_(linearized, seed=4)
    linearized.save_pretrained(tmp_path / "ftts")
    processor.save_pretrained(tmp_path / "ftts")
    return tmp_path / "ftts", {}, _predictions(linearized, processor, rows)


def _lora_folder(tmp_path, clip_dir, processor, rows):
    classifier = _classifier(clip_dir)
    lora = apply_finetune_mode(classifier, "lora", r=4, lora_alpha=8)
    _perturb_(lora, seed=5, scale=0.2)  # lora_B starts at zero: give the adapter an effect
    lora.save_pretrained(tmp_path / "lora")
    classifier.head.save(tmp_path / "lora" / HEAD_FILE)
    processor.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora", {}, _predictions(lora, processor, rows)


def _model_with_merged_state_dict(tmp_path, clip_dir, processor, rows):
    tuned = _classifier(clip_dir)
    _perturb_(tuned, seed=6)
    # A merge output is a full CLIPModel state dict: the text tower's keys are not the classifier's.
    merged = CLIPModel.from_pretrained(clip_dir).state_dict() | tuned.state_dict()
    kwargs = {"state_dict": merged, "processor": processor}
    return _classifier(clip_dir), kwargs, _predictions(tuned, processor, rows)


def _base_folder_with_merged_full_clip(tmp_path, clip_dir, processor, rows):
    merged = CLIPModel.from_pretrained(clip_dir)
    _perturb_(merged, seed=8)  # the text tower too: the zero-shot head must come from the merged one
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(clip_dir).save_pretrained(tmp_path / "merged")
    reference = CLIPVisionClassifier.from_clip(tmp_path / "merged", DIGITS.class_names, DIGITS.templates)
    return clip_dir, {"state_dict": merged.state_dict()}, _predictions(reference, processor, rows)


def _linearized_with_merged_state_dict(tmp_path, clip_dir, processor, rows):
    tuned = apply_finetune_mode(_classifier(clip_dir), "ftts")
    _perturb_(tuned, seed=7)
    base = apply_finetune_mode(_classifier(clip_dir), "ftts")
    kwargs = {"state_dict": tuned.state_dict(), "processor": processor}
    return base, kwargs, _predictions(tuned, processor, rows)


@pytest.mark.parametrize(
    "kind",
    [
        _classifier_folder,
        _vision_tower_with_head,
        _vision_tower_head_from_base,
        _full_clip_zero_shot,
        _ftts_folder,
        _lora_folder,
        _model_with_merged_state_dict,
        _base_folder_with_merged_full_clip,
        _linearized_with_merged_state_dict,
    ],
    ids=lambda kind: kind.__name__.strip("_"),
)
def test_vision_accuracy_equals_a_hand_count(tmp_path, clip_dir, processor, rows, kind):
    model_or_path, kwargs, predictions = kind(tmp_path, clip_dir, processor, rows)
    assert len(set(predictions)) > 1  # a model answering one class would hide a mix-up of rows
    data, expected = _planted(rows, predictions)
    result = evaluate_model(model_or_path, DIGITS, data=data, batch_size=8, device="cpu", progress=False, **kwargs)
    assert result == {"accuracy": expected, "num_samples": NUM_ROWS}


def test_merges_scored_on_one_base_folder_load_it_once_and_do_not_leak_into_each_other(
    tmp_path, clip_dir, processor, rows, monkeypatch
):
    loads = []
    original = CLIPModel.from_pretrained
    monkeypatch.setattr(CLIPModel, "from_pretrained", lambda *a, **k: loads.append(a[-1]) or original(*a, **k))
    base = tmp_path / "base"
    original(clip_dir).save_pretrained(base)
    AutoTokenizer.from_pretrained(clip_dir).save_pretrained(base)

    def score(merged, data):
        kwargs = dict(data=data, processor=processor, batch_size=8, device="cpu", progress=False)
        return evaluate_model(base, DIGITS, state_dict=merged.state_dict(), **kwargs)

    for seed in (8, 9, 8):  # each merge's own weights, the last one again after another
        merged = original(clip_dir)
        _perturb_(merged, seed=seed)
        merged.save_pretrained(tmp_path / f"merged_{seed}")
        AutoTokenizer.from_pretrained(clip_dir).save_pretrained(tmp_path / f"merged_{seed}")
        reference = CLIPVisionClassifier.from_clip(tmp_path / f"merged_{seed}", DIGITS.class_names, DIGITS.templates)
        data, expected = _planted(rows, _predictions(reference, processor, rows))
        assert score(merged, data) == {"accuracy": expected, "num_samples": NUM_ROWS}
    assert [str(path) for path in loads if str(path) == str(base)] == [str(base)]
    # A base folder rewritten in place is loaded again.
    original(clip_dir).save_pretrained(base)
    score(merged, data)
    assert [str(path) for path in loads if str(path) == str(base)] == [str(base)] * 2


def test_max_samples_and_registered_splits(clip_dir, processor):
    test = DIGITS.load()["test"]
    predictions = _predictions(_classifier(clip_dir), processor, test.select(range(12)))
    expected = sum(p == label for p, label in zip(predictions, test["label"][:12])) / 12
    result = evaluate_model(clip_dir, "digits", "test", max_samples=12, batch_size=5, progress=False)
    assert result == {"accuracy": expected, "num_samples": 12}


# ---- text metrics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task_name, generated, labels",
    [
        ("sst2", ["positive", " Negative", "POSITIVE ", "neutral", "negative"], [1, 0, 0, 1, 0]),
        (
            "cola",
            ["acceptable", "unacceptable", "acceptable", "yes", "acceptable", "unacceptable", "Acceptable"],
            [1, 0, 0, 1, 1, 1, 1],
        ),
        (
            "mrpc",
            ["equivalent", "not_equivalent", "equivalent", "equivalent", "entailment", "not_equivalent"],
            [1, 0, 0, 1, 1, 1],
        ),
        ("qqp", ["duplicate", "duplicate", "not_duplicate", "no"], [1, 0, 1, 1]),
    ],
)
def test_text_metrics_equal_scikit_learn(task_name, generated, labels):
    task = get_task(task_name)
    words = [word.lower() for word in task.label_words]
    predicted = [words.index(text.strip().lower()) if text.strip().lower() in words else -1 for text in generated]
    result = score_label_words(task, generated, labels)
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert result["off_label_fraction"] == pytest.approx(predicted.count(-1) / len(predicted))
    if task_name == "cola":
        assert result["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, predicted))
    if task_name in ("mrpc", "qqp"):
        # An off-label answer is not a "positive" answer: binary F1 with it read as class 0.
        as_binary = [max(p, 0) for p in predicted]
        assert result["f1"] == pytest.approx(f1_score(labels, as_binary))
    assert set(result) == {"accuracy", "off_label_fraction", *task.metrics}


def test_text_metrics_hand_values():
    # MRPC: TP = 2 (rows 0, 3), FP = 1 (row 2), FN = 2 (rows 4, 5): F1 = 4 / (4 + 3) = 4/7.
    result = score_label_words(
        get_task("mrpc"),
        ["equivalent", "not_equivalent", "equivalent", "equivalent", "entailment", "not_equivalent"],
        [1, 0, 0, 1, 1, 1],
    )
    assert result == pytest.approx({"accuracy": 3 / 6, "off_label_fraction": 1 / 6, "f1": 4 / 7})


def test_text_metrics_refuse_unlabeled_rows():
    with pytest.raises(ValueError, match="'sst2': labels \\[-1\\] have no label word"):
        score_label_words(get_task("sst2"), ["positive"], [-1])


# ---- loading merged weights ----------------------------------------------------------------------------------


def test_load_weights_accepts_tied_names_and_extra_keys_and_names_what_is_missing():
    model, _ = build_tiny_t5(seed=0)
    source, _ = build_tiny_t5(seed=1)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("embed_tokens.weight")}
    load_weights_(model, state | {"text_model.unrelated": torch.zeros(3)})
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name  # the tied embeddings came with shared.weight
    del state["encoder.final_layer_norm.weight"]
    with pytest.raises(ValueError, match="lacks 1 tensor.*encoder.final_layer_norm.weight"):
        load_weights_(model, state)
    with pytest.raises(ValueError, match="state_dict\\['shared.weight'\\] has shape \\(2, 2\\)"):
        load_weights_(model, source.state_dict() | {"shared.weight": torch.zeros(2, 2)})


# ---- errors --------------------------------------------------------------------------------------------------


def test_a_head_of_another_task_is_refused(tmp_path, clip_dir, rows):
    parity = CLIPVisionClassifier.from_clip(clip_dir, ("even", "odd"), ("a photo of an {} number.",))
    parity.save_pretrained(tmp_path / "parity")
    with pytest.raises(ValueError, match="'digits' has 10 classes.*classifies 2 \\(even, odd"):
        evaluate_model(tmp_path / "parity", DIGITS, data=rows, base=clip_dir, progress=False)
    with pytest.raises(ValueError, match="classifies 2"):
        evaluate_model(parity, DIGITS, data=rows, base=clip_dir, progress=False)


def test_a_vision_tower_without_head_or_base_is_refused(tmp_path, clip_dir, rows):
    _classifier(clip_dir).vision_model.save_pretrained(tmp_path / "tower")
    with pytest.raises(ValueError, match="has a zero_shot_head.safetensors or is a full CLIPModel.*head=.*base="):
        evaluate_model(tmp_path / "tower", DIGITS, data=rows, progress=False)
    with pytest.raises(ValueError, match="pass head="):
        zero_shot_head_for(DIGITS, sources=[str(tmp_path / "tower")])


def test_a_bad_split_is_refused():
    model, _ = build_tiny_t5()
    with pytest.raises(ValueError, match="split must be one of .*'dev'"):
        evaluate_model(model, "digits", "dev", progress=False)


# ---- FTTS text-to-text: generation with the linearised forward ------------------------------------------------


SST2 = get_task("sst2")


@pytest.fixture(scope="module")
def sentiment():
    """A tiny T5 taught to answer 24 SST-2 rows with their (random) label words, its tokenizer, and the rows."""
    model, tokenizer = build_tiny_t5(seed=0)
    rng = random.Random(0)
    words = "the movie was great and acting wonderful a terrible film boring far too long this is good".split()
    rows = Dataset.from_dict(
        {
            "sentence": [" ".join(rng.choice(words) for _ in range(6)) for _ in range(24)],
            "label": [rng.randrange(2) for _ in range(24)],
        }
    )
    inputs = tokenizer(SST2.format_inputs(rows[:]), padding=True, return_tensors="pt")
    labels = tokenizer(
        text_target=[SST2.label_words[label] for label in rows["label"]], padding=True, return_tensors="pt"
    )["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(80):
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer, rows


def _hand_linearised_texts(base_model, weights, tokenizer, texts, max_new_tokens):
    """Greedy decoding of f(w0) + J(w0) (w - w0), in float64, on the whole decoder prefix at every step, by
    reverse-mode autograd; and the smallest gap between the two best tokens of a row still decoding."""
    model = copy.deepcopy(base_model).double().eval()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    delta = tuple(weights[name].double() - base[name] for name in base)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    ids = torch.zeros(len(texts), 1, dtype=torch.long)  # decoder_start_token_id
    finished = torch.zeros(len(texts), dtype=torch.bool)
    gaps = []
    for _ in range(max_new_tokens):

        def last_logits(*params, ids=ids):
            kwargs = {**batch, "decoder_input_ids": ids, "use_cache": False}
            return functional_call(model, dict(zip(base, params)), args=(), kwargs=kwargs).logits[:, -1]

        with sdpa_kernel(SDPBackend.MATH):
            value, tangent = torch.autograd.functional.jvp(last_logits, tuple(base.values()), delta)
        top2 = (value + tangent).topk(2).values
        gaps.append((top2[:, 0] - top2[:, 1])[~finished].min())
        tokens = (value + tangent).argmax(-1).masked_fill(finished, tokenizer.pad_token_id)
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        finished |= tokens == tokenizer.eos_token_id
    return tokenizer.batch_decode(ids, skip_special_tokens=True), min(gaps)


def test_text_ftts_is_scored_by_generating_with_the_linearised_forward(tmp_path, sentiment):
    base_model, tokenizer, rows = sentiment
    for part in (base_model, tokenizer):
        part.save_pretrained(tmp_path / "base")
    linearized = apply_finetune_mode(copy.deepcopy(base_model), "ftts", base_model_name_or_path=str(tmp_path / "base"))
    _perturb_(linearized, seed=1, scale=0.2)
    for part in (linearized, tokenizer):
        part.save_pretrained(tmp_path / "ftts")
    weights = dict(linearized.model.named_parameters())
    max_new_tokens = label_word_max_new_tokens(tokenizer, SST2.label_words)
    texts, gap = _hand_linearised_texts(base_model, weights, tokenizer, SST2.format_inputs(rows[:]), max_new_tokens)
    assert gap > 1e-3  # no near-tie that float32 could flip
    expected = score_label_words(SST2, texts, rows["label"]) | {"num_samples": len(rows)}
    options = dict(data=rows, batch_size=8, device="cpu", progress=False)
    assert evaluate_model(tmp_path / "ftts", SST2, **options) == expected
    assert evaluate_model(linearized, SST2, processor=tokenizer, **options) == expected
    # Weights handed over as FTTS weights are linearised around the model they are loaded into.
    state = {name: w.detach() for name, w in weights.items()}
    assert evaluate_model(tmp_path / "base", SST2, state_dict=state, finetune_mode="ftts", **options) == expected
    # The plain forward at w answers otherwise: the comparison has teeth.
    plain = evaluate_model(tmp_path / "base", SST2, state_dict=state, **options)
    assert plain["accuracy"] != expected["accuracy"]
    assert expected["off_label_fraction"] < 0.25  # mostly label words: the accuracy is a real count


def test_finetune_mode_of_a_state_dict_is_checked(tmp_path, sentiment):
    model, tokenizer, rows = sentiment
    with pytest.raises(ValueError, match="finetune_mode='ftts' describes the weights of state_dict, and none was"):
        evaluate_model(model, SST2, data=rows, processor=tokenizer, finetune_mode="ftts", progress=False)
    with pytest.raises(ValueError, match="finetune_mode must be one of .* got 'linear'"):
        evaluate_model(
            model,
            SST2,
            data=rows,
            processor=tokenizer,
            state_dict=model.state_dict(),
            finetune_mode="linear",
            progress=False,
        )
