"""Where the seconds before the first step go. The driver (launch.py) and rank 0 each mark milestones as they pass
them; the run directory's startup.jsonl keeps this launch's marks ({"milestone", "at"}: Unix seconds), and
`phases` turns them into the time each phase took, which launch.py logs when a run ends and
scripts/bench_overhead.py prints.

The driver's marks wait in memory until the run directory is ready and are written when training is handed to Ray
(`write_driver_marks`, which starts the file again for this launch); rank 0 appends its own. A sweep's trials and
runs started from Python rather than launch.py (tests) mark nothing unless `begin` was called.
"""

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

STARTUP_FILE = "startup.jsonl"

# (milestone, the phase that ends there), in the order a run passes them.
MILESTONES = (
    ("process_start", None),
    ("composed", "Python, imports, Hydra"),
    ("data_ready", "checks, data, run files"),
    ("ray_ready", "Ray start"),  # not passed by a run without Ray (cluster.launcher=processes)
    ("datasets_ready", "data hand-off"),
    ("worker_process_start", "worker start (Ray: Train controller)"),
    # Ray Train's worker actor start-up, its process group, and the imports of the train function's modules
    ("train_fn_start", "worker set-up, imports, process group"),
    ("worker_loop_start", "config, device, seed"),
    ("model_ready", "model and strategy"),
    ("first_batch", "first batch"),
    ("first_step", "step 1"),
)

OPTIONAL = {"ray_ready"}
_driver_marks: list[dict] | None = None  # None: begin() was not called, nothing is marked


def begin(*, process_start: float) -> None:
    """Start marking this driver's launch (launch.py, once Hydra has composed the config)."""
    global _driver_marks
    _driver_marks = [{"milestone": "process_start", "at": process_start},
                     {"milestone": "composed", "at": time.time()}]


def is_marking() -> bool:
    return _driver_marks is not None


def mark(milestone: str) -> None:
    """A driver milestone, passed now."""
    if _driver_marks is not None:
        _driver_marks.append({"milestone": milestone, "at": time.time()})


def write_driver_marks(run_dir: Path) -> None:
    """The driver's marks so far, as this launch's startup.jsonl (rank 0 appends to it)."""
    if _driver_marks is not None:
        (run_dir / STARTUP_FILE).write_text("".join(json.dumps(item) + "\n" for item in _driver_marks))


def mark_in_worker(run_dir: Path, milestone: str, *, at: float | None = None) -> None:
    """A rank-0 milestone, appended to the run's startup.jsonl."""
    with (run_dir / STARTUP_FILE).open("a") as handle:
        handle.write(json.dumps({"milestone": milestone, "at": time.time() if at is None else at}) + "\n")


def phases(run_dir: Path) -> dict[str, float] | None:
    """{phase: seconds} for this launch, in order, plus "total" (process start to the end of step 1); None
    unless every milestone was marked (but Ray's start, which a run without Ray does not pass)."""
    path = run_dir / STARTUP_FILE
    if not path.exists():
        return None
    marks: dict[str, float] = {}
    for line in path.read_text().splitlines():
        item = json.loads(line)
        marks.setdefault(item["milestone"], item["at"])  # a restarted worker group marks again: the first counts
    if any(name not in marks for name, _ in MILESTONES if name not in OPTIONAL):
        return None
    # A worker process that was there before it was asked for (Ray's warm pool; the launching process itself when
    # it trains in process) starts its phase at the data hand-off.
    marks["worker_process_start"] = max(marks["worker_process_start"], marks["datasets_ready"])
    result, previous = {}, marks["process_start"]
    for name, phase in MILESTONES[1:]:
        if name in marks:
            result[phase] = marks[name] - previous
            previous = marks[name]
    result["total"] = marks["first_step"] - marks["process_start"]
    return result


def describe(run_dir: Path) -> str | None:
    """One line: "12.3 s to step 1: Python, imports, Hydra 2.1, ..."; None without a complete record."""
    found = phases(run_dir)
    if found is None:
        return None
    total = found.pop("total")
    return f"{total:.1f} s to step 1: " + ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in found.items())
