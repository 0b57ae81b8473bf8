"""SQuAD-style exact match after answer normalisation. Local `evaluate` module (loaded by path, no hub).

Empty-vs-empty (after normalisation) scores 1.0; one side empty scores 0.0. See core.exact_match.
"""
import datasets
import evaluate

from evals.metrics import core


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="SQuAD-style exact match after answer normalisation.", citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        scores = core.exact_match(predictions, references)
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
