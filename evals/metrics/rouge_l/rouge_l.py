"""ROUGE-L F-measure (rouge_score, stemmed), per example and mean. Local `evaluate` module (loaded by path, no hub)."""
import datasets
import evaluate

from evals.metrics import core


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-L F-measure (rouge_score, stemmed), per example and mean.", citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        scores = core.rouge_l(predictions, references)
        return {"rouge_l": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
