"""Answer length in words. Local `evaluate` module (loaded by path, no hub)."""
import datasets
import evaluate

from evals.metrics import core


class AnswerLength(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Answer length in words.", citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        scores = core.answer_length(predictions, references)
        return {"answer_length": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
