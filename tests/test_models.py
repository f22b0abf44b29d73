"""The CLIP zero-shot classifier, the T5 label-word helpers, and the tiny models/tokenizers in saft_hf.testing."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    CLIPModel,
    CLIPVisionModel,
)

from saft_hf.models import (
    HEAD_FILE,
    NOT_A_LABEL_WORD,
    CLIPVisionClassifier,
    ZeroShotHead,
    build_zero_shot_head,
    generate_texts,
    match_label_words,
    predict_label_words,
    text_to_text_collator,
    tokenize_text_to_text,
)
from saft_hf.testing import (
    build_tiny_clip,
    build_tiny_clip_tokenizer,
    build_tiny_t5,
    build_tiny_t5_tokenizer,
    save_tiny_clip,
    save_tiny_t5,
)

CLASS_NAMES = ("zero", "one", "two", "three")
TEMPLATES = ('a photo of the number: "{}".', "a photo of the digit {}.", "a handwritten {}.")


@pytest.fixture(scope="module")
def tiny_clip():
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def classifier(tiny_clip):
    model, tokenizer, _ = tiny_clip
    head = build_zero_shot_head(model, CLASS_NAMES, TEMPLATES, tokenizer, batch_size=5)
    return CLIPVisionClassifier(model.vision_model.config, head, model.vision_model)


@pytest.fixture(scope="module")
def pixel_values():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---- CLIP zero-shot head -----------------------------------------------------------------------------------------


def test_head_equals_hand_computation_of_the_paper_recipe(tiny_clip, classifier):
    model, tokenizer, _ = tiny_clip
    expected = []
    with torch.no_grad():
        for name in CLASS_NAMES:
            per_template = []
            for template in TEMPLATES:
                tokens = tokenizer([template.format(name)], return_tensors="pt")  # one prompt, no padding
                pooled = model.text_model(**tokens).pooler_output
                per_template.append(F.normalize(model.text_projection(pooled)[0], dim=-1))
            expected.append(F.normalize(torch.stack(per_template).mean(0), dim=-1))
    torch.testing.assert_close(classifier.class_embeddings, torch.stack(expected), rtol=0, atol=1e-6)
    assert torch.equal(classifier.visual_projection, model.visual_projection.weight)
    assert torch.equal(classifier.logit_scale, model.logit_scale)
    assert classifier.class_names == CLASS_NAMES and classifier.templates == TEMPLATES


def test_single_template_logits_equal_clip_model_logits_per_image(tiny_clip, pixel_values):
    model, tokenizer, _ = tiny_clip
    template = "a photo of the digit {}."
    head = build_zero_shot_head(model, CLASS_NAMES, [template], tokenizer)
    clip_classifier = CLIPVisionClassifier(model.vision_model.config, head, model.vision_model)
    prompts = tokenizer([template.format(name) for name in CLASS_NAMES], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(pixel_values=pixel_values, **prompts).logits_per_image
        logits = clip_classifier(pixel_values).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_forward_loss_is_cross_entropy_of_logits(classifier, pixel_values):
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        output = classifier(pixel_values, labels=labels)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))
    assert output.logits.shape == (6, len(CLASS_NAMES))


def test_only_the_vision_tower_trains(classifier, pixel_values):
    trainable = {name for name, param in classifier.named_parameters() if param.requires_grad}
    vision_keys = {f"vision_model.{name}" for name, _ in CLIPVisionModel(classifier.config).named_parameters()}
    assert trainable == vision_keys
    # The head is frozen: buffers, not parameters, and absent from the state dict (checkpoints are vision-only).
    assert {name for name, _ in classifier.named_buffers()} >= {"visual_projection", "class_embeddings", "logit_scale"}
    assert all(key.startswith("vision_model.") for key in classifier.state_dict())
    classifier.zero_grad()
    classifier(pixel_values, labels=torch.zeros(6, dtype=torch.long)).loss.backward()
    assert all(param.grad is not None for param in classifier.parameters())
    classifier.zero_grad()


def test_fsdp_auto_wrap_classes_exist_in_the_models(classifier, tiny_t5):
    # accelerate's FSDP2 transformer auto-wrap takes `_no_split_modules` and refuses any class it cannot find.
    from accelerate.utils.dataclasses import get_module_class_from_name

    for model, expected in ((classifier, "CLIPEncoderLayer"), (tiny_t5[0], "T5Block")):
        assert expected in model._no_split_modules
        assert all(get_module_class_from_name(model, name) is not None for name in model._no_split_modules)


def test_save_is_a_plain_clip_vision_model_and_reloads_identically(classifier, pixel_values, tmp_path):
    classifier.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPVisionModel"]
    assert config["model_type"] == "clip_vision_model"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved_keys = set(f.keys())
    assert saved_keys == set(classifier.state_dict())  # exactly the vision_model.* tensors
    assert all(key.startswith("vision_model.") for key in saved_keys)

    plain = CLIPVisionModel.from_pretrained(tmp_path)
    reference = classifier.vision_model.state_dict()
    assert plain.state_dict().keys() == reference.keys()
    assert all(torch.equal(plain.state_dict()[key], reference[key]) for key in reference)

    reloaded = CLIPVisionClassifier.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, classifier(pixel_values).logits)
    assert reloaded.class_names == CLASS_NAMES and reloaded.templates == TEMPLATES


def test_vision_only_checkpoint_needs_a_head(classifier, pixel_values, tmp_path):
    # A public fine-tune holds only the vision tower (here saved by CLIPVisionModel itself, as a 5.x user would).
    classifier.vision_model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=HEAD_FILE):
        CLIPVisionClassifier.from_pretrained(tmp_path)
    with_head = CLIPVisionClassifier.from_pretrained(tmp_path, head=classifier.head)
    with torch.no_grad():
        assert torch.equal(with_head(pixel_values).logits, classifier(pixel_values).logits)


def test_from_clip_loads_a_saved_clip_folder(tiny_clip, classifier, pixel_values, tmp_path):
    save_tiny_clip(tmp_path, seed=0)
    loaded = CLIPVisionClassifier.from_clip(tmp_path, CLASS_NAMES, TEMPLATES, batch_size=2)
    torch.testing.assert_close(loaded.class_embeddings, classifier.class_embeddings, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, classifier(pixel_values).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "class_names, templates, message",
    [
        ((), TEMPLATES, "class_names is empty"),
        (CLASS_NAMES, (), "templates is empty"),
        (CLASS_NAMES, ("a photo of a digit.",), "exactly one '{}'"),
        (CLASS_NAMES, ("{} and {}",), "exactly one '{}'"),
    ],
)
def test_bad_prompts_are_refused(tiny_clip, class_names, templates, message):
    model, tokenizer, _ = tiny_clip
    with pytest.raises(ValueError, match=message):
        build_zero_shot_head(model, class_names, templates, tokenizer)


def test_inconsistent_head_is_refused(classifier, tmp_path):
    head = classifier.head
    with pytest.raises(ValueError, match="class_names"):
        ZeroShotHead(head.visual_projection, head.class_embeddings, head.logit_scale, ("a",), TEMPLATES)
    with pytest.raises(ValueError, match="visual_projection"):
        ZeroShotHead(head.visual_projection.T, head.class_embeddings, head.logit_scale, CLASS_NAMES, TEMPLATES)
    wide_head = ZeroShotHead(
        torch.zeros(head.visual_projection.shape[0], 7), head.class_embeddings, head.logit_scale, CLASS_NAMES, TEMPLATES
    )
    with pytest.raises(ValueError, match="hidden_size"):
        CLIPVisionClassifier(classifier.config, wide_head)
    not_a_head = tmp_path / "not_a_head.safetensors"
    from safetensors.torch import save_file

    save_file({"class_embeddings": head.class_embeddings.contiguous()}, not_a_head)
    with pytest.raises(ValueError, match="visual_projection"):
        ZeroShotHead.load(not_a_head)


# ---- T5 label words ------------------------------------------------------------------------------------------------

LABEL_WORDS = ("entailment", "not_entailment")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("entailment", 0),
        ("not_entailment", 1),
        ("  Not_Entailment ", 1),
        ("ENTAILMENT", 0),
        ("entailment entailment", NOT_A_LABEL_WORD),
        ("not entailment", NOT_A_LABEL_WORD),
        ("positive", NOT_A_LABEL_WORD),  # another task's label word (the paper's App. C.8 failure)
        ("", NOT_A_LABEL_WORD),
    ],
)
def test_match_label_words(text, expected):
    assert match_label_words([text], LABEL_WORDS) == [expected]


def test_label_words_must_be_distinct():
    with pytest.raises(ValueError, match="not distinct"):
        match_label_words(["a"], ("Yes", "yes "))


@pytest.fixture(scope="module")
def tiny_t5():
    return build_tiny_t5(seed=0)


def _greedy_reference(model, tokenizer, text, max_new_tokens):
    """Token-by-token greedy decoding of one unpadded input, written out without `generate`."""
    encoded = tokenizer([text], return_tensors="pt")
    decoder_ids = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(**encoded, decoder_input_ids=decoder_ids).logits[:, -1]
            decoder_ids = torch.cat([decoder_ids, logits.argmax(-1, keepdim=True)], dim=1)
            if decoder_ids[0, -1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(decoder_ids[0], skip_special_tokens=True)


def test_predict_label_words_equals_greedy_reference(tiny_t5):
    model, tokenizer = tiny_t5
    texts = ["rte sentence1: the movie was great sentence2: it was good", "a terrible film", "is this acceptable ?"]
    # Every output of a random model is some string; make one of them a label word, so both branches are exercised.
    reference = [_greedy_reference(model, tokenizer, text, 4) for text in texts]
    label_words = (reference[1] or "entailment", "not_entailment")
    assert generate_texts(model, tokenizer, texts, max_new_tokens=4, batch_size=2) == reference
    predicted = predict_label_words(model, tokenizer, texts, label_words, batch_size=2, max_new_tokens=4)
    assert predicted == match_label_words(reference, label_words)
    assert predicted[1] == 0


def test_tokenize_and_collate_label_word_targets(tiny_t5):
    model, tokenizer = tiny_t5
    encoding = tokenize_text_to_text(tokenizer, ["a b", "the movie was great"], [1, 0], LABEL_WORDS, 3)
    assert [len(ids) for ids in encoding["input_ids"]] == [3, 3]  # truncated to max_source_length
    assert encoding["labels"] == [tokenizer(text_target=word)["input_ids"] for word in ("not_entailment", "entailment")]
    batch = text_to_text_collator(tokenizer, model)([dict(zip(encoding, row)) for row in zip(*encoding.values())])
    padded = torch.tensor([ids + [-100] * (batch["labels"].shape[1] - len(ids)) for ids in encoding["labels"]])
    assert torch.equal(batch["labels"], padded)
    assert torch.equal(batch["decoder_input_ids"][:, 0], torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("label", [-1, 2])
def test_labels_without_label_word_are_refused(tiny_t5, label):
    _, tokenizer = tiny_t5
    with pytest.raises(ValueError, match=f"Label {label} has no label word"):
        tokenize_text_to_text(tokenizer, ["x"], [label], LABEL_WORDS, 8)


# ---- tiny models and tokenizers --------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [build_tiny_t5_tokenizer, build_tiny_clip_tokenizer])
def test_tokenizer_round_trips_through_auto_tokenizer(build, tmp_path):
    tokenizer = build(["zebra"])
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is type(tokenizer)
    text = 'Zebra: a photo of the number "7", not_entailment!'
    ids = tokenizer(text)["input_ids"]
    assert reloaded(text)["input_ids"] == ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_t5_tokenizer_keeps_label_words_whole_and_decodes_exactly():
    tokenizer = build_tiny_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for word in ("unacceptable", "not_equivalent", "not_entailment", "positive"):
        assert tokenizer(text_target=word)["input_ids"] == [tokenizer.convert_tokens_to_ids("\u2581" + word), 1]
    text = "Some UNSEEN words, with punctuation: 3.14!"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_tiny_models_are_deterministic_and_reload_from_their_folders(tiny_clip, tmp_path):
    model, tokenizer, _ = tiny_clip
    again, _, _ = build_tiny_clip(seed=0)
    other, _, _ = build_tiny_clip(seed=1)
    state, other_state = model.state_dict(), other.state_dict()
    assert all(torch.equal(tensor, again.state_dict()[key]) for key, tensor in state.items())
    assert not torch.equal(state["text_projection.weight"], other_state["text_projection.weight"])

    clip_folder = save_tiny_clip(tmp_path / "clip", seed=0)
    reloaded = CLIPModel.from_pretrained(clip_folder)
    assert all(torch.equal(tensor, reloaded.state_dict()[key]) for key, tensor in state.items())
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id  # CLIP pools at the first eos

    t5, _ = build_tiny_t5(seed=0)
    t5_folder = save_tiny_t5(tmp_path / "t5", seed=0)
    reloaded_t5 = AutoModelForSeq2SeqLM.from_pretrained(t5_folder)
    assert all(torch.equal(tensor, reloaded_t5.state_dict()[key]) for key, tensor in t5.state_dict().items())
    assert len(AutoTokenizer.from_pretrained(t5_folder)) == t5.config.vocab_size
