"""Promotion: a finished run or sweep -> its best checkpoint -> export -> eval gate -> registry version ->
`production` alias; and the alias moves that undo or share it (rollback, canary).

Every candidate that is exported becomes an immutable registry version (the same weights twice are one
version, also when two promoters race), so a challenger the gate refused can still be canaried or promoted later
with `serve.force=true`. The gate's decision, with both numbers, goes into the model's history whatever it was.
Deciding and moving production is one step (see `promote_version`), and a non-finite score never passes the gate.
The gate compares the family's metric on the held-out split, or with serve.gate_metric an lm-evaluation-harness
score of a local task (serve/harness.py), computed in this process for both versions.
"""

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from conf.derived import TaskMetric, gate_metric_mode, parse_gate_metric
from conf.schema import RootConfig
from serve.evaluate import evaluate_on_run_data, profile_on_run_data
from serve.export import export_checkpoint, load_export, read_model_config, weights_identity_file
from serve.monitoring import PROFILE_FILE
from serve.registry import AliasMoved, Registry
from trainers import outputs
from trainers.config import config_from_dict
from trainers.families import Family, get_family

logger = logging.getLogger(__name__)

PRODUCTION, CANARY, SHADOW = "production", "canary", "shadow"
# How often a promoter gates again when another one moved production while it was scoring.
GATE_ATTEMPTS = 5


@dataclass
class Candidate:
    checkpoint: Path
    run_dir: Path
    run_cfg: RootConfig
    step: int
    trained_metrics: dict  # what training logged at the checkpoint's evaluation
    data_fingerprint: str | None = None  # the prepared data the run trained on (manifest.json), when recorded


# ------------------------------------------------------------------------------------- finding the best

def best_candidate(source: Path) -> Candidate:
    """The best checkpoint of a run directory, or of a sweep directory's best trial."""
    source = Path(source).expanduser().resolve()
    summary = outputs.read_summary(source)
    if summary is None:
        raise FileNotFoundError(f"serve.source={source} has no summary.json: expected a run_dir or sweep_dir "
                                f"that launch.py printed")
    run_dir = Path(summary["best_run_dir"]) if "best_run_dir" in summary else source
    checkpoint = summary.get("best_checkpoint")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise ValueError(f"serve.source={source} has no best checkpoint (status {summary.get('status')!r}, "
                         f"best_checkpoint {checkpoint!r}): train it to its first evaluation first")
    checkpoint = Path(checkpoint)
    step = json.loads((checkpoint / "train_state.json").read_text())["step"]
    run_cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    metric = get_family(run_cfg.model.family).metric
    logged = [row for row in outputs.read_metrics(run_dir) if row.get("step") == step and metric in row]
    manifest = run_dir / "manifest.json"
    fingerprint = json.loads(manifest.read_text()).get("data_fingerprint") if manifest.exists() else None
    return Candidate(checkpoint=checkpoint, run_dir=run_dir, run_cfg=run_cfg, step=step,
                     trained_metrics=logged[-1] if logged else {}, data_fingerprint=fingerprint)


def _version_metadata(candidate: Candidate, *, experiment: str) -> dict:
    manifest_path = candidate.run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return {"experiment": experiment, "source_run": str(candidate.run_dir), "checkpoint": str(candidate.checkpoint),
            "step": candidate.step, "family": candidate.run_cfg.model.family,
            "strategy": candidate.run_cfg.strategy.name, "config_hash": manifest.get("config_hash"),
            "data_fingerprint": manifest.get("data_fingerprint"), "trained_metrics": candidate.trained_metrics}


# --------------------------------------------------------------------------------------------- the gate

@dataclass
class GateDecision:
    promote: bool
    reason: str
    metric: str
    challenger_value: float
    production_value: float | None
    mode: str | None = None  # "min" or "max": which way is better
    evaluation: dict | None = None  # how an lm-eval score was measured: task directory, documents, stderrs

    def to_event(self, *, challenger: int, production: int | None, min_improvement: float, forced: bool) -> dict:
        event = {"event": "gate", "challenger": challenger, "production": production, "metric": self.metric,
                 "mode": self.mode, "challenger_value": _json_number(self.challenger_value),
                 "production_value": _json_number(self.production_value),
                 "min_improvement": min_improvement, "decision": "promoted" if self.promote or forced else "refused",
                 "forced": forced and not self.promote, "reason": self.reason}
        return event | ({"evaluation": self.evaluation} if self.evaluation else {})


def _json_number(value: float | None) -> float | str | None:
    # NaN and infinity are not JSON; as text ("nan", "inf") every reader of the history can still load them.
    return value if value is None or math.isfinite(value) else str(value)


def decide(*, metric: str, mode: str, challenger: float, production: float | None,
           min_improvement: float) -> GateDecision:
    """Promote when there is no production yet, or when the challenger is better by more than the margin.

    A non-finite score is never compared. A challenger scoring NaN or an infinity (a diverged model, a broken
    evaluation) is refused, also when there is no production yet. A non-finite production score is refused too,
    whatever its direction: "beats NaN" is undefined, and even a loss of +inf in production usually means the
    evaluation broke rather than the model, so a person checks and promotes with serve.force=true.
    """
    if not math.isfinite(challenger):
        return GateDecision(False, f"challenger {metric} is {challenger}: a non-finite score never passes the gate "
                                   "(the model diverged or its evaluation broke)", metric, challenger, production,
                            mode)
    if production is None:
        return GateDecision(True, "no production version yet", metric, challenger, None, mode)
    if not math.isfinite(production):
        return GateDecision(False, f"production {metric} is {production} on this split, so no challenger can be "
                                   "compared with it; check both models and promote with serve.force=true if this "
                                   "challenger should replace it", metric, challenger, production, mode)
    gain = (production - challenger) if mode == "min" else (challenger - production)
    better = gain > min_improvement
    verdict = "beats" if better else "does not beat"
    reason = (f"challenger {metric} {challenger:.5f} {verdict} production {production:.5f} by more than "
              f"{min_improvement:g} ({'lower' if mode == 'min' else 'higher'} is better; gain {gain:+.5f})")
    return GateDecision(better, reason, metric, challenger, production, mode)


def _assets_match(registry: Registry, model: str, a: int, b: int, *, family: Family) -> bool:
    """Scores are comparable only if both models read the held-out rows the same way (tokenizer, features)."""
    files_a, files_b = registry.version(model, a)["files"], registry.version(model, b)["files"]
    shared = [name for name in files_a if name in files_b and name.split(".")[0] in family.asset_keys]
    return bool(shared) and all(files_a[n]["sha256"] == files_b[n]["sha256"] for n in shared)


@dataclass(frozen=True)
class Measure:
    """What the gate compares: the family's metric on the run's held-out split, or (serve.gate_metric) an
    lm-eval score of a local task; `mode` says which way is better."""

    metric: str
    mode: str
    task_metric: TaskMetric | None = None  # for an lm-eval score

    @classmethod
    def of(cls, serve_cfg, family: Family) -> "Measure":
        mode = gate_metric_mode(serve_cfg, family=family.name)  # the run's family, whatever this command composed
        if mode is None:
            return cls(family.metric, family.metric_mode)
        return cls(serve_cfg.gate_metric, mode, parse_gate_metric(serve_cfg.gate_metric))


def _score(registry: Registry, model: str, version: int, candidate: Candidate, *, measure: Measure, serve_cfg,
           cache_dir: Path, scores: dict[int, tuple[float, dict | None]]) -> tuple[float, dict | None]:
    """(score, how an lm-eval score was measured) of `version`. Versions are immutable, so a version scored once
    keeps its score for a later attempt."""
    if version not in scores:
        directory = registry.fetch(model, version, cache_dir=cache_dir)
        if measure.task_metric is not None:
            from serve.harness import score_export

            scores[version] = score_export(directory, measure.task_metric, version=version,
                                           include_path=serve_cfg.gate_tasks, limit=serve_cfg.eval_rows or None)
        else:
            metrics = evaluate_on_run_data(load_export(directory), candidate.run_cfg, rows=serve_cfg.eval_rows,
                                           trained_on=candidate.data_fingerprint)
            scores[version] = (metrics[measure.metric], None)
    return scores[version]


# ---------------------------------------------------------------------------------------------- promote

def promote(serve_cfg, *, model: str, source: Path, experiment: str, cache_dir: Path) -> dict:
    """Export `source`'s best checkpoint, register it, gate it against production and move the alias if it
    passes (or serve.force). Returns the gate's history event."""
    registry = Registry(serve_cfg.registry)
    candidate = best_candidate(source)
    logger.info("promoting %s step %d from %s", candidate.checkpoint.name, candidate.step, candidate.run_dir)
    version = _register(registry, model, candidate, experiment=experiment, serve_cfg=serve_cfg)
    return promote_version(registry, model, version, candidate, serve_cfg=serve_cfg, cache_dir=cache_dir)


def promote_version(registry: Registry, model: str, version: int, candidate: Candidate, *, serve_cfg,
                    cache_dir: Path) -> dict:
    """Gate registered `version` against production and make it production if it passes (or serve.force).

    Deciding and moving are one step: the move is a compare-and-set on the production the gate compared against,
    and the decision is recorded with it under the registry's lock. A promoter that finds production moved while
    it was scoring (another promoter won) is gated again against the new production, up to GATE_ATTEMPTS times;
    scoring stays outside the lock, which the compare-and-set makes safe. So of two promoters that both beat
    production, production ends on the better one. Returns the gate's history event.
    """
    scores: dict[int, tuple[float, dict | None]] = {}
    measure = Measure.of(serve_cfg, get_family(candidate.run_cfg.model.family))
    for _ in range(GATE_ATTEMPTS):
        production = registry.resolve(model, PRODUCTION)
        if production == version:
            logger.info("%s v%d is already production; nothing to do", model, version)
            return {"event": "gate", "challenger": version, "production": production, "decision": "unchanged"}
        decision = _gate(registry, model, version, production, candidate, measure=measure, serve_cfg=serve_cfg,
                         cache_dir=cache_dir, scores=scores)
        logger.info("eval gate: %s", decision.reason)
        event = decision.to_event(challenger=version, production=production,
                                  min_improvement=serve_cfg.min_improvement, forced=serve_cfg.force)
        if not (decision.promote or serve_cfg.force):
            logger.warning("%s v%d not promoted; production stays v%s (serve.force=true overrides the gate)", model,
                           version, production)
            return registry.record(model, event)
        try:
            return _move_production(registry, model, version, candidate, decision, event, serve_cfg=serve_cfg)
        except AliasMoved as moved:
            logger.warning("%s production moved from v%s to v%s while v%d was gated; gating again against v%s",
                           model, moved.expected, moved.current, version, moved.current)
    raise ValueError(f"{model} production moved {GATE_ATTEMPTS} times while v{version} was being gated (now "
                     f"v{registry.resolve(model, PRODUCTION)}): other promoters are busy; rerun this stage=promote")


def _move_production(registry: Registry, model: str, version: int, candidate: Candidate, decision: GateDecision,
                     event: dict, *, serve_cfg) -> dict:
    reason = serve_cfg.reason or f"promoted from {candidate.run_dir.name} step {candidate.step}: {decision.reason}"
    moved = registry.move_alias(model, PRODUCTION, version, reason=reason, expected=event["production"],
                                details={"forced": serve_cfg.force and not decision.promote}, preceded_by=event)
    logger.info("%s production -> v%d%s", model, version, " (forced)" if not decision.promote else "")
    return {"at": moved["at"], **event, "lock_token": moved["lock_token"], "seq": moved["preceded_by"]}


def _register(registry: Registry, model: str, candidate: Candidate, *, experiment: str, serve_cfg) -> int:
    with tempfile.TemporaryDirectory(prefix="slipway-export-") as tmp:
        export_dir = export_checkpoint(candidate.checkpoint, Path(tmp) / "export",
                                       info={"step": candidate.step, "source_run": str(candidate.run_dir)},
                                       dtype=export_dtype(serve_cfg, run_cfg=candidate.run_cfg),
                                       shard_bytes=int(serve_cfg.export_shard_gb * 10**9))
        _write_reference_profile(export_dir, candidate, rows=serve_cfg.monitor.profile_rows)
        # The same weights twice are one version, checked again under the registry's lock at commit.
        record = registry.register(model, export_dir, metadata=_version_metadata(candidate, experiment=experiment),
                                   dedupe_file=weights_identity_file(read_model_config(export_dir)))
    return record["version"]


def _write_reference_profile(export_dir: Path, candidate: Candidate, *, rows: int) -> None:
    """The version's reference profile beside its weights (serve/monitoring.py), from the run's held-out split as
    the exported weights score it: what its replicas compare their live traffic with."""
    profile = profile_on_run_data(export_dir, candidate.run_cfg, rows=rows, trained_on=candidate.data_fingerprint)
    (export_dir / PROFILE_FILE).write_text(json.dumps(profile.to_dict()) + "\n")
    logger.info("reference profile from the held-out split: %s", ", ".join(profile.features))


def export_dtype(serve_cfg, *, run_cfg: RootConfig):
    """serve.export_dtype; auto is bf16 for a model trained on GPUs (it trained in bf16: fp32 would double the
    download for no accuracy) and fp32 otherwise (a CPU run trained in fp32, and fp32 loads everywhere)."""
    import torch

    name = serve_cfg.export_dtype
    if name == "auto":
        name = "bf16" if run_cfg.cluster.use_gpu else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _gate(registry: Registry, model: str, version: int, production: int | None, candidate: Candidate, *,
          measure: Measure, serve_cfg, cache_dir: Path, scores: dict) -> GateDecision:
    family = get_family(candidate.run_cfg.model.family)
    score = dict(measure=measure, serve_cfg=serve_cfg, cache_dir=cache_dir, scores=scores)
    challenger_value, challenger_eval = _score(registry, model, version, candidate, **score)
    metric, mode, margin = measure.metric, measure.mode, serve_cfg.min_improvement
    if production is None:
        decision = decide(metric=metric, mode=mode, challenger=challenger_value, production=None,
                          min_improvement=margin)
        return _with_evaluation(decision, challenger_eval, None)
    # An lm-eval task is text, which each version tokenizes its own way: its scores compare across tokenizers.
    if measure.task_metric is None and not _assets_match(registry, model, version, production, family=family):
        return GateDecision(False, f"production v{production} reads data differently (another tokenizer or "
                                   f"feature spec), so its {metric} on this held-out split is not comparable",
                            metric, challenger_value, None, mode)
    production_value, production_eval = _score(registry, model, production, candidate, **score)
    decision = decide(metric=metric, mode=mode, challenger=challenger_value, production=production_value,
                      min_improvement=margin)
    return _with_evaluation(decision, challenger_eval, production_eval)


def _with_evaluation(decision: GateDecision, challenger: dict | None, production: dict | None) -> GateDecision:
    """The decision with how an lm-eval score was measured (both versions on the same documents of the task)."""
    if challenger is None:
        return decision
    decision.evaluation = {"tasks": challenger["tasks"], "documents": challenger["documents"],
                           "challenger_stderr": challenger["stderr"],
                           "production_stderr": production["stderr"] if production else None}
    return decision


# ------------------------------------------------------------------------------------------- copying out

def copy_version_out(serve_cfg, *, model: str, cache_dir: Path) -> Path:
    """stage=export: a registered version's files (serve.version, or production's), each verified against its
    recorded sha256, copied into serve.export_dir, which must be new or empty. For an LLM the result is a
    Hugging Face model directory (transformers' from_pretrained, `vllm serve DIR`)."""
    import shutil

    if not serve_cfg.export_dir:
        raise ValueError("stage=export needs serve.export_dir=DIR (a new or empty directory to copy the version into)")
    out_dir = Path(serve_cfg.export_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"serve.export_dir={out_dir} exists and is not an empty directory; nothing was written")
    registry = Registry(serve_cfg.registry)
    version = serve_cfg.version or registry.resolve(model, PRODUCTION)
    if version is None:
        raise ValueError(f"{model} has no production version: name one with serve.version=N "
                         f"(registered: {[record['version'] for record in registry.versions(model)]})")
    source = registry.fetch(model, version, cache_dir=cache_dir)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    staging.rename(out_dir)  # all files or none: an interrupted copy never looks like a model directory
    logger.info("copied %s v%d to %s", model, version, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------- rollback, canary

def production_stack(registry: Registry, model: str) -> list[int]:
    """The versions production held, oldest first, as rollback walks them back.

    Replayed from the history's production moves: a promotion (or any move that is not a rollback, e.g. an
    explicit serve.to_version) pushes its version, a rollback (marked {"rollback": true}) pops, and removing
    production empties the stack. So repeated rollbacks go v3 -> v2 -> v1 and never return to a version that a
    rollback left. A history written before rollbacks were marked reads its rollbacks as pushes.
    """
    stack: list[int] = []
    for event in registry.history(model):
        if event.get("event") != "alias" or event.get("alias") != PRODUCTION:
            continue
        target = event.get("to")
        if target is None:
            stack = []
            continue
        if event.get("rollback") and stack:
            stack.pop()
        if not stack or stack[-1] != target:  # also mends a history that disagrees (e.g. a skipped torn event)
            stack.append(target)
    return stack


def previous_production(registry: Registry, model: str) -> int | None:
    """The version a rollback returns production to: the one below the current version on production's stack."""
    current, stack = registry.resolve(model, PRODUCTION), production_stack(registry, model)
    if not stack or stack[-1] != current:
        logger.warning("%s history does not end on production v%s; name the version with serve.to_version=N",
                       model, current)
        return None
    return stack[-2] if len(stack) > 1 else None


def rollback(serve_cfg, *, model: str) -> dict:
    """Move production to serve.to_version (a push on its stack), or back to the version it held before (a pop).

    The move expects production where it was read: if another writer moved it meanwhile, nothing changes and the
    error names the new production."""
    registry = Registry(serve_cfg.registry)
    current = registry.resolve(model, PRODUCTION)
    if current is None:
        raise ValueError(f"{model} has no production version to roll back; promote one first (stage=promote)")
    explicit = serve_cfg.to_version is not None
    target = serve_cfg.to_version if explicit else previous_production(registry, model)
    if target is None:
        raise ValueError(f"{model} production v{current} has no earlier version to return to; name one with "
                         f"serve.to_version=N (stage=registry lists them)")
    reason = serve_cfg.reason or f"rollback from v{current}"
    event = registry.move_alias(model, PRODUCTION, target, reason=reason, expected=current,
                                details=None if explicit else {"rollback": True})
    logger.info("%s production: v%d -> v%d (%s)", model, current, target, reason)
    return event


def set_canary(serve_cfg, *, model: str) -> dict | None:
    """serve.canary_version + serve.canary_percent -> the canary alias; percent 0 removes the canary."""
    return _set_share(serve_cfg, model=model, alias=CANARY, version=serve_cfg.canary_version,
                      percent=serve_cfg.canary_percent)


def set_shadow(serve_cfg, *, model: str) -> dict | None:
    """serve.shadow_version + serve.shadow_percent -> the shadow alias (a share of requests mirrored to it, whose
    answers no client sees); percent 0 removes the shadow."""
    return _set_share(serve_cfg, model=model, alias=SHADOW, version=serve_cfg.shadow_version,
                      percent=serve_cfg.shadow_percent)


def _set_share(serve_cfg, *, model: str, alias: str, version: int | None, percent: float) -> dict | None:
    if not 0 <= percent <= 100:
        raise ValueError(f"serve.{alias}_percent must be between 0 and 100, got {percent}")
    registry = Registry(serve_cfg.registry)
    if percent == 0:
        if registry.resolve(model, alias) is None:
            return None
        return registry.move_alias(model, alias, None, reason=serve_cfg.reason or f"{alias} removed")
    if version is None:
        raise ValueError(f"serve.{alias}_percent needs serve.{alias}_version=N (a registered version)")
    reason = serve_cfg.reason or f"{alias} v{version} at {percent:g}%"
    return registry.move_alias(model, alias, version, reason=reason, alias_fields={"percent": percent})


# ------------------------------------------------------------------------------------------------ listing

def format_registry(registry: Registry, model: str) -> str:
    """Versions (with their aliases and metrics), then the alias history, as text for the terminal."""
    versions = registry.versions(model)
    if not versions:
        known = ", ".join(registry.models()) or "none"
        raise ValueError(f"serve.model={model} has no versions in {registry.uri} (models there: {known})")
    aliases = registry.aliases(model)
    held = {}
    for alias, record in aliases.items():
        held.setdefault(record["version"], []).append(alias + (f" {record['percent']:g}%" if "percent" in record
                                                               else ""))
    lines = [f"{model} in {registry.uri}", "version  created              step  metrics                      "
             "aliases            source"]
    for record in _lineage_order(versions):
        # A child shows what stage=optimize measured for it, a trained version what training logged.
        measured = record.get("measured_metrics") or record.get("trained_metrics", {})
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in measured.items()
                            if k in ("val_loss", "auc", "logloss") and isinstance(v, float))
        lines.append(f"{_version_label(record):<8} {record['created_at'][:19]:<20} {record.get('step', ''):>5}  "
                     f"{metrics:<28} {', '.join(held.get(record['version'], [])):<18} "
                     f"{_lineage(record)}")
    lines.append("history:")
    for event in registry.history(model):
        lines.append("  " + _format_event(event))
    return "\n".join(lines)


def _lineage(record: dict) -> str:
    derived = record.get("derived")
    if derived:
        return f"{derived['method']} of v{derived['parent']}"
    return Path(record.get("source_run", "")).name


def _lineage_order(versions: list[dict]) -> list[dict]:
    """Trained versions in order, each followed by its children (and theirs): the lineage as a tree."""
    children: dict[int | None, list[dict]] = {}
    numbers = {record["version"] for record in versions}
    for record in versions:
        parent = (record.get("derived") or {}).get("parent")
        children.setdefault(parent if parent in numbers else None, []).append(record)
    ordered: list[dict] = []

    def visit(parent: int | None, depth: int) -> None:
        for record in children.get(parent, []):
            ordered.append({**record, "_depth": depth})
            visit(record["version"], depth + 1)
    visit(None, 0)
    return ordered


def _version_label(record: dict) -> str:
    """v3 for a trained version; a child indented under its parent, as a tree: '└ v5'."""
    depth = record.get("_depth", 0)
    return f"{'  ' * (depth - 1)}└ v{record['version']}" if depth else f"v{record['version']}"


def _format_event(event: dict) -> str:
    when = event.get("at", "")[:19]
    if event.get("event") == "optimize":
        child = f" -> v{event['version']}" if event.get("version") else ""
        loss = event.get("quality_loss")
        loss = f"{loss:+.2%}" if isinstance(loss, float) else loss
        return (f"{when} optimize v{event['parent']} {event['method']}{child}: {event['decision']} "
                f"({event['metric']} {loss})")
    if event.get("event") == "alias":
        before = f"v{event['from']}" if event.get("from") else "-"
        after = f"v{event['to']}" if event.get("to") else "-"
        return f"{when} {event['alias']}: {before} -> {after} ({event.get('reason', '')})"
    if event.get("event") == "gate":
        return f"{when} gate v{event['challenger']}: {event['decision']}: {event.get('reason', '')}"
    return f"{when} {event.get('event')} v{event.get('version', '?')}"
