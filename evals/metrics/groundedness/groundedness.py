"""Share of answer content words found in the retrieved passages. Local `evaluate` module (loaded by path, no hub)."""
import datasets
import evaluate

from evals.metrics import core


class Groundedness(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of answer content words found in the retrieved passages.", citation="", inputs_description="predictions, passages",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                         "passages": datasets.Value("string")}))

    def _compute(self, predictions, passages):
        scores = core.groundedness(predictions, passages)
        return {"groundedness": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
