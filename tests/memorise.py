"""Train test fixtures to a criterion, never for a fixed number of steps.

A fixture adapter is "done" when, for every training prompt, teacher-forced greedy decoding reproduces
the whole answer (the argmax at each answer position is the answer's next token) **with a margin**: the
winning logit beats the runner-up by at least ``MARGIN`` nats at every position. Greedy generation then
follows exactly the answer's path, in transformers and in any other engine whose logits differ by less
than half the margin.

Why a margin of 2.0 is safe across floating-point paths (AVX-512 vs AVX2 reduction order, vLLM's CPU
kernels vs transformers): float32 accumulation-order differences move a logit of this 2-layer,
hidden-64 model by ~1e-5 (rounding 2^-24 relative, times a few hundred terms, times |logit| < 50);
even a bf16 rounding of every logit (2^-8 relative, |logit| < 50) moves it by < 0.2, so two engines
cannot swap the top two tokens while they are 2.0 apart. A fixed step count gives no such guarantee:
40 steps memorised the answer on an AVX2 machine and not on an AVX-512 one.

Special tokens (the end-of-turn ``<|im_end|>``) are not part of the criterion: the tiny test model uses
that token as its pad token, so its (tied) embedding row is zero and its logit is 0 whatever LoRA
learns — the tiny model can never end its turn, and the tests read the answer from the start of the
text instead.

Each loop checks the criterion as it trains, stops as soon as it holds, and fails with the step cap and
the worst position it saw when the cap is reached.
"""
from __future__ import annotations

from contextlib import contextmanager

MARGIN = 2.0


class NotMemorised(AssertionError):
    pass


def answer_margin(model, input_ids, answer_mask) -> float:
    """The smallest (answer-token logit - best other logit) over the answer positions of one sequence.

    ``input_ids``: 1-D list/tensor, prompt + answer; ``answer_mask``: 1 where the token belongs to the
    answer (predicted from the position before it). Negative means the greedy path leaves the answer."""
    import torch
    ids = torch.as_tensor(input_ids).view(1, -1)
    mask = torch.as_tensor(answer_mask).view(-1).bool()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()  # position t predicts token t+1
    finally:
        model.train(was_training)
    targets = ids[0, 1:]
    sel = mask[1:]
    logits, targets = logits[sel], targets[sel]
    assert len(targets) > 0, "no answer tokens to check"
    gold = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, targets.view(-1, 1), float("-inf")).max(dim=1).values
    return float((gold - others).min())


def worst_margin(model, examples) -> float:
    """The smallest answer margin over ``examples`` [(input_ids, answer_mask), ...]."""
    return min(answer_margin(model, ids, mask) for ids, mask in examples)


def memorised(model, examples, margin: float = MARGIN) -> tuple[bool, float]:
    m = worst_margin(model, examples)
    return m >= margin, m


def trainer_examples(train_dataset, skip_ids=()) -> list[tuple[list[int], list[int]]]:
    """(input_ids, answer mask) of every row of a tokenised TRL prompt-completion dataset; tokens in
    ``skip_ids`` (the special tokens) are left out of the mask."""
    skip = set(skip_ids)
    out = []
    for row in train_dataset:  # TRL builds ``labels`` (-100 outside the answer) or a ``completion_mask``
        trained = [lab != -100 for lab in row["labels"]] if "labels" in row else row["completion_mask"]
        out.append((row["input_ids"], [int(bool(m) and t not in skip) for t, m in zip(row["input_ids"], trained)]))
    return out


def memorise_callback(every: int = 5, margin: float = MARGIN):
    """A TrainerCallback that stops training once every training row is memorised (checked every
    ``every`` steps); ``cb.result`` then holds (step, worst margin). Training that reaches max_steps
    (the cap) without it leaves ``cb.result`` None and ``cb.last`` the worst margin seen."""
    from transformers import TrainerCallback

    class Memorise(TrainerCallback):
        def __init__(self):
            self.result = None
            self.last = None
            self.examples = None

        def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kw):
            if state.global_step % every:
                return
            ok, m = memorised(model, self.examples, margin)
            self.last = (state.global_step, m)
            if ok:
                self.result = (state.global_step, m)
                control.should_training_stop = True

    return Memorise()


@contextmanager
def training_until_memorised(every: int = 5, margin: float = MARGIN):
    """Within this block every ``trl.SFTTrainer`` built (by ``sft_core.train.run``) stops as soon as its
    training rows are memorised; yields the callback. The caller sets max_steps as the cap and checks
    ``require(cb, cap)`` after the run."""
    import pytest
    import trl
    cb = memorise_callback(every, margin)
    real = trl.SFTTrainer

    class Stopping(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            cb.examples = trainer_examples(self.train_dataset, self.processing_class.all_special_ids)
            self.add_callback(cb)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl, "SFTTrainer", Stopping)
        yield cb


def require(cb, cap: int) -> tuple[int, float]:
    if cb.result is None:
        step, m = cb.last if cb.last else (cap, float("nan"))
        raise NotMemorised(f"the fixture adapter did not memorise its answer within the step cap of {cap} "
                           f"(worst answer-token margin {m:.3f} at step {step}, needed {MARGIN})")
    return cb.result
