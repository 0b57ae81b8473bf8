"""Training curves for the Train tab's charts, read from a run's events.jsonl (sft_core/train.py).

Three charts, since their scales differ by orders of magnitude: loss (train raw, train smoothed,
eval), learning rate, and throughput (tokens/s, where the trainer counts tokens).

Why every loss frame carries one empty row per series: Gradio's LinePlot (6.31, its Vega-Lite
frontend) builds the colour scale once, from the series present in the data it first draws, and
later updates only swap the data. A chart first drawn before any point, or before the first eval,
then paints nothing (every line gets stroke "none", the legend is empty). With a row for each series
from the start, whose step and loss are empty (Vega leaves such points out), the scale always knows
all three series, whenever the chart is built.
"""
from __future__ import annotations

import math

import pandas as pd

LOSS_SERIES = ("train", "train (smoothed)", "eval")
LOSS_COLORS = {"train": "#9ecae1", "train (smoothed)": "#1f5fa8", "eval": "#e6550d"}  # raw light, smoothed dark
SMOOTHING = 0.6  # TensorBoard's default weight for its exponential moving average


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the first points are not pulled to 0)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def training_curves(events: list[dict]) -> dict[str, pd.DataFrame]:
    """{"loss": (step, loss, series), "lr": (step, learning_rate), "speed": (step, tokens_per_s)}."""
    train = [(e["step"], _num(e.get("loss"))) for e in events if e.get("step") is not None and _num(e.get("loss")) is not None]
    evals = [(e["step"], _num(e.get("eval_loss"))) for e in events
             if e.get("step") is not None and _num(e.get("eval_loss")) is not None]
    rows = [{"step": None, "loss": None, "series": s} for s in LOSS_SERIES]  # see the module docstring
    rows += [{"step": s, "loss": v, "series": "train"} for s, v in train]
    if len(train) >= 3:
        rows += [{"step": s, "loss": v, "series": "train (smoothed)"}
                 for (s, _), v in zip(train, smooth([v for _, v in train]))]
    rows += [{"step": s, "loss": v, "series": "eval"} for s, v in evals]
    loss = pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "float64", "loss": "float64",
                                                                         "series": "str"})

    def single(key: str) -> pd.DataFrame:
        pts = [(e["step"], _num(e.get(key))) for e in events if e.get("step") is not None and _num(e.get(key)) is not None]
        return pd.DataFrame(pts, columns=["step", key]).astype({"step": "float64", key: "float64"})
    return {"loss": loss, "lr": single("learning_rate"), "speed": single("tokens_per_s")}
