"""The run directory contract (DESIGN.md section 3): name, config.yaml, manifest.json, summary.json, loss.png."""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from omegaconf import OmegaConf

logger = logging.getLogger(__name__)

# Keys that do not change what a run computes: two commands differing only here are the same run.
HASH_EXCLUDED_KEYS = (
    "logger", "paths", "cluster.address", "cluster.include_dashboard", "cluster.local_num_cpus",
    "cluster.runtime_env_excludes", "cluster.name", "cluster.peak_tflops_per_gpu", "data.in_memory_limit_mb",
    # how the cluster is described and sized up (plan=true, manifests) does not change what training computes
    "cluster.autoscaling", "cluster.scale_up_timeout_s", "cluster.max_nodes", "cluster.placement_strategy",
    "cluster.node", "cluster.assumed_mfu", "cluster.image",
    "trainer.log_every_n_steps",
    "checkpoint.keep_top_k", "checkpoint.max_failures", "checkpoint.resume",
    "sweep",  # a run is one training run; the sweep that drew it has its own name (trainers/sweep.py)
    "serve", "stages", "stage",  # what happens after training does not change what training computes
    "plan", "submit",  # a plan starts nothing; a submitted command is the same run, started on the cluster
)


def config_hash(config: dict, *, excluded: tuple[str, ...] = HASH_EXCLUDED_KEYS) -> str:
    """sha256 of the resolved config minus the `excluded` dotted keys, as hex. A teacher (model.teacher) and how it
    teaches (distill) change what a run computes and are hashed; without a teacher, the distill block is read by
    nothing and both are left out, so that runs keep the names they had before distillation existed. The
    default launcher is left out likewise."""
    trimmed = json.loads(json.dumps(config))
    if (trimmed.get("model") or {}).get("teacher") is None:
        trimmed.get("model", {}).pop("teacher", None)
        trimmed.pop("distill", None)
    # A run under Ray Train keeps the name it had before there was another launcher. A run without Ray gets a
    # name of its own: it computes the same, but Ray Train's resume state would not know its checkpoints.
    if (trimmed.get("cluster") or {}).get("launcher") == "ray":
        trimmed["cluster"].pop("launcher")
    for dotted in excluded:
        *parents, leaf = dotted.split(".")
        node = trimmed
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(trimmed, sort_keys=True).encode()).hexdigest()


def run_name(config: dict, *, experiment: str) -> str:
    return f"{experiment}-{config_hash(config)[:8]}"


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` whole (a crash leaves the old file or the new one); a full disk or a read-only
    directory is an error naming the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write {path}: {error.strerror or error} (paths.root)") from error


def check_writable(directory: Path, *, key: str) -> None:
    """`directory` exists (or can be made) and takes a file: checked before anything is prepared or started, so
    an unwritable or full `key` is an error naming it, not a traceback minutes later."""
    probe = Path(directory) / f".write-probe-{os.getpid()}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as file:
            file.write(b"\0" * 4096)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise ValueError(f"{key}={directory} is not writable: {error.strerror or error}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


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


def write_run_files(run_dir: Path, *, config: dict, experiment: str, data_identity: dict, repo: Path,
                    teacher: dict | None = None) -> None:
    """config.yaml and manifest.json, written before training starts. The manifest describes this launch at
    its top level and keeps every launch of the run directory, oldest first, under "launches". A distilled run's
    `teacher` (its reference, the registry model and version it resolved to, its directory) is recorded too."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    git = _git_state(repo)
    launch = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "host": socket.gethostname(),
              "pid": os.getpid(), "commit": git["commit"], "dirty": git["dirty"], **data_identity}
    manifest = {
        "run_name": run_dir.name,
        "experiment": experiment,
        "config_hash": config_hash(config),
        "git": git,
        "versions": _package_versions(),
        "data_fingerprint": data_identity["data_fingerprint"],
        "data_files": data_identity["data_files"],
        "world_size": config["cluster"]["num_workers"],
        "strategy": config["strategy"]["name"],
        "model_family": config["model"]["family"],
        **({"teacher": teacher} if teacher else {}),
        "launches": [*_previous_launches(run_dir), launch],
    }
    atomic_write(run_dir / "manifest.json", json.dumps(manifest, indent=2))


def _read_manifest(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except (FileNotFoundError, ValueError):  # none yet, or a crash cut it: the launch history starts again
        return None


def _previous_launches(run_dir: Path) -> list[dict]:
    manifest = _read_manifest(run_dir)
    if manifest is None:
        return []
    if "launches" in manifest:
        return manifest["launches"]
    # A manifest from before launches were kept describes its one launch at the top level.
    return [{"commit": manifest.get("git", {}).get("commit"), "dirty": manifest.get("git", {}).get("dirty"),
             "data_fingerprint": manifest.get("data_fingerprint"), "data_files": {}}]


# ------------------------------------------------------------------------------------ what a run trained on

def data_identity(fingerprint: str, files: dict[str, str]) -> dict:
    """What a run's checkpoints depend on besides the config: the prepared data's content fingerprint, and the
    sha256 of each side file the checkpoints carry (name -> source path; the tokenizer, the feature spec)."""
    return {"data_fingerprint": fingerprint, "data_files": {name: _file_sha256(Path(source))
                                                            for name, source in sorted(files.items())}}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_training_state(run_dir: Path) -> bool:
    """Whether a rerun in `run_dir` would resume (or stop as finished) instead of starting at step 0."""
    return (run_dir / "summary.json").exists() or any(run_dir.glob("checkpoint_step_*"))


def identity_changes(run_dir: Path, identity: dict) -> list[str]:
    """What differs between the data the run directory's last launch trained on and `identity`, in words."""
    launches = _previous_launches(run_dir)
    if not launches:
        return []
    before, changes = launches[-1], []
    if before.get("data_fingerprint") and before["data_fingerprint"] != identity["data_fingerprint"]:
        changes.append(f"the prepared data (fingerprint {before['data_fingerprint'][:12]} -> "
                       f"{identity['data_fingerprint'][:12]})")
    for name, digest in identity["data_files"].items():
        old = before.get("data_files", {}).get(name)
        if old and old != digest:
            changes.append(f"{name} (sha256 {old[:12]} -> {digest[:12]})")
    # A teacher named by an alias resolves to whatever version the alias holds at each launch.
    if before.get("teacher") and before["teacher"] != identity.get("teacher"):
        changes.append(f"the teacher ({before['teacher']} -> {identity.get('teacher')})")
    return changes


def set_aside(run_dir: Path) -> Path:
    """Move a run directory out of the way (nothing is deleted); returns where it went."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    os.replace(run_dir, target)
    return target


# ------------------------------------------------------------------------------------------- one launch only

@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for one launch. An flock is released by the kernel when its holder dies (also
    over NFS, where Linux maps it to a POSIX lock), so a crashed launch never leaves a stale lock behind; the
    file only says who holds it. A second launch of the same run is refused, naming the first."""
    # Beside the run directory, not in it: `checkpoint.resume=fresh` moves the directory aside while locked.
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir.parent / f".{run_dir.name}.lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a launch that has not yet written its host and pid"
            raise ValueError(f"{run_dir} is in use by another launch of the same run ({holder}); wait for it "
                             "to end, or change the config to start a different run") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, since "
                     f"{datetime.now(UTC).isoformat(timespec='seconds')}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the flock


# A sweep asks a trial's workers to end early by writing this file into the trial's run directory; rank 0
# looks for it at log steps and the workers stop together (trainers/loop.py). Ending the run from inside lets
# Ray Train release its placement group, which killing the trial's driver would leave behind.
STOP_FILE = "stop_requested"
# Ray placement groups the run's workers ran in, one id per worker-group start: what a sweep releases if a
# trial's Train run was killed before it could.
PLACEMENT_GROUPS_FILE = "placement_groups.txt"


def request_stop(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOP_FILE).write_text("stop requested by the sweep's scheduler\n")


def clear_stop_request(run_dir: Path) -> None:
    (run_dir / STOP_FILE).unlink(missing_ok=True)


def stop_requested(run_dir: Path) -> bool:
    return (run_dir / STOP_FILE).exists()


def record_placement_group(run_dir: Path) -> None:
    """Append the calling worker's placement group id to the run's PLACEMENT_GROUPS_FILE."""
    from ray.util.placement_group import get_current_placement_group

    group = get_current_placement_group()
    if group is not None:
        with (run_dir / PLACEMENT_GROUPS_FILE).open("a") as handle:
            handle.write(group.id.hex() + "\n")


def recorded_placement_groups(run_dir: Path) -> list[str]:
    path = run_dir / PLACEMENT_GROUPS_FILE
    return path.read_text().split() if path.exists() else []


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
                  metric: str, mode: str = "min", summary_keys: tuple[str, ...] = (), error: str | None = None) -> dict:
    """summary.json: status, the latest value of every metric, the best value of the ranking metric, and
    the family's headline metrics (a ranker's auc, logloss, bayes_auc...) from the last evaluation."""
    rows = read_metrics(run_dir)
    final = {}
    for row in rows:  # the latest value of each metric
        final.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
    evaluated = [row[metric] for row in rows if metric in row]
    best = min if mode == "min" else max
    summary = {
        "status": status,
        **{key: final[key] for key in summary_keys if key in final},
        "final_metrics": final,
        f"best_{metric}": best(evaluated) if evaluated else None,
        "best_checkpoint": best_checkpoint,
        "latest_checkpoint": latest_checkpoint,
        "steps": final.get("step", 0),
        "error": error,
    }
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def headline(summary: dict, *, keys: tuple[str, ...] = ()) -> str:
    """One line for the end of a run: steps, final train loss, and the family's headline metrics (`keys`)."""
    final = summary["final_metrics"]
    parts = [f"{summary['steps']} steps", f"train_loss {final.get('train_loss', float('nan')):.4f}"]
    parts += [f"{key} {value:.4f}" for key, value in summary.items()
              if key.startswith("best_") and isinstance(value, float)]
    for key in keys:
        if key in summary:
            parts.append(f"{key} {summary[key]:.4f}")
    return ", ".join(parts)


def read_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: training and validation loss against step; for rankers a second panel shows validation AUC
    against the Bayes-optimal AUC where the data knows it."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    has_auc = any("auc" in row for row in rows)
    fig, axes = plt.subplots(1, 2 if has_auc else 1, figsize=(12 if has_auc else 7, 4), squeeze=False)
    _plot_series(axes[0][0], rows, (("train_loss", "-"), ("val_loss", "o-")), ylabel="loss")
    if has_auc:
        _plot_series(axes[0][1], rows, (("auc", "o-"), ("bayes_auc", "--")), ylabel="validation AUC")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_series(ax, rows: list[dict], series: tuple[tuple[str, str], ...], *, ylabel: str) -> None:
    for key, style in series:
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            label = "Bayes-optimal" if key == "bayes_auc" else key
            ax.plot(*zip(*points, strict=True), style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
