"""F1 score (scikit-learn's `f1_score`), GLUE's secondary metric for MRPC and QQP."""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = """
F1 is the harmonic mean of precision and recall: F1 = 2 * (precision * recall) / (precision + recall).
With `average="binary"` (the default) it scores the class `pos_label`; "micro", "macro" and "weighted" average over
classes, and `average=None` returns one score per class. A class never predicted and never present scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): reference class ids.
    labels (`list` of `int`, optional): the classes to include when `average != "binary"`.
    pos_label (`int`, defaults to 1): the positive class when `average="binary"`.
    average (`str` or `None`, defaults to `"binary"`): one of "binary", "micro", "macro", "weighted", or None.
    sample_weight (`list` of `float`, optional): per-sample weights.
Returns:
    f1 (`float`, or `list` of `float` with `average=None`): the F1 score(s), in [0, 1].
Example:
    >>> metric = saft_hf.metrics.load_metric("f1")
    >>> metric.compute(predictions=[1, 1, 0, 0], references=[1, 0, 1, 0])
    {'f1': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=0.0,
        )
        return {"f1": [float(s) for s in score] if average is None else float(score)}
