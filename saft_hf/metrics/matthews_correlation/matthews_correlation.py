"""Matthews correlation coefficient (scikit-learn's `matthews_corrcoef`), GLUE's metric for CoLA."""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef

_DESCRIPTION = """
The Matthews correlation coefficient measures the quality of binary and multiclass classifications from the
confusion matrix: for two classes, MCC = (TP * TN - FP * FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)).
It ranges from -1 (total disagreement) through 0 (no better than chance) to +1 (perfect prediction), and is 0
when a denominator factor is 0 (e.g. a classifier that always predicts one class).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): reference class ids.
    sample_weight (`list` of `float`, optional): per-sample weights.
Returns:
    matthews_correlation (`float`): the coefficient, in [-1, 1].
Example:
    >>> metric = saft_hf.metrics.load_metric("matthews_correlation")
    >>> metric.compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])
    {'matthews_correlation': 0.5773502691896258}
"""

_CITATION = """
@article{matthews1975comparison,
  title={Comparison of the predicted and observed secondary structure of T4 phage lysozyme},
  author={Matthews, Brian W},
  journal={Biochimica et Biophysica Acta (BBA) - Protein Structure},
  volume={405},
  number={2},
  pages={442--451},
  year={1975}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.matthews_corrcoef.html"],
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions, sample_weight=sample_weight))}
