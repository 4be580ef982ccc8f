"""ASHA that lets a stopped trial end its own Train run.

Tune stops a trial by terminating its driver actor. A Train run launched from that actor is then cut off
mid-flight: its controller and workers die with the driver, but Ray keeps the run's placement group (it is
not fate-shared with the actor that created it), so the CPUs or GPUs stay reserved and later trials starve.
Train V2's own cleaner for this case needs the Ray dashboard, which local and test clusters often run
without.

So where ASHA says STOP, this scheduler asks the trial's workers to stop (trainers/outputs.request_stop; the
workers check at their next log step) and tells Tune to CONTINUE: the Train run ends normally, releases its
placement group, the trial's function returns, and Tune records the trial as completed. The sweep report
tells a stopped trial from a finished one by its steps.
"""

from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from trainers import outputs


class SelfStoppingASHA(ASHAScheduler):
    def __init__(self, *, sweep_dir: Path, time_attr: str, max_t: int, **asha_options):
        super().__init__(time_attr=time_attr, max_t=max_t, **asha_options)
        self._sweep_dir = Path(sweep_dir)
        self._step_key, self._last_step = time_attr, max_t  # kept here rather than read from ASHA's privates
        self._stopping: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self._stopping:
            return TrialScheduler.CONTINUE  # results of a trial winding down are not ASHA's to rank again
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != TrialScheduler.STOP:
            return decision
        self._stopping.add(trial.trial_id)
        if result.get(self._step_key, 0) < self._last_step:  # at max_t the run is ending by itself
            outputs.request_stop(self._sweep_dir / trial.trial_id)
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id in self._stopping:
            super().on_trial_remove(tune_controller, trial)  # ranked at the rung where it was stopped
            return
        super().on_trial_complete(tune_controller, trial, result)
