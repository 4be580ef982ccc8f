"""The run directory contract (DESIGN.md section 3): name, config.yaml, manifest.json, summary.json, loss.png."""

import hashlib
import json
import logging
import os
import subprocess
from importlib import metadata
from pathlib import Path

from omegaconf import OmegaConf

logger = logging.getLogger(__name__)

# Keys that do not change what a run computes: two commands differing only here are the same run.
HASH_EXCLUDED_KEYS = (
    "logger", "paths", "cluster.address", "cluster.include_dashboard", "cluster.local_num_cpus",
    "cluster.runtime_env_excludes", "cluster.name", "cluster.peak_tflops_per_gpu", "data.in_memory_limit_mb",
    "trainer.log_every_n_steps",
    "checkpoint.keep_top_k", "checkpoint.max_failures",
)


def config_hash(config: dict) -> str:
    """sha256 of the resolved config minus HASH_EXCLUDED_KEYS, as hex."""
    trimmed = json.loads(json.dumps(config))
    for dotted in HASH_EXCLUDED_KEYS:
        *parents, leaf = dotted.split(".")
        node = trimmed
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(trimmed, sort_keys=True).encode()).hexdigest()


def run_name(config: dict, *, experiment: str) -> str:
    return f"{experiment}-{config_hash(config)[:8]}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _git_state(repo: Path) -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _package_versions() -> dict:
    versions = {}
    for package in ("torch", "ray", "deepspeed", "hydra-core", "tokenizers", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def write_run_files(run_dir: Path, *, config: dict, experiment: str, data_fingerprint: str, repo: Path) -> None:
    """config.yaml and manifest.json, written before training starts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    manifest = {
        "run_name": run_dir.name,
        "experiment": experiment,
        "config_hash": config_hash(config),
        "git": _git_state(repo),
        "versions": _package_versions(),
        "data_fingerprint": data_fingerprint,
        "world_size": config["cluster"]["num_workers"],
        "strategy": config["strategy"]["name"],
        "model_family": config["model"]["family"],
    }
    _atomic_write(run_dir / "manifest.json", json.dumps(manifest, indent=2))


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl, skipping a torn last line left by a process killed mid-write."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def last_logged_step(run_dir: Path) -> int:
    rows = read_metrics(run_dir)
    return max((row.get("step", 0) for row in rows), default=0)


def write_summary(run_dir: Path, *, status: str, best_checkpoint: str | None, latest_checkpoint: str | None,
                  metric: str, error: str | None = None) -> dict:
    rows = read_metrics(run_dir)
    final = {}
    for row in rows:  # the latest value of each metric
        final.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
    evaluated = [row[metric] for row in rows if metric in row]
    summary = {
        "status": status,
        "final_metrics": final,
        f"best_{metric}": min(evaluated) if evaluated else None,
        "best_checkpoint": best_checkpoint,
        "latest_checkpoint": latest_checkpoint,
        "steps": final.get("step", 0),
        "error": error,
    }
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def read_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: training and validation loss against step."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
