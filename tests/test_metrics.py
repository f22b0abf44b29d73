"""The local `evaluate` metric scripts: loaded by path with the Hub offline, checked against hand-computed values
and scikit-learn."""

import math

import evaluate
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from saft_hf.metrics import METRIC_NAMES, METRICS_DIR, load_metric


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name) for name in METRIC_NAMES}


def test_every_metric_folder_loads_by_path_as_an_evaluate_metric():
    shipped = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
    assert shipped == sorted(METRIC_NAMES)
    for name in METRIC_NAMES:
        module = evaluate.load(str(METRICS_DIR / name))
        assert isinstance(module, evaluate.Metric)
        assert module.name == name


ACCURACY_CASES = [
    # predictions, references, kwargs, hand-computed value
    ([0, 1, 1, 0], [0, 1, 0, 0], {}, 3 / 4),
    ([2, 2, 2], [0, 1, 2], {}, 1 / 3),
    ([0, 1, 1, 0], [0, 1, 0, 0], {"normalize": False}, 3.0),
    ([0, 1, 1], [0, 1, 0], {"sample_weight": [1.0, 2.0, 5.0]}, 3 / 8),
    ([5, 6], [7, 8], {}, 0.0),
]


@pytest.mark.parametrize("predictions, references, kwargs, expected", ACCURACY_CASES)
def test_accuracy(metrics, predictions, references, kwargs, expected):
    result = metrics["accuracy"].compute(predictions=predictions, references=references, **kwargs)
    assert result == {"accuracy": pytest.approx(expected, abs=1e-12)}
    assert result["accuracy"] == pytest.approx(accuracy_score(references, predictions, **kwargs), abs=1e-12)


def _binary_mcc(predictions, references):
    tp = sum(p == 1 and r == 1 for p, r in zip(predictions, references))
    tn = sum(p == 0 and r == 0 for p, r in zip(predictions, references))
    fp = sum(p == 1 and r == 0 for p, r in zip(predictions, references))
    fn = sum(p == 0 and r == 1 for p, r in zip(predictions, references))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


MCC_CASES = [
    ([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], 1 / 6),
    ([1, 1, 0, 0], [1, 0, 0, 0], 1 / math.sqrt(3)),
    ([1, 0, 1, 0], [1, 0, 1, 0], 1.0),
    ([0, 1, 0, 1], [1, 0, 1, 0], -1.0),
    ([1, 1, 1, 1], [1, 0, 1, 0], 0.0),  # a constant classifier (CoLA's degenerate case)
]


@pytest.mark.parametrize("predictions, references, expected", MCC_CASES)
def test_matthews_correlation(metrics, predictions, references, expected):
    result = metrics["matthews_correlation"].compute(predictions=predictions, references=references)
    assert result["matthews_correlation"] == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(_binary_mcc(predictions, references), abs=1e-12)
    assert result["matthews_correlation"] == pytest.approx(matthews_corrcoef(references, predictions), abs=1e-12)


def test_matthews_correlation_multiclass_matches_sklearn(metrics):
    predictions, references = [0, 1, 2, 2, 1, 0, 2], [0, 2, 2, 1, 1, 0, 0]
    result = metrics["matthews_correlation"].compute(predictions=predictions, references=references)
    assert result["matthews_correlation"] == pytest.approx(matthews_corrcoef(references, predictions), abs=1e-12)


F1_CASES = [
    # precision 2/3, recall 2/3
    ([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], {}, 2 / 3),
    # precision 1, recall 1/3: 2 * (1/3) / (4/3)
    ([1, 0, 0, 0], [1, 1, 1, 0], {}, 1 / 2),
    # class 0 is positive: precision 2/3, recall 1
    ([0, 0, 0, 1], [0, 0, 1, 1], {"pos_label": 0}, 4 / 5),
    # per class F1: class 0 -> 1, class 1 -> 2/3, class 2 -> 0 (never predicted)
    ([0, 1, 1, 1], [0, 1, 1, 2], {"average": "macro"}, (1 + 4 / 5 + 0) / 3),
    ([0, 1, 1, 1], [0, 1, 1, 2], {"average": None}, [1.0, 4 / 5, 0.0]),
    ([0, 1, 1, 1], [0, 1, 1, 2], {"average": "micro"}, 3 / 4),
    ([0, 0], [1, 1], {}, 0.0),  # no true positive: 0, not a division error
]


@pytest.mark.parametrize("predictions, references, kwargs, expected", F1_CASES)
def test_f1(metrics, predictions, references, kwargs, expected):
    result = metrics["f1"].compute(predictions=predictions, references=references, **kwargs)
    assert result["f1"] == pytest.approx(expected, abs=1e-12)
    reference = f1_score(references, predictions, zero_division=0.0, **kwargs)
    assert result["f1"] == pytest.approx(reference.tolist() if kwargs.get("average", "binary") is None else reference)


SST2_WORDS = ["negative", "positive"]
LABEL_WORD_CASES = [
    # predictions, references, label words, exact match, off-label fraction
    (["positive", "negative"], ["positive", "positive"], SST2_WORDS, 1 / 2, 0.0),
    ([" Positive ", "NEGATIVE"], ["positive", "negative"], SST2_WORDS, 1.0, 0.0),
    # a merged model answering with other tasks' label words
    (["entailment", "positive", "acceptable"], ["negative", "positive", "negative"], SST2_WORDS, 1 / 3, 2 / 3),
    (["not_entailment", "not entailment", ""], ["not_entailment"] * 3, ["entailment", "not_entailment"], 1 / 3, 2 / 3),
    (["not  equivalent"], ["not equivalent"], ["equivalent", "not equivalent"], 1.0, 0.0),
]


@pytest.mark.parametrize("predictions, references, label_words, exact_match, off_label", LABEL_WORD_CASES)
def test_label_words(metrics, predictions, references, label_words, exact_match, off_label):
    result = metrics["label_words"].compute(predictions=predictions, references=references, label_words=label_words)
    assert result == {"exact_match": pytest.approx(exact_match), "off_label_fraction": pytest.approx(off_label)}


def test_metric_add_batch_accumulates_like_one_compute(metrics):
    metric = metrics["accuracy"]
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.add_batch(predictions=[1, 1, 2], references=[1, 1, 0])
    assert metric.compute() == {"accuracy": pytest.approx(3 / 5)}


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("label_words", {"predictions": ["a"], "references": ["a"]}, "label_words"),
        ("label_words", {"predictions": ["a"], "references": ["b"], "label_words": ["a"]}, "not among label_words"),
        ("label_words", {"predictions": [], "references": [], "label_words": ["a"]}, "empty"),
        ("accuracy", {"predictions": [], "references": []}, "empty"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(metrics, name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics[name].compute(**kwargs)


def test_unknown_metric_name_is_refused():
    with pytest.raises(ValueError, match="'bleu'"):
        load_metric("bleu")
