"""Sentence chrF (sacrebleu), 0-100. Local `evaluate` module (loaded by path, no hub)."""
import datasets
import evaluate

from evals.metrics import core


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Sentence chrF (sacrebleu), 0-100.", citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        scores = core.chrf(predictions, references)
        return {"chrf": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
