"""Text-to-text classification scored on label words: exact match, and how often the output is no label word."""

import datasets
import evaluate

from saft_hf.models.t5 import normalize_prediction

_DESCRIPTION = """
Scores generated text against a task's label words (e.g. CoLA: "unacceptable"/"acceptable"). Predictions and
references are normalised as by `saft_hf.models.t5.normalize_prediction` (lower-cased, surrounding whitespace
stripped, inner whitespace runs collapsed to one space) before comparison.

- exact_match: fraction of predictions equal to their reference.
- off_label_fraction: fraction of predictions that are none of the task's label words — the analysis of merged
  text-to-text models answering with another task's labels (Lee et al., ICLR 2025, Appendix C.8).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated texts.
    references (`list` of `str`): reference label words.
    label_words (`list` of `str`): the task's label words; every reference must be one of them.
Returns:
    exact_match (`float`): fraction of predictions equal to their reference after normalisation.
    off_label_fraction (`float`): fraction of predictions that are not one of `label_words` after normalisation.
Example:
    >>> metric = saft_hf.metrics.load_metric("label_words")
    >>> metric.compute(predictions=["positive", "Negative ", "entailment"], references=["positive", "positive",
    ...     "negative"], label_words=["negative", "positive"])
    {'exact_match': 0.3333333333333333, 'off_label_fraction': 0.3333333333333333}
"""

_CITATION = """
@inproceedings{lee2025saft,
  title={Mitigating Parameter Interference in Model Merging via Sharpness-Aware Fine-Tuning},
  author={Lee, Yeoreum and Jung, Jinwook and Baik, Sungyong},
  booktitle={International Conference on Learning Representations},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LabelWords(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, label_words=None):
        if not predictions:
            raise ValueError("predictions is empty: there is nothing to score.")
        if not label_words:
            raise ValueError("label_words: pass the task's label words, e.g. label_words=['negative', 'positive'].")
        words = {normalize_prediction(word) for word in label_words}
        references = [normalize_prediction(ref) for ref in references]
        unknown = sorted(set(references) - words)
        if unknown:
            raise ValueError(f"references contain {unknown}, which are not among label_words {sorted(words)}.")
        predictions = [normalize_prediction(pred) for pred in predictions]
        count = len(predictions)
        matches = sum(pred == ref for pred, ref in zip(predictions, references))
        off_label = sum(pred not in words for pred in predictions)
        return {"exact_match": matches / count, "off_label_fraction": off_label / count}
