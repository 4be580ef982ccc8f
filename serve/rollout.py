"""Progressive rollout with an automatic judge (stage=rollout): the canary's traffic share steps up while it is
compared with production serving at the same time, and the rollout ends by itself, promoted or rolled back.

    python launch.py stage=rollout serve.model=ranker_dlrm serve.canary_version=5

At each step of serve.rollout.steps (canary percentages, e.g. 1, 5, 25, 50, 100):
  1. the canary alias moves to the step's share; the replicas follow within serve.refresh_s (serve/ingress.py);
  2. after serve.rollout.bake_s of traffic, the judge looks every serve.rollout.look_interval_s at what each arm
     served since the step began (GET /v1/monitor/samples, from the application's watcher): latency, 5xx errors,
     and quality from delayed feedback (rankers: AUC of the clicks; LLMs: the mean feedback score);
  3. each metric passes, fails or is inconclusive (serve/judge.py); a critical metric that fails rolls the canary
     back at once; when every metric passes the next step begins; otherwise the judge looks again, and a step
     still undecided at serve.rollout.max_looks rolls the canary back (a canary that cannot show it is as good is
     not promoted).
The last step, 100%, is the promotion itself: with no production traffic left there is nothing to compare
against. Promotion moves production to the canary; rollback removes the canary alias. Either is one alias move
under the registry's lock, written with the rollout's final state and preceded in the history by the decision
and its evidence (per-metric statistics, sample counts); no replica is redeployed.

Looking again and again at the same comparison would multiply false alarms. The judge splits its error budget
serve.rollout.alpha evenly between the three metrics and spends each share over every look the rollout may take
(steps below 100% times max_looks) with an O'Brien-Fleming-type Lan-DeMets spending function: each look tests at
its part, tiny early and most of it late, and the parts add up to the share, so by the union bound a canary as
good as production is rolled back with probability at most alpha over the whole rollout (serve/judge.py;
tests/serve/test_judge.py measures it). A step that runs out of looks rolls back all the same (see 3. above):
that is the price of never promoting on thin evidence, and max_looks and min_samples set it.

The rollout's state lives in the registry (rollout.json, rewritten at every look under the model's lock), so a
restarted command continues at the step and look where the last one stopped, and a second command is refused
while the first is alive (it wrote its state within serve.rollout.lease_s) or while another canary's rollout is
under way.
"""

import logging
import os
import socket
import time
import uuid

import numpy as np

from serve import judge
from serve.endpoint import Endpoint, endpoint_of
from serve.registry import Registry
from serve.replicas import replica_class

logger = logging.getLogger(__name__)

RUNNING, PROMOTED, ROLLED_BACK = "running", "promoted", "rolled_back"
CANARY, PRODUCTION = "canary", "production"
METRICS = ("latency", "errors", "quality")  # each is tested at its share of serve.rollout.alpha


class RolloutError(ValueError):
    """A rollout that cannot start or go on; the message says why and what to do."""


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------------------- the state

def _claim(registry: Registry, model: str, *, canary: int, cfg, owner: str) -> dict:
    """Start the rollout of `canary`, or continue the one the registry holds for it; refuse a second one."""
    def change(current: dict | None) -> dict:
        now = time.time()
        if current is not None and current.get("status") == RUNNING and _abandoned(registry, model, current,
                                                                                   now=now, cfg=cfg):
            logger.warning("the rollout of %s v%d lost its canary alias and its command: it is over",
                           model, current["canary"])
            current = None
        if current is not None and current.get("status") == RUNNING:
            if current["canary"] != canary:
                started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(current.get("started_at", 0)))
                raise RolloutError(f"{model} has a rollout of v{current['canary']} under way (started {started}); "
                                   "one rollout per model: let it end, or end it by hand: stop its command and "
                                   "remove its canary (stage=canary serve.canary_percent=0), and after "
                                   f"serve.rollout.lease_s={cfg.lease_s:g} s a new rollout may start")
            idle = now - current.get("heartbeat_at", 0)
            if idle < cfg.lease_s:
                raise RolloutError(f"the rollout of {model} v{canary} is being run by {current.get('owner')}, "
                                   f"which wrote its state {idle:.0f} s ago; a command may continue it once that one "
                                   f"has been silent for serve.rollout.lease_s={cfg.lease_s:g} s")
            logger.info("continuing the rollout of %s v%d at step %d, look %d", model, canary, current["step"] + 1,
                        current["look"] + 1)
            return {**current, "owner": owner, "heartbeat_at": now}
        return _new_state(registry, model, canary=canary, cfg=cfg, owner=owner, now=now)

    return registry.update_rollout(model, change)


def _abandoned(registry: Registry, model: str, state: dict, *, now: float, cfg) -> bool:
    """A rollout nobody runs (silent past the lease) whose canary alias someone removed or moved: ended by hand."""
    silent = now - state.get("heartbeat_at", 0) >= cfg.lease_s
    return silent and state["window_start"] is not None and registry.resolve(model, CANARY) != state["canary"]


def _new_state(registry: Registry, model: str, *, canary: int, cfg, owner: str, now: float) -> dict:
    production = registry.resolve(model, PRODUCTION)
    if production is None:
        raise RolloutError(f"{model} has no production version to compare a canary with: promote one first")
    registry.version(model, canary)  # a committed version, or an error naming those there are
    if canary == production:
        raise RolloutError(f"serve.canary_version={canary} is already {model}'s production version")
    judged = [step for step in cfg.steps if step < 100]
    return {"model": model, "canary": canary, "production": production, "status": RUNNING,
            "steps": list(cfg.steps), "step": 0, "look": 0, "looks_done": 0,
            "planned_looks": max(1, len(judged) * cfg.max_looks), "window_start": None,
            "started_at": now, "heartbeat_at": now, "owner": owner, "last_look": None}


def _save(registry: Registry, state: dict) -> dict:
    """The state with a fresh heartbeat, written only while this command still owns the rollout."""
    def change(current: dict | None) -> dict:
        if current is None or current.get("owner") != state["owner"] or current.get("status") != RUNNING:
            raise RolloutError(f"the rollout of {state['model']} v{state['canary']} was taken over or ended by "
                               f"another command ({(current or {}).get('owner')}); this one stops")
        return {**state, "heartbeat_at": time.time()}

    return registry.update_rollout(state["model"], change)


# --------------------------------------------------------------------------------------------- judging

def judge_look(samples: dict, *, state: dict, cfg, quality_metric: str, alpha: float) -> list[judge.Verdict]:
    """The canary's verdicts at one look: its arm against production's, over the step's samples."""
    arms = {(arm["version"], arm["arm"]): arm for arm in samples["arms"]}
    empty = {"requests": 0, "errors": 0, "latency_ms": [], "scores": [], "labels": [], "feedback_scores": []}
    canary = arms.get((state["canary"], CANARY), empty)
    production = arms.get((state["production"], PRODUCTION), empty)
    critical = set(cfg.critical)
    verdicts = [
        judge.judge_latency(np.asarray(canary["latency_ms"]), np.asarray(production["latency_ms"]), alpha=alpha,
                            tolerance_ms=cfg.latency_tolerance_ms, tolerance_ratio=cfg.latency_tolerance_ratio,
                            min_samples=cfg.min_samples, critical="latency" in critical),
        judge.judge_errors(canary_errors=canary["errors"], canary_total=canary["requests"],
                           production_errors=production["errors"], production_total=production["requests"],
                           alpha=alpha, tolerance=cfg.error_tolerance, min_samples=cfg.min_samples,
                           critical="errors" in critical)]
    seed = state["looks_done"]
    if quality_metric == "auc":
        verdicts.append(judge.judge_auc(
            np.asarray(canary["scores"]), np.asarray(canary["labels"]), np.asarray(production["scores"]),
            np.asarray(production["labels"]), alpha=alpha, tolerance=cfg.quality_tolerance,
            min_samples=cfg.min_samples, resamples=cfg.resamples, seed=seed, critical="quality" in critical))
    else:
        verdicts.append(judge.judge_mean_score(
            np.asarray(canary["feedback_scores"]), np.asarray(production["feedback_scores"]), alpha=alpha,
            tolerance=cfg.quality_tolerance, min_samples=cfg.min_samples, resamples=cfg.resamples, seed=seed,
            critical="quality" in critical))
    return verdicts


def _evidence(verdicts: list[judge.Verdict], outcome: str, reason: str, *, look: int, alpha: float) -> dict:
    return {"look": look, "alpha": alpha, "outcome": outcome, "reason": reason,
            "metrics": [verdict.to_dict() for verdict in verdicts]}


def _describe(verdicts: list[judge.Verdict]) -> str:
    return "; ".join(f"{verdict.metric} {verdict.outcome}" for verdict in verdicts)


# ---------------------------------------------------------------------------------------------- stepping

class Rollout:
    """One command's run of a rollout: the registry, the endpoint, the config, and the state it advances."""

    def __init__(self, serve_cfg, *, model: str, state: dict, endpoint: Endpoint):
        self.registry, self.cfg, self.serve_cfg = Registry(serve_cfg.registry), serve_cfg.rollout, serve_cfg
        self.model, self.state, self.endpoint = model, state, endpoint
        family = self.registry.version(model, state["canary"])["family"]
        self.quality_metric = replica_class(family).QUALITY_METRIC

    def run(self) -> dict:
        while self.state["status"] == RUNNING:
            percent = self.state["steps"][self.state["step"]]
            if percent >= 100:
                return self._promote()
            self._run_step(percent)
        return self.state

    def _run_step(self, percent: float) -> None:
        steps = self.state["steps"]
        label = f"step {self.state['step'] + 1}/{len(steps)} ({percent:g}%)"
        if self.state["window_start"] is None:
            self._move_canary(percent)
            # The replicas follow the alias within serve.refresh_s and send the canary traffic once it passed its
            # next check (another refresh): the step's samples start after both.
            self._wait(2 * self.serve_cfg.refresh_s + 1)
            self.state = _save(self.registry, {**self.state, "window_start": self.endpoint.now()})
            print(f"{label}: v{self.state['canary']} takes {percent:g}% of the traffic; baking "
                  f"{self.cfg.bake_s:g} s", flush=True)
        self._wait(max(0.0, self.cfg.bake_s - (self.endpoint.now() - self.state["window_start"])))
        while self.state["status"] == RUNNING and self.state["steps"][self.state["step"]] == percent:
            self._look(label)

    def _look(self, label: str) -> None:
        look, done = self.state["look"] + 1, self.state["looks_done"] + 1
        alpha = judge.look_alpha(self.cfg.alpha / len(METRICS), look=min(done, self.state["planned_looks"]),
                                 looks=self.state["planned_looks"])
        samples = self.endpoint.samples(since=self.state["window_start"])
        verdicts = judge_look(samples, state=self.state, cfg=self.cfg, quality_metric=self.quality_metric,
                              alpha=alpha)
        outcome, reason = judge.decide(verdicts, last_look=look >= self.cfg.max_looks)
        evidence = _evidence(verdicts, outcome, reason, look=look, alpha=alpha)
        print(f"{label} look {look}/{self.cfg.max_looks} (alpha {alpha:.2g}): {_describe(verdicts)} -> {outcome}",
              flush=True)
        if outcome == judge.FAIL:
            self._roll_back(reason, evidence)
        elif outcome == judge.PASS:
            self.registry.record(self.model, {"event": "rollout", "decision": "step_passed", "version":
                                              self.state["canary"], "percent": self.state["steps"][self.state["step"]],
                                              "evidence": evidence})
            self.state = _save(self.registry, {**self.state, "step": self.state["step"] + 1, "look": 0,
                                               "looks_done": done, "window_start": None, "last_look": evidence})
        else:
            self.state = _save(self.registry, {**self.state, "look": look, "looks_done": done, "last_look": evidence})
            self._wait(self.cfg.look_interval_s)

    def _move_canary(self, percent: float) -> None:
        aliases = self.registry.aliases(self.model)
        current = aliases.get(CANARY, {})
        if current.get("version") == self.state["canary"] and current.get("percent") == percent:
            return  # a restarted command finds its own move done
        self.registry.move_alias(self.model, CANARY, self.state["canary"], alias_fields={"percent": percent},
                                 reason=f"rollout of v{self.state['canary']}: {percent:g}% of the traffic")

    def _wait(self, seconds: float) -> None:
        """Sleep, writing the heartbeat often enough that no other command takes the rollout over meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, self.cfg.lease_s / 3))
            if end - time.monotonic() > 0:
                self.state = _save(self.registry, self.state)

    def _final(self, status: str, reason: str, evidence: dict | None) -> tuple[dict, dict]:
        """The rollout's final state and the history event that records the decision with its evidence."""
        decision = {"event": "rollout", "decision": status, "version": self.state["canary"],
                    "production": self.state["production"], "percent": self.state["steps"][self.state["step"]],
                    "reason": reason, "evidence": evidence}
        final = {**self.state, "status": status, "reason": reason, "ended_at": time.time(), "last_look": evidence}
        _save(self.registry, self.state)  # still ours: nobody took it over while this look ran
        return final, decision

    def _roll_back(self, reason: str, evidence: dict) -> None:
        final, decision = self._final(ROLLED_BACK, reason, evidence)
        self.registry.move_alias(self.model, CANARY, None, reason=f"rollout of v{self.state['canary']} rolled back: "
                                 f"{reason}", expected=self.state["canary"], preceded_by=decision, rollout=final)
        self.state = final
        print(f"rolled back: {reason}", flush=True)

    def _promote(self) -> dict:
        canary = self.state["canary"]
        reason = f"rollout of v{canary} passed every step"
        final, decision = self._final(PROMOTED, reason, self.state.get("last_look"))
        self.registry.move_alias(self.model, PRODUCTION, canary, reason=reason, expected=self.state["production"],
                                 preceded_by=decision, rollout=final)
        # Production and the canary now name the same version, which routes every request to it; the canary
        # alias goes in a second move (a crash between the two leaves nothing to undo).
        self.registry.move_alias(self.model, CANARY, None, reason=f"v{canary} promoted by its rollout")
        self.state = final
        print(f"promoted: v{canary} is {self.model}'s production version", flush=True)
        return final


def rollout(serve_cfg, *, model: str) -> dict:
    """Run (or continue) the rollout of serve.canary_version to its end; returns its final state."""
    if serve_cfg.canary_version is None:
        raise ValueError("stage=rollout needs serve.canary_version=N: the registered version to roll out")
    registry = Registry(serve_cfg.registry)
    state = _claim(registry, model, canary=serve_cfg.canary_version, cfg=serve_cfg.rollout, owner=_owner())
    endpoint = endpoint_of(serve_cfg)
    print(f"rolling out {model} v{state['canary']} against production v{state['production']} at {endpoint.url}: "
          f"steps {state['steps']}%, now step {state['step'] + 1}", flush=True)
    return Rollout(serve_cfg, model=model, state=state, endpoint=endpoint).run()
