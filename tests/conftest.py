import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from trainers.config import register_configs  # noqa: E402

register_configs()  # as launch.py does before composing


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session, sized for 2 training workers plus Ray Data tasks."""
    import os

    import ray

    from cluster.connection import RAY_TRAIN_ENV_DEFAULTS

    os.environ.update(RAY_TRAIN_ENV_DEFAULTS)  # as launch.py's connect() does
    # Custom metrics reach the Prometheus endpoint in a second rather than ten, so the serving tests can read them.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), **RAY_TRAIN_ENV_DEFAULTS}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Prepared corpora shared by every training test (the first run prepares, later runs reuse)."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def trained_runs(ray_session, data_cache, tmp_path_factory):
    """Finished training runs shared by test modules that only read them (strategy parity, export, serving),
    keyed by name: the first test that asks trains it, the others reuse it."""
    import os

    from tests.helpers import CRASH_AT_STEP, run_ranker, run_training
    from trainers.loop import CRASH_AT_STEP_ENV

    runs: dict[str, Path] = {}

    def get(name: str, overrides: list[str], *, ranker: bool = False) -> Path:
        if name not in runs:
            train = run_ranker if ranker else run_training
            if name in CRASH_AT_STEP:
                os.environ[CRASH_AT_STEP_ENV] = str(CRASH_AT_STEP[name])
            try:
                runs[name] = train(tmp_path_factory.mktemp(name), data_cache, overrides)
            finally:
                os.environ.pop(CRASH_AT_STEP_ENV, None)
        return runs[name]

    return get
