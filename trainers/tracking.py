"""Rank-0 metric sinks: the run's metrics.jsonl (part of the output contract) and optionally W&B."""

import json
import logging
import os
from pathlib import Path

from conf.schema import LoggerConfig, LoggerName

logger = logging.getLogger(__name__)


def _step_of(line: str) -> float:
    """The step of a metrics line; a blank or torn line (a process killed mid-write) sorts past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsFile:
    """Appends one JSON line per logged step to metrics.jsonl.

    On resume, lines past the restored step are dropped first: those steps are about to be trained again,
    and keeping both copies would give plots and readers two values for one step.
    """

    def __init__(self, path: Path, *, resume_step: int):
        self.path = path
        self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")


class WandbSink:
    def __init__(self, cfg: LoggerConfig, *, run_dir: Path, run_name: str, config: dict):
        import wandb

        # Offline by default so a laptop run never blocks on a login; WANDB_MODE or an API key opt in.
        mode = cfg.mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=run_name, id=run_name, resume="allow",
                              dir=str(run_dir), config=config, mode=mode)

    def log(self, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def finish(self) -> None:
        self.run.finish()


class Tracker:
    """Fans rank-0 metrics out to metrics.jsonl and the configured logger."""

    def __init__(self, cfg: LoggerConfig, *, run_dir: Path, run_name: str, config: dict, resume_step: int):
        self.file = MetricsFile(run_dir / "metrics.jsonl", resume_step=resume_step)
        wanted = cfg.name == LoggerName.wandb
        self.wandb = WandbSink(cfg, run_dir=run_dir, run_name=run_name, config=config) if wanted else None

    def log(self, metrics: dict) -> None:
        self.file.log(metrics)
        if self.wandb:
            self.wandb.log(metrics)

    def finish(self) -> None:
        if self.wandb:
            self.wandb.finish()
