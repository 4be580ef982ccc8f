"""trainers/sweep_scheduler.py driven the way Tune drives a scheduler, without Ray or a sweep.

Tune calls set_search_properties (metric and mode from TuneConfig), on_trial_add, then on_trial_result per
report and on_trial_complete at the end. ASHA reads only the trial's id and the result; it never touches the
TuneController it is handed, so None stands in for it. The trials are Tune's own Trial objects (stub=True:
no trainable registered, no Ray started).

Grid used throughout: reports at evaluations every 2 steps, grace period 2, reduction factor 2, max_t 8, so
ASHA's rungs are at steps 2 and 4, and step 8 ends every run. With a reduction factor of 2, a trial that
reaches a rung below the median of the trials recorded there is stopped.
"""

import random

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from trainers import outputs
from trainers.sweep_scheduler import SelfStoppingASHA

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
METRIC, MODE = "val_loss", "min"
GRID = {"time_attr": "step", "max_t": 8, "grace_period": 2, "reduction_factor": 2}
CONTROLLER = None  # ASHA never reads the TuneController


class Sweep:
    """A SelfStoppingASHA and its trials, as a Tune run would hold them; `sweep_dir/<trial_id>` is each trial's
    run directory, as in trainers/sweep.py."""

    def __init__(self, sweep_dir, *trial_ids: str):
        self.sweep_dir = sweep_dir
        self.scheduler = SelfStoppingASHA(sweep_dir=sweep_dir, **GRID)
        assert self.scheduler.set_search_properties(METRIC, MODE)
        self.trials = {trial_id: Trial("train_trial", trial_id=trial_id, stub=True) for trial_id in trial_ids}
        for trial in self.trials.values():
            self.scheduler.on_trial_add(CONTROLLER, trial)

    def report(self, trial_id: str, step: int, loss: float | None = None) -> str:
        result = {"step": step, **({METRIC: loss} if loss is not None else {})}
        return self.scheduler.on_trial_result(CONTROLLER, self.trials[trial_id], result)

    def complete(self, trial_id: str, step: int, loss: float) -> None:
        self.scheduler.on_trial_complete(CONTROLLER, self.trials[trial_id], {"step": step, METRIC: loss})

    def stop_requested(self, trial_id: str) -> bool:
        return outputs.stop_requested(self.sweep_dir / trial_id)

    def stopped(self) -> set[str]:
        return {trial_id for trial_id in self.trials if self.stop_requested(trial_id)}


def test_a_trial_asha_would_stop_gets_a_stop_request_and_goes_on(tmp_path):
    sweep = Sweep(tmp_path, "good", "bad")
    assert sweep.report("good", 2, 1.0) == CONTINUE  # first at the rung: nothing to compare with
    assert sweep.report("bad", 2, 2.0) == CONTINUE  # below the rung's median: ASHA says STOP
    assert sweep.stopped() == {"bad"}
    assert (tmp_path / "bad" / outputs.STOP_FILE).read_text().startswith("stop requested")


def test_a_trial_above_the_cutoff_gets_no_stop_request(tmp_path):
    sweep = Sweep(tmp_path, "first", "better")
    assert sweep.report("first", 2, 2.0) == CONTINUE
    assert sweep.report("better", 2, 1.0) == CONTINUE
    assert sweep.stopped() == set()
    assert not (tmp_path / "first").exists()  # nothing written for a trial that goes on


def test_decisions_are_made_at_rungs_only(tmp_path):
    sweep = Sweep(tmp_path, "good", "bad")
    assert sweep.report("good", 2, 1.0) == CONTINUE
    assert sweep.report("bad", 1, 9.0) == CONTINUE  # before the grace period: never stopped
    assert sweep.stopped() == set()
    assert sweep.report("bad", 2, 1.5) == CONTINUE  # at the rung: judged, and worse than the median
    assert sweep.stopped() == {"bad"}


def test_at_max_t_the_run_ends_by_itself(tmp_path):
    """ASHA says STOP to every trial reaching max_t; the run is finishing anyway, so no stop request."""
    sweep = Sweep(tmp_path, "only")
    for step, loss in ((2, 1.0), (4, 0.9), (6, 0.8)):
        assert sweep.report("only", step, loss) == CONTINUE
    assert ASHAScheduler(**GRID, metric=METRIC, mode=MODE).on_trial_result(
        CONTROLLER, Trial("t", trial_id="x", stub=True), {"step": 8, METRIC: 0.7}) == STOP
    assert sweep.report("only", 8, 0.7) == CONTINUE
    assert sweep.stopped() == set()


def test_a_result_without_the_metric_is_not_judged(tmp_path):
    sweep = Sweep(tmp_path, "good", "bad")
    sweep.report("good", 2, 1.0)
    assert sweep.report("bad", 2) == CONTINUE  # e.g. a report of training metrics only
    assert sweep.stopped() == set()


def test_a_stopping_trials_later_results_are_not_ranked(tmp_path):
    """A trial winding down after its stop request may still report (an evaluation before it sees the file).
    Those results must not reach a later rung, where they would set the cutoff for the trials still running."""
    sweep = Sweep(tmp_path, "a", "b", "c")
    sweep.report("a", 2, 1.0)
    sweep.report("b", 2, 3.0)
    assert sweep.stopped() == {"b"}
    assert sweep.report("b", 4, 0.1) == CONTINUE  # excellent, but not ASHA's to rank any more
    sweep.complete("b", 4, 0.1)
    # Had b's 0.1 been recorded at rung 4, a's 0.9 would fall below it and a would be stopped.
    assert sweep.report("a", 4, 0.9) == CONTINUE
    assert sweep.stopped() == {"b"}


def test_a_finished_trial_is_ranked_at_its_last_rung(tmp_path):
    """The other side of the same rule: a trial that was not stopped and completes goes to ASHA as usual, and
    later trials are compared with it."""
    sweep = Sweep(tmp_path, "a", "c")
    sweep.report("a", 2, 1.0)
    sweep.complete("a", 4, 0.5)  # recorded at rung 4
    sweep.report("c", 2, 0.9)
    assert sweep.report("c", 4, 0.9) == CONTINUE
    assert sweep.stopped() == {"c"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stop_requests_follow_plain_asha_exactly(tmp_path, seed):
    """Over many trials and noisy losses, a stop request is written exactly where ASHA alone says STOP below
    max_t, and Tune is always told CONTINUE."""
    rng = random.Random(seed)
    trial_ids = [f"t{index}" for index in range(12)]
    sweep = Sweep(tmp_path / "sweep", *trial_ids)
    plain = ASHAScheduler(**GRID, metric=METRIC, mode=MODE)
    plain_trials = {trial_id: Trial("t", trial_id=trial_id, stub=True) for trial_id in trial_ids}
    for trial in plain_trials.values():
        plain.on_trial_add(CONTROLLER, trial)
    expected, running = set(), list(trial_ids)
    for step in (2, 4, 6):
        rng.shuffle(running)  # trials reach a rung in any order
        for trial_id in list(running):
            loss = rng.uniform(0.5, 2.0) / step
            decision = plain.on_trial_result(CONTROLLER, plain_trials[trial_id], {"step": step, METRIC: loss})
            assert sweep.report(trial_id, step, loss) == CONTINUE
            if decision == STOP:
                expected.add(trial_id)
                running.remove(trial_id)  # plain ASHA would end it here; stop feeding both
    assert expected, "the losses should make ASHA stop someone"
    assert sweep.stopped() == expected
