"""A sweep's report, written into its directory: trials.csv (one row per trial), summary.json (the best trial,
its values and its best checkpoint) and trials.png (every trial's metric against step).

It is read back from what is on disk (Tune's experiment state and each trial's run directory), so it is the
same whether the sweep ran in one go or was interrupted and resumed.
"""

import csv
import json
import logging
from pathlib import Path

from trainers import outputs

logger = logging.getLogger(__name__)

# Tune's trial states that mean the trial will not run again in this sweep.
ENDED = ("TERMINATED", "ERROR")


def write_report(sweep_dir: Path, *, metric: str, mode: str, max_steps: int, keys: list[str],
                 wall_s: float) -> dict:
    trials = collect_trials(sweep_dir, metric=metric, mode=mode, max_steps=max_steps, keys=keys)
    summary = summarize(trials, sweep_dir=sweep_dir, metric=metric, mode=mode, keys=keys)
    summary["wall_s"] = wall_s
    _write_csv(sweep_dir / "trials.csv", trials, keys=keys, metric=metric)
    outputs.atomic_write(sweep_dir / "summary.json", json.dumps(summary, indent=2))
    plot_trials(sweep_dir, trials, metric=metric, keys=keys, best=summary["best_trial"])
    logger.info("%s", format_table(trials, keys=keys, metric=metric, mode=mode))
    return summary


def collect_trials(sweep_dir: Path, *, metric: str, mode: str, max_steps: int, keys: list[str]) -> list[dict]:
    """One dict per trial: its values, status, steps, last and best metric, best checkpoint and error."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(sweep_dir))
    trials = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        run_dir = sweep_dir / trial.trial_id
        curve = metric_curve(run_dir, metric)
        steps = outputs.last_logged_step(run_dir)
        values = [value for _, value in curve]
        pick = min if mode == "min" else max
        trials.append({
            "trial_id": trial.trial_id,
            "status": _status(trial.status, steps=steps, max_steps=max_steps),
            **{key: trial.config.get(key) for key in keys},
            "steps": steps,
            metric: values[-1] if values else None,
            f"best_{metric}": pick(values) if values else None,
            "best_checkpoint": best_checkpoint(run_dir, curve, mode=mode),
            "run_dir": str(run_dir),
            "error": _error_line(run_dir) if trial.status == "ERROR" else None,
            "curve": curve,
        })
    return trials


def _status(tune_status: str, *, steps: int, max_steps: int) -> str:
    """finished (ran to max_steps), stopped (by the scheduler), failed, or not yet done (interrupted/pending)."""
    if tune_status == "ERROR":
        return "failed"
    if tune_status == "TERMINATED":
        return "finished" if steps >= max_steps else "stopped"
    return "interrupted" if steps else "pending"


def metric_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every evaluation in the trial's metrics.jsonl, the latest row winning per step."""
    points = {row["step"]: row[metric] for row in outputs.read_metrics(run_dir) if metric in row}
    return sorted(points.items())


def best_checkpoint(run_dir: Path, curve: list[tuple[int, float]], *, mode: str) -> str | None:
    """The kept checkpoint whose evaluation scored best; Ray Train names them checkpoint_step_<step>."""
    scores = dict(curve)
    kept = {int(path.name.rsplit("_", 1)[1]): path for path in run_dir.glob("checkpoint_step_*") if path.is_dir()}
    scored = [(scores[step], step) for step in kept if step in scores]
    if not scored:
        return str(kept[max(kept)]) if kept else None
    pick = min if mode == "min" else max
    return str(kept[pick(scored)[1]])


def _error_line(run_dir: Path) -> str | None:
    """The last line of the traceback Tune saved for a failed trial: the exception and its message."""
    path = run_dir / "error.txt"
    if not path.exists():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else None


def summarize(trials: list[dict], *, sweep_dir: Path, metric: str, mode: str, keys: list[str]) -> dict:
    """The sweep's status and its best trial: the best evaluated value among trials that ran to the end (as a
    plain run ranks its checkpoints), or among all trials when none did."""
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    best = _best_trial(trials, metric=metric, mode=mode)
    if any(trial["status"] in ("interrupted", "pending") for trial in trials):
        status = "interrupted"
    else:
        status = "finished" if best else "failed"
    return {
        "status": status,
        "sweep": sweep_dir.name,
        "metric": metric,
        "mode": mode,
        "trials": len(trials),
        "by_status": counts,
        "best_trial": best["trial_id"] if best else None,
        "best_config": {key: best[key] for key in keys} if best else None,
        f"best_{metric}": best[f"best_{metric}"] if best else None,
        "best_checkpoint": best["best_checkpoint"] if best else None,
        "best_run_dir": best["run_dir"] if best else None,
        "first_error": next((trial["error"] for trial in trials if trial["error"]), None),
    }


def _best_trial(trials: list[dict], *, metric: str, mode: str) -> dict | None:
    scored = [trial for trial in trials if trial[f"best_{metric}"] is not None]
    finished = [trial for trial in scored if trial["status"] == "finished"]
    pool = finished or scored
    if not pool:
        return None
    pick = min if mode == "min" else max
    return pick(pool, key=lambda trial: trial[f"best_{metric}"])


def _write_csv(path: Path, trials: list[dict], *, keys: list[str], metric: str) -> None:
    columns = ["trial_id", "status", *keys, "steps", metric, f"best_{metric}", "best_checkpoint", "run_dir", "error"]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(trials)
    tmp.replace(path)


def headline(summary: dict) -> str:
    """One line for the end of a sweep: trials by status and the best trial with its values."""
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary["by_status"].items()))
    metric = summary["metric"]
    line = f"{summary['trials']} trials ({counts})"
    if summary["best_trial"]:
        values = ", ".join(f"{key}={_short(value)}" for key, value in summary["best_config"].items())
        line += f"; best {summary['best_trial']}: best_{metric} {summary[f'best_{metric}']:.4f} with {values}"
    return line


def format_table(trials: list[dict], *, keys: list[str], metric: str, mode: str) -> str:
    """The trials as a text table, best first; unfinished and failed trials last."""
    best_key = f"best_{metric}"
    sign = 1 if mode == "min" else -1
    ordered = sorted(trials, key=lambda t: (t[best_key] is None, sign * (t[best_key] or 0.0)))
    header = ["trial", "status", *keys, "steps", best_key]
    rows = [[t["trial_id"], t["status"], *(_short(t[key]) for key in keys), str(t["steps"]), _short(t[best_key])]
            for t in ordered]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    return "trials, best first:\n" + "\n".join(lines)


def _short(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_trials(sweep_dir: Path, trials: list[dict], *, metric: str, keys: list[str],
                best: str | None) -> Path | None:
    """trials.png: each trial's metric against step; trials the scheduler stopped are dashed, the best is bold."""
    if not any(trial["curve"] for trial in trials):
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for trial in trials:
        if not trial["curve"]:
            continue
        steps, values = zip(*trial["curve"], strict=True)
        is_best = trial["trial_id"] == best
        style = "--" if trial["status"] == "stopped" else "-"
        drawn = ", ".join(f"{key.rsplit('.', 1)[-1]}={_short(trial[key])}" for key in keys)
        ax.plot(steps, values, style, marker="o", markersize=3, linewidth=2.5 if is_best else 1,
                alpha=1.0 if is_best else 0.6, label=f"{trial['trial_id']} {trial['status']}: {drawn}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{sweep_dir.name}: {metric} per trial (best: {best})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = sweep_dir / "trials.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
