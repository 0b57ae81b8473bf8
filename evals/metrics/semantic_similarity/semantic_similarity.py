"""Cosine similarity of all-MiniLM-L6-v2 embeddings. Local `evaluate` module (loaded by path, no hub)."""
import datasets
import evaluate

from evals.metrics import core


class SemanticSimilarity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Cosine similarity of all-MiniLM-L6-v2 embeddings.", citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        scores = core.semantic_similarity(predictions, references)
        return {"semantic_similarity": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
