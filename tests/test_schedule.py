"""The time budget's arithmetic and the progress display, with a fake clock."""

import io

import pytest

from custom_llm import progress as progress_module
from custom_llm import schedule, training
from custom_llm.progress import Progress, clock
from custom_llm.schedule import EvaluationSchedule, TimeBudget


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def fake_time(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "time", fake)
    return fake


def test_budget_fits_steps_evaluations_and_the_final_save():
    budget = TimeBudget(minutes=2)
    budget.record_step(5.0)              # the first step warms up: not counted
    budget.record_step(1.0)
    assert budget.measured
    # 114 s left; the final validation (10 batches at a third of a step) and the save reserve
    # come off first, then each step costs 1 s plus its share of a validation every 50 steps.
    evaluation = 10 * 1.0 / 3
    room = 114 - evaluation - TimeBudget.SAVE_RESERVE_S
    assert budget.total_steps(2, elapsed=6.0, evaluations_per_step=1 / 50, eval_batches=10) == \
        2 + int(room // (1 + evaluation / 50))


def test_budget_follows_a_change_of_speed_and_a_measured_validation():
    budget = TimeBudget(minutes=1)
    for _ in range(21):
        budget.record_step(0.5)
    before = budget.total_steps(21, elapsed=0.0, evaluations_per_step=1 / 1000, eval_batches=1)
    for _ in range(20):                   # the machine got busy: steps take twice as long
        budget.record_step(1.0)
    budget.record_evaluation(4.0)
    after = budget.total_steps(21, elapsed=0.0, evaluations_per_step=1 / 1000, eval_batches=1)
    assert after < before
    assert after == 21 + int((60 - 4.0 - TimeBudget.SAVE_RESERVE_S) // (1.0 + 4.0 / 1000))


def test_a_resumed_budget_counts_the_time_already_spent(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(training.time, "monotonic", clock)
    run_clock = training.Clock(before=570.0)   # the sessions it resumed
    budget = TimeBudget(minutes=10)
    clock.now += 20
    assert budget.left(run_clock.elapsed()) == pytest.approx(10.0)
    budget.record_step(1.0)
    budget.record_step(1.0)
    room = 10.0 - 10 / 3 - TimeBudget.SAVE_RESERVE_S
    assert budget.total_steps(100, run_clock.elapsed(), 1 / 250, 10) == 100 + int(room // (1 + 10 / 3 / 250))
    clock.now += 60                      # over the budget: nothing more fits
    assert budget.total_steps(105, run_clock.elapsed(), 1 / 250, 10) == 105


def test_the_evaluation_schedule_is_one_rule_for_the_loop_and_the_estimates():
    schedule = EvaluationSchedule(interval=4, steps_per_epoch=10)
    total = 30
    due, last = [], 0
    for step in range(1, total + 1):     # as the loop asks it
        if schedule.due(step, last, total):
            due.append(step)
            last = step
    assert due == [4, 8, 10, 14, 18, 20, 24, 28, 30]   # every 4 steps, and at each epoch's end
    assert schedule.evaluations_per_step() * total == pytest.approx(len(due))   # what the estimates count
    assert EvaluationSchedule(250, 10 ** 6).evaluations_per_step() == pytest.approx(1 / 250, rel=1e-3)
    assert EvaluationSchedule(250, 20).evaluations_per_step() == 1 / 20   # short epochs: one at each end


def test_default_warmup_is_five_percent_at_most_200():
    assert [schedule.default_warmup(n) for n in (10, 100, 100_000)] == [1, 5, 200]


def test_clock():
    assert [clock(s) for s in (9, 247, 3909, -3)] == ["0:09", "4:07", "1:05:09", "0:00"]


def test_progress_in_a_log_prints_a_plain_line_every_interval(fake_time):
    log = io.StringIO()
    shown = Progress(total=100, initial=0, interactive=False, interval=30, stream=log)
    shown.update(1, 100, 2.5, 1000.0, 300)
    assert log.getvalue() == ""                       # not 30 s yet
    fake_time.now += 31
    shown.update(40, 120, 2.25, 12345.6, 75)
    fake_time.now += 10
    shown.update(41, 120, 2.2, 12345.6, 74)
    shown.write("step 41: validation loss 2.1")
    shown.close()
    assert log.getvalue().splitlines() == ["step 40/120: loss 2.2500, 12,346 tokens/s, 1:15 left",
                                           "step 41: validation loss 2.1"]
    assert "\r" not in log.getvalue()                 # no bar drawn into a log file


def test_progress_of_another_rank_prints_nothing(fake_time):
    log = io.StringIO()
    shown = Progress(total=10, initial=0, interactive=False, enabled=False, stream=log)
    fake_time.now += 100
    shown.update(5, 10, 1.0, 1.0, 1.0)
    shown.write("x")
    shown.close()
    assert log.getvalue() == ""
