"""The plan of a run over time: the learning-rate schedule, when to evaluate, and fitting the whole
plan into a wall-time budget (train_llm.py --minutes)."""

import collections
import math


def learning_rate_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int,
                     min_lr_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio × the peak."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# The optimizer and peak learning rate of a run from scratch, and of fine-tuning (train_llm.py
# --init_from): a model that already knows language needs smaller steps, or its first updates
# overwrite what it learned. Fine-tuning keeps the optimizer the weights were pretrained with (Muon
# on AdamW-pretrained weights fine-tunes no better: Liu et al. 2025, "Muon is Scalable for LLM
# Training") at about a tenth of its from-scratch peak: for this project's models Muon at 0.0015
# (measured, docs/benchmarks.md); for GPT-2, pretrained with AdamW at 6e-4, AdamW at 1e-4, within the 5e-5 to
# 3e-4 usual for fine-tuning it.
RECIPES = {"from scratch": {"optimizer": "muon", "learning_rate": 0.015},
           "trained weights": {"optimizer": "muon", "learning_rate": 0.0015},
           "gpt2": {"optimizer": "adamw", "learning_rate": 1e-4}}


def default_warmup(total_steps: int, fine_tuning: bool = False) -> int:
    """5% of the steps, at most 200; when fine-tuning at most 100: the loss starts low, so the
    warmup only has to let the fresh AdamW moments settle (beta2 0.99: about 100 steps)."""
    return min(100 if fine_tuning else 200, max(1, total_steps // 20))


class EvaluationSchedule:
    """When the loop evaluates: every `interval` steps since the last evaluation, at the end of
    every epoch, and after the last step. The time budget and the speed estimate count evaluations
    with evaluations_per_step, so all three follow this one rule."""

    def __init__(self, interval: int, steps_per_epoch: int):
        self.interval, self.steps_per_epoch = interval, steps_per_epoch

    def epoch_ends(self, step: int, total_steps: int) -> bool:
        return step % self.steps_per_epoch == 0 or step >= total_steps

    def due(self, step: int, last_eval_step: int, total_steps: int) -> bool:
        return step - last_eval_step >= self.interval or self.epoch_ends(step, total_steps)

    def evaluations_per_step(self) -> float:
        """In the long run: each epoch has one every `interval` steps before its end, and one at it."""
        return ((self.steps_per_epoch - 1) // self.interval + 1) / self.steps_per_epoch


class TimeBudget:
    """How many steps fit in the budget, measured as the run goes.

    The budget counts from the first step (and includes the time of earlier sessions of a resumed
    run) to the end of the final save: steps, the periodic validations, the last validation and the
    saves. The step time is the mean of the recent steps (the first one, which warms kernels up,
    is left out), so the plan follows the machine when it speeds up or slows down; the cosine
    schedule is laid over the current estimate of the total. The time itself is the run's clock
    (training.Clock), passed in."""

    FIRST_MEASURED_STEP = 2      # steps timed before the first estimate (the first one is warm-up)
    SAVE_RESERVE_S = 1.0         # the final saves and the loss curve (a fraction of a second measured)

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.step_seconds = collections.deque(maxlen=20)
        self.evaluation_seconds = None
        self.steps_timed = 0

    def left(self, elapsed: float) -> float:
        return max(0.0, self.seconds - elapsed)

    def record_step(self, seconds: float) -> None:
        self.steps_timed += 1
        if self.steps_timed > 1:
            self.step_seconds.append(seconds)

    def record_evaluation(self, seconds: float) -> None:
        self.evaluation_seconds = seconds

    @property
    def measured(self) -> bool:
        return len(self.step_seconds) >= self.FIRST_MEASURED_STEP - 1

    def mean_step_seconds(self) -> float:
        return sum(self.step_seconds) / len(self.step_seconds)

    def total_steps(self, step: int, elapsed: float, evaluations_per_step: float, eval_batches: int) -> int:
        """The plan's total: the steps done plus those that fit in what is left, counting the
        schedule's validations and one at the end."""
        per_step = self.mean_step_seconds()
        # Until one is timed, a validation batch is taken to cost a third of a step (forward only).
        evaluation = self.evaluation_seconds if self.evaluation_seconds is not None else eval_batches * per_step / 3
        room = self.left(elapsed) - evaluation - self.SAVE_RESERVE_S
        return step + max(0, math.floor(room / (per_step + evaluation * evaluations_per_step)))
