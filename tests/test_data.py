"""Tasks and their data: the paper's vision and GLUE tasks, CLIP preprocessing, the digits demo splits and tasks,
the Hub loader on local copies, model-input preparation."""

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from sklearn.datasets import load_digits
from transformers import CLIPImageProcessor

from saft_hf.data import (
    DIGIT_NAMES,
    GLUE_TASK_NAMES,
    TASKS,
    VISION_TASK_NAMES,
    CLIPImageTransform,
    HubDataset,
    ImageClassificationTask,
    get_task,
    load_digits_splits,
    make_digits_task,
    stsb_class,
)
from saft_hf.entrypoint import run_main
from saft_hf.errors import UnknownTaskError
from saft_hf.testing import build_tiny_t5_tokenizer, tiny_clip_processor


def _pixels(split: Dataset) -> np.ndarray:
    return np.stack([np.asarray(image.convert("L")) for image in split["image"]])


def _expected_digits_splits():
    """The documented protocol, re-derived with numpy: 20% test then 10% validation, each a seed-0 permutation
    (the generator `datasets.Dataset.train_test_split` uses)."""
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(pixels))
    test, rest = order[:360], order[360:]
    order = np.random.default_rng(0).permutation(len(rest))
    validation, train = rest[order[:144]], rest[order[144:]]
    return {
        name: (pixels[index], digits.target[index])
        for name, index in (("train", train), ("validation", validation), ("test", test))
    }


def test_digits_splits_follow_the_protocol():
    splits = load_digits_splits()
    assert {name: len(split) for name, split in splits.items()} == {"train": 1293, "validation": 144, "test": 360}
    for name, (pixels, labels) in _expected_digits_splits().items():
        assert np.array_equal(_pixels(splits[name]), pixels), name
        assert splits[name]["label"] == labels.tolist(), name
    assert splits["train"].features["label"].names == list(DIGIT_NAMES)
    assert splits["train"][0]["image"].mode == "RGB"


def test_digits_splits_are_deterministic():
    first = load_digits_splits()
    load_digits_splits.cache_clear()
    second = load_digits_splits()
    assert first is not second
    for name in first:
        assert first[name]["label"] == second[name]["label"]
        assert np.array_equal(_pixels(first[name]), _pixels(second[name]))


@pytest.mark.parametrize(
    "name, class_of_digit, class_names",
    [
        ("digits", {d: d for d in range(10)}, DIGIT_NAMES),
        ("digits_0to4", {d: d for d in range(5)}, DIGIT_NAMES[:5]),
        ("digits_5to9", {d: d - 5 for d in range(5, 10)}, DIGIT_NAMES[5:]),
        ("digits_parity", {d: d % 2 for d in range(10)}, ("even", "odd")),
        ("digits_small_large", {d: int(d >= 5) for d in range(10)}, ("small", "large")),
    ],
)
def test_digits_task_label_mapping(name, class_of_digit, class_names):
    task = get_task(name)
    assert task.class_names == class_names
    base = load_digits_splits()
    splits = task.load()
    for split, dataset in splits.items():
        kept = base[split].filter(lambda digit: digit in class_of_digit, input_columns="label")
        assert dataset["label"] == [class_of_digit[digit] for digit in kept["label"]]
        assert np.array_equal(_pixels(dataset), _pixels(kept))
        assert dataset.features["label"].names == list(class_names)


@pytest.mark.parametrize(
    "class_of_digit, message",
    [
        ({0: 0, 10: 1}, "not digits 0-9"),
        ({0: 0, 1: 2}, "every class index 0..1"),
        ({0: 0, 1: 0}, "every class index 0..1"),
    ],
)
def test_bad_digits_tasks_are_refused(class_of_digit, message):
    with pytest.raises(ValueError, match=message):
        make_digits_task("bad", ("a", "b"), class_of_digit)


def test_digits_task_takes_no_source():
    with pytest.raises(ValueError, match="takes no dataset source"):
        get_task("digits").load("some/dataset")


def test_unknown_task_names_the_registered_ones():
    with pytest.raises(KeyError, match="Unknown task 'imagenet'.*digits_0to4"):
        get_task("imagenet")
    assert {*VISION_TASK_NAMES, *GLUE_TASK_NAMES} <= set(TASKS)


# ---- the paper's vision tasks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, hub_id, configuration, num_classes, known",
    [
        (
            "cars",
            "tanganke/stanford_cars",
            None,
            196,
            {0: "AM General Hummer SUV 2000", 99: "FIAT 500 Convertible 2012", 195: "smart fortwo Convertible 2012"},
        ),
        ("dtd", "tanganke/dtd", None, 47, {0: "banded", 30: "polka-dotted", 46: "zigzagged"}),
        ("eurosat", "tanganke/eurosat", None, 10, {0: "annual crop land", 9: "lake or sea"}),
        ("gtsrb", "tanganke/gtsrb", None, 43, {0: "red and white circle 20 kph speed limit", 14: "stop"}),
        ("mnist", "ylecun/mnist", None, 10, {0: "0", 9: "9"}),
        ("resisc45", "tanganke/resisc45", None, 45, {0: "airplane", 44: "wetland"}),
        ("sun397", "tanganke/sun397", None, 397, {0: "abbey", 200: "iceberg", 396: "youth hostel"}),
        ("svhn", "ufldl-stanford/svhn", "cropped_digits", 10, {0: "0", 9: "9"}),
    ],
)
def test_vision_task_tables(name, hub_id, configuration, num_classes, known):
    task = get_task(name)
    assert isinstance(task, ImageClassificationTask)
    assert (task.load_splits.path, task.load_splits.name) == (hub_id, configuration)
    assert len(task.class_names) == num_classes == len(set(task.class_names))
    assert {index: task.class_names[index] for index in known} == known
    assert task.templates and all(template.count("{}") == 1 for template in task.templates)


def test_alphabetical_datasets_keep_alphabetical_label_order():
    # These datasets number their classes by sorted folder name: a list out of order would relabel the task.
    for name in ("dtd", "resisc45", "sun397"):
        names = get_task(name).class_names
        assert list(names) == sorted(names), name


def test_image_task_refuses_a_dataset_with_another_class_count(tmp_path):
    features = Features({"image": Image(), "label": ClassLabel(num_classes=7)})
    rows = _image_rows(10, 0) | {"target": [i % 7 for i in range(10)]}
    data = Dataset.from_dict({"image": rows["img"], "label": rows["target"]}, features=features)
    DatasetDict(train=data, test=data).save_to_disk(tmp_path / "seven")
    with pytest.raises(ValueError, match="'dtd'.*7 classes, the task names 47"):
        get_task("dtd").load(str(tmp_path / "seven"))


# ---- CLIP preprocessing -----------------------------------------------------------------------------------------


def _normalised(pixels: np.ndarray, processor) -> torch.Tensor:
    """The rescale-and-normalise step written out: uint8 (h, w, 3) to a float (3, h, w) tensor."""
    scaled = (pixels.astype(np.float64) / 255).astype(np.float32)
    mean, std = np.array(processor.image_mean, np.float32), np.array(processor.image_std, np.float32)
    return torch.from_numpy(((scaled - mean) / std).transpose(2, 0, 1).copy())


@pytest.mark.parametrize(
    "shape, shortest_edge, crop, rows, columns",
    [
        # (4, 7): the short side already has the target size, so the resize keeps every pixel; crop offset (7-4)//2
        ((4, 7, 3), 4, (4, 4), slice(0, 4), slice(1, 5)),
        # (8, 12) -> (4, 6) by nearest-neighbour halving (rows/columns 1, 3, 5, ...), then crop columns 1..4 of 6
        ((8, 12, 3), 4, (4, 4), slice(1, 8, 2), slice(3, 11, 2)),
        # portrait (15, 9) -> (5, 3) by thirds (pixels 1, 4, 7, ...), crop rows 1..3 of 5, offset (5-3)//2 = 1
        ((15, 9, 3), 3, (3, 3), slice(4, 13, 3), slice(1, 9, 3)),
    ],
)
def test_evaluation_preprocessing_is_resize_then_centre_crop(shape, shortest_edge, crop, rows, columns):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    processor = CLIPImageProcessor(
        size={"shortest_edge": shortest_edge}, crop_size={"height": crop[0], "width": crop[1]}, resample=0
    )
    transform = CLIPImageTransform.from_processor(processor)
    expected = _normalised(pixels[rows, columns], processor)
    assert torch.equal(transform.evaluation(PILImage.fromarray(pixels)), expected)


@pytest.mark.parametrize("shape", [(8, 8, 3), (13, 29, 3), (40, 17, 3), (64, 48, 3)])
def test_evaluation_preprocessing_equals_the_clip_image_processor(shape):
    image = PILImage.fromarray(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8))
    processor = tiny_clip_processor()
    expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(CLIPImageTransform.from_processor(processor).evaluation(image), expected)


def test_training_crops_are_random_per_seed_and_reproducible():
    image = PILImage.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    transform = CLIPImageTransform.from_processor(tiny_clip_processor())

    def crops(seed):
        torch.manual_seed(seed)
        return torch.stack([transform.training(image) for _ in range(3)])

    first = crops(0)
    assert first.shape == (3, 3, 32, 32)
    assert torch.equal(first, crops(0))
    assert not torch.equal(first, crops(1))
    assert not torch.equal(first[0], first[1])
    same_seed = [transform.training(image, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*same_seed)


def test_training_crop_boxes_stay_inside_the_scale_and_ratio_ranges():
    transform = CLIPImageTransform.from_processor(tiny_clip_processor(), train_scale=(0.5, 0.8))
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, height, width = transform.random_crop_box(60, 50, generator)
        assert 0 <= top and top + height <= 50 and 0 <= left and left + width <= 60
        assert 0.5 - 0.05 <= height * width / 3000 <= 0.8 + 0.05  # rounding to whole pixels
        assert 3 / 4 - 0.05 <= width / height <= 4 / 3 + 0.05


def test_a_full_image_training_crop_is_the_evaluation_resize():
    # Scale and ratio fixed at 1 on a square image: the crop is the whole image, then resized like evaluation.
    image = PILImage.fromarray(np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    transform = CLIPImageTransform.from_processor(tiny_clip_processor(), train_scale=(1, 1), train_ratio=(1, 1))
    assert torch.equal(transform.training(image), transform.evaluation(image))


def test_bad_processor_is_refused():
    with pytest.raises(ValueError, match="train_scale"):
        CLIPImageTransform.from_processor(tiny_clip_processor(), train_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="do_resize and do_normalize"):
        CLIPImageTransform.from_processor(CLIPImageProcessor(do_normalize=False))


# ---- the Hub loader, exercised on local copies --------------------------------------------------------------


def _image_rows(n: int, offset: int) -> dict:
    rng = np.random.default_rng(offset)
    images = [PILImage.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]
    return {"img": images, "target": [(offset + i) % 10 for i in range(n)]}


@pytest.fixture(scope="module")
def eurosat_like(tmp_path_factory):
    """An EuroSAT-shaped dataset with other column names, written with save_to_disk."""
    features = Features({"img": Image(), "target": ClassLabel(num_classes=10)})
    path = tmp_path_factory.mktemp("eurosat")
    DatasetDict(
        train=Dataset.from_dict(_image_rows(40, 0), features=features),
        test=Dataset.from_dict(_image_rows(10, 100), features=features),
    ).save_to_disk(path)
    return path


def test_hub_loader_splits_validation_and_renames_columns(eurosat_like):
    loader = HubDataset("tanganke/eurosat", columns={"img": "image", "target": "label"})
    splits = loader(str(eurosat_like))
    raw = DatasetDict.load_from_disk(eurosat_like)
    assert {name: len(split) for name, split in splits.items()} == {"train": 36, "validation": 4, "test": 10}
    order = np.random.default_rng(0).permutation(40)
    assert splits["validation"]["label"] == [raw["train"]["target"][i] for i in order[:4]]
    assert splits["train"]["label"] == [raw["train"]["target"][i] for i in order[4:]]
    assert splits["test"]["label"] == raw["test"]["target"]
    assert splits["train"].column_names == ["image", "label"]


def test_image_task_prepare_crops_train_randomly_and_evaluates_deterministically(eurosat_like):
    task = get_task("eurosat")
    splits = HubDataset("x", columns={"img": "image", "target": "label"})(str(eurosat_like))
    processor = tiny_clip_processor()
    prepared = task.prepare(splits, processor)
    for split in ("validation", "test"):
        batch = prepared[split][:3]
        expected = processor(images=splits[split][:3]["image"], return_tensors="pt")["pixel_values"]
        assert torch.equal(batch["pixel_values"], expected)
        assert batch["labels"].tolist() == splits[split][:3]["label"]
    torch.manual_seed(0)
    first = prepared["train"][:4]["pixel_values"]
    torch.manual_seed(1)
    second = prepared["train"][:4]["pixel_values"]
    assert first.shape == second.shape == (4, 3, 32, 32) and not torch.equal(first, second)
    unaugmented = task.prepare(splits, processor, augment=())["train"][:4]["pixel_values"]
    assert torch.equal(unaugmented, processor(images=splits["train"][:4]["image"], return_tensors="pt")["pixel_values"])


def test_cached_digits_inputs_are_bit_identical_to_the_on_the_fly_transform():
    """The digits tasks cache decoded images and resized crops per process; the same seed must give the very same
    pixel_values (training crops drawn from the same random numbers) as transforming every batch afresh."""
    import dataclasses

    from saft_hf.data.transforms import clear_input_cache

    task = get_task("digits_parity")
    assert task.cache_inputs
    uncached = dataclasses.replace(task, cache_inputs=False)
    processor = tiny_clip_processor()
    splits = task.load()
    clear_input_cache()
    batches = {}
    for name, which in (("cached, cold", task), ("cached, warm", task), ("on the fly", uncached)):
        prepared = which.prepare(splits, processor)
        torch.manual_seed(0)
        order = torch.randperm(len(prepared["train"])).tolist()
        batches[name] = [prepared["train"][order[i : i + 32]]["pixel_values"] for i in range(0, 320, 32)]
        batches[name] += [prepared[split][:]["pixel_values"] for split in ("validation", "test")]
        assert prepared["train"][:2]["labels"].tolist() == splits["train"][:2]["label"]
    for name in ("cached, cold", "cached, warm"):
        assert all(torch.equal(a, b) for a, b in zip(batches[name], batches["on the fly"], strict=True)), name
    # Evaluation tensors equal the transformers processor's.
    expected = processor(images=splits["test"][:5]["image"], return_tensors="pt")["pixel_values"]
    assert torch.equal(batches["cached, warm"][-1][:5], expected)


def test_normalize_batches_equal_one_image_at_a_time_with_transformers_arithmetic():
    transform = CLIPImageTransform.from_processor(tiny_clip_processor())
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    rescaled = (pixels.astype(np.float64) * transform.rescale_factor).astype(np.float32)
    expected = (rescaled - np.array(transform.mean, dtype=np.float32)) / np.array(transform.std, dtype=np.float32)
    batch = transform.normalize(pixels)
    assert batch.dtype == torch.float32 and batch.shape == (4, 3, 32, 32) and batch.is_contiguous()
    assert torch.equal(batch, torch.from_numpy(expected.transpose(0, 3, 1, 2).copy()))
    assert torch.equal(transform.normalize(pixels[1]), batch[1])


@pytest.fixture(scope="module")
def glue_like(tmp_path_factory):
    """An SST-2-shaped folder of parquet files, as a local copy of GLUE data would be (test = GLUE validation)."""
    path = tmp_path_factory.mktemp("sst2")
    rows = {"sentence": [f"sentence {i}" for i in range(30)], "label": [i % 2 for i in range(30)], "idx": [*range(30)]}
    Dataset.from_dict(rows).to_parquet(path / "train.parquet")
    Dataset.from_dict({k: v[:6] for k, v in rows.items()}).to_parquet(path / "validation.parquet")
    return path


def test_text_task_loads_local_glue_copy_and_tokenizes_label_words(glue_like):
    task = get_task("sst2")
    splits = task.load(str(glue_like))
    assert {name: len(split) for name, split in splits.items()} == {"train": 27, "validation": 3, "test": 6}
    prompt = "Is the sentiment of this sentence positive or negative? Sentence: sentence {}"
    assert task.format_inputs(splits["test"][:2]) == [prompt.format(0), prompt.format(1)]
    tokenizer = build_tiny_t5_tokenizer()
    prepared = task.prepare(splits, tokenizer, max_source_length=64)
    row = prepared["test"][1]
    assert set(prepared["test"].column_names) == {"input_ids", "attention_mask", "labels"}
    assert row["input_ids"] == tokenizer(prompt.format(1))["input_ids"]
    assert row["labels"] == tokenizer(text_target="positive")["input_ids"]


# One GLUE-shaped row per task (the columns of `nyu-mll/glue`), the input the model must read, and its label word.
_GLUE_CASES = [
    (
        "cola",
        {"sentence": "The book was read."},
        1,
        "Is this sentence grammatically acceptable or unacceptable? Sentence: The book was read.",
        "acceptable",
    ),
    (
        "mnli",
        {"premise": "A man sleeps.", "hypothesis": "A man is awake."},
        2,
        "Does the premise entail the hypothesis, contradict it, or neither? Answer entailment, neutral or "
        "contradiction. Premise: A man sleeps. Hypothesis: A man is awake.",
        "contradiction",
    ),
    (
        "mrpc",
        {"sentence1": "He left.", "sentence2": "He went away."},
        1,
        "Do these two sentences mean the same thing? Answer equivalent or not_equivalent. "
        "Sentence 1: He left. Sentence 2: He went away.",
        "equivalent",
    ),
    (
        "qnli",
        {"question": "Who wrote it?", "sentence": "It rained."},
        1,
        "Does the sentence contain the answer to the question? Answer entailment or not_entailment. "
        "Question: Who wrote it? Sentence: It rained.",
        "not_entailment",
    ),
    (
        "qqp",
        {"question1": "How to cook?", "question2": "How do I cook?"},
        1,
        "Do these two questions ask the same thing? Answer duplicate or not_duplicate. "
        "Question 1: How to cook? Question 2: How do I cook?",
        "duplicate",
    ),
    (
        "rte",
        {"sentence1": "Cats purr.", "sentence2": "Cats make sounds."},
        0,
        "Does the premise entail the hypothesis? Answer entailment or not_entailment. "
        "Premise: Cats purr. Hypothesis: Cats make sounds.",
        "entailment",
    ),
    (
        "sst2",
        {"sentence": "a wonderful film"},
        1,
        "Is the sentiment of this sentence positive or negative? Sentence: a wonderful film",
        "positive",
    ),
    (
        "stsb",
        {"sentence1": "A dog runs.", "sentence2": "A dog is running."},
        4.6,
        "How similar are these two sentences, from 0 (unrelated) to 5 (same meaning)? "
        "Sentence 1: A dog runs. Sentence 2: A dog is running.",
        "5",
    ),
]


@pytest.mark.parametrize("name, columns, label, expected_input, expected_word", _GLUE_CASES)
def test_glue_tasks_format_local_glue_rows(tmp_path, name, columns, label, expected_input, expected_word):
    task = get_task(name)
    test_split = "validation_matched" if name == "mnli" else "validation"
    rows = {column: [value] * 10 for column, value in columns.items()} | {"label": [label] * 10, "idx": [*range(10)]}
    data = Dataset.from_dict(
        rows,
        features=Features(
            {
                **{column: Value("string") for column in columns},
                "label": Value("float32") if name == "stsb" else Value("int64"),
                "idx": Value("int32"),
            }
        ),
    )
    DatasetDict({"train": data, test_split: data.select(range(4))}).save_to_disk(tmp_path / name)
    splits = task.load(str(tmp_path / name))
    assert {split: len(rows) for split, rows in splits.items()} == {"train": 9, "validation": 1, "test": 4}
    assert task.format_inputs(splits["test"][:1]) == [expected_input]
    assert task.label_words[splits["test"][0]["label"]] == expected_word
    tokenizer = build_tiny_t5_tokenizer()
    prepared = task.prepare(splits, tokenizer, max_source_length=512)["test"][0]
    assert prepared["input_ids"] == tokenizer(expected_input)["input_ids"]
    assert prepared["labels"] == tokenizer(text_target=expected_word)["input_ids"]


def test_glue_label_words_and_secondary_metrics():
    assert get_task("cola").label_words == ("unacceptable", "acceptable")
    assert get_task("mrpc").label_words == ("not_equivalent", "equivalent")
    assert get_task("rte").label_words == ("entailment", "not_entailment")
    assert get_task("sst2").label_words == ("negative", "positive")
    assert {name: get_task(name).metrics for name in ("cola", "mrpc", "qqp", "sst2")} == {
        "cola": ("matthews_correlation",),
        "mrpc": ("f1",),
        "qqp": ("f1",),
        "sst2": (),
    }


@pytest.mark.parametrize(
    "score, expected", [(0.0, 0), (0.49, 0), (0.5, 1), (2.5, 3), (3.2, 3), (4.5, 5), (5.0, 5), (-0.1, 0), (5.2, 5)]
)
def test_stsb_scores_round_half_up_into_six_classes(score, expected):
    assert stsb_class(score) == expected


def test_stsb_refuses_unlabeled_rows():
    with pytest.raises(ValueError, match="STS-B score nan"):
        stsb_class(float("nan"))


def test_hub_loader_names_a_missing_split(eurosat_like, tmp_path):
    DatasetDict(train=DatasetDict.load_from_disk(eurosat_like)["train"]).save_to_disk(tmp_path / "train_only")
    with pytest.raises(ValueError, match="has no 'test' split"):
        HubDataset("x")(str(tmp_path / "train_only"))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: DatasetDict(train=d["train"], validation=d["validation"]), "no 'test' split"),
        (lambda d: DatasetDict(d, test=d["test"].remove_columns("label")), "'test' split lacks column.*label"),
        (lambda d: DatasetDict(d, validation=d["validation"].select([])), "'validation' split is empty"),
    ],
)
def test_bad_task_data_is_refused_naming_what_is_wrong(eurosat_like, mutate, message):
    loader = HubDataset("x", columns={"img": "image", "target": "label"})
    eurosat = get_task("eurosat")
    task = type(eurosat)(eurosat.name, eurosat.class_names, eurosat.templates, lambda source: mutate(loader(source)))
    with pytest.raises(ValueError, match=message):
        task.load(str(eurosat_like))


def test_an_unknown_task_is_a_one_line_user_error_that_is_still_a_key_error(capsys):
    with pytest.raises(UnknownTaskError) as error_info:
        get_task("imagenet")
    assert isinstance(error_info.value, KeyError)
    assert str(error_info.value).startswith("Unknown task 'imagenet'. Registered tasks: ")
    assert run_main(lambda argv: get_task("imagenet"), [], prog="tool") == 1
    assert capsys.readouterr().err.startswith("tool: error: Unknown task 'imagenet'. Registered tasks: ")


def test_a_hub_dataset_out_of_reach_is_one_line_saying_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network; nothing is cached for it here
    with pytest.raises(FileNotFoundError) as refused:
        get_task("sst2").load()
    message = str(refused.value)  # it was datasets' ConnectionError, shown as a traceback
    assert message.startswith("dataset 'nyu-mll/glue': Couldn't reach 'nyu-mll/glue' on the Hub")
    assert (
        message.endswith(
            "go online, or give a local copy (a folder written by DatasetDict.save_to_disk; saft-hf "
            "evaluate --dataset_path TASK=PATH)"
        )
        and "\n" not in message
    )
