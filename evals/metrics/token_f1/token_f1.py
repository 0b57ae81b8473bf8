"""SQuAD-style token F1 after answer normalisation. Local `evaluate` module (loaded by path, no hub).

Empty-vs-empty (after normalisation) scores 1.0 (the SQuAD v2.0 rule; the v1.1 script gives 0.0);
one side empty scores 0.0. See core.token_f1.
"""
import datasets
import evaluate

from evals.metrics import core


class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="SQuAD-style token F1 after answer normalisation.", citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        scores = core.token_f1(predictions, references)
        return {"token_f1": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
