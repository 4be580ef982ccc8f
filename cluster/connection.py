"""Connecting the driver to Ray: an embedded local instance, or an existing cluster by address.

An existing cluster gets the repo shipped as the job's `runtime_env.working_dir` (minus outputs, .git and
caches), so workers import the same trainers/ and datasets/ code as the driver.
"""

import json
import logging
import math
import os
from pathlib import Path

from conf.derived import resolve_address, worker_range
from conf.schema import ClusterConfig

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Settings of Ray's own that Slipway changes; a value the user exported wins. They reach Ray's processes from
# the driver's environment (an embedded Ray inherits it) and the job's runtime_env (workers and actors).
RAY_ENV_DEFAULTS = {
    # Ray Train's controller polls its workers every 2 s by default, which adds up to 2 s to the end of every
    # run and to each report's trip to a sweep's scheduler. Polling a few workers 4 times a second costs
    # nothing measurable.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Serve's controller kills an HTTP proxy that is not ready 5 s after it was asked for, and serve.start()
    # then fails with "ActorDiedError ... killed by ray.kill". A busy laptop (or CI box) can take longer than
    # that to start a worker process and import the proxy's web stack; a proxy that needs 60 s is broken.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
}


def local_cpu_count(cfg: ClusterConfig) -> int:
    """Logical CPUs for an embedded Ray: the workers' share plus two for Ray Data's read tasks.

    Ray counts CPUs as scheduling tokens, not cores. Training workers hold one token each; without spare
    tokens streamed Ray Data reads could never be scheduled and the first batch would never arrive. Asking
    for more worker CPUs than the machine has cores is refused: the workers would only slow each other down.
    """
    if cfg.local_num_cpus:
        return cfg.local_num_cpus
    cores = os.cpu_count() or 1
    wanted = worker_range(cfg)[1] * cfg.cpus_per_worker
    if wanted > cores:
        raise ValueError(
            f"cluster.num_workers={cfg.num_workers} x cluster.cpus_per_worker={cfg.cpus_per_worker:g} needs "
            f"{wanted:g} CPU, but this machine has {cores} cores; lower them (fractions are allowed) or set "
            "cluster.local_num_cpus to oversubscribe on purpose"
        )
    return math.ceil(wanted) + 2


def submitted_job_env_vars() -> dict[str, str] | None:
    """Inside a job submitted through the Jobs API (submit=true): its runtime_env's env vars; else None.
    Ray's job supervisor hands the job's runtime_env to its driver in this variable (ray/_private/worker.py)."""
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config is None:
        return None
    return (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}


# Files that hold credentials never ship to a cluster, whatever cluster.runtime_env_excludes and .gitignore say
# (Ray applies .gitignore too, but a repo may lack one, or un-ignore a file with '!'). Patterns are
# gitignore-style, relative to the repo, as Ray matches `excludes`.
CREDENTIAL_EXCLUDES = (
    ".env", ".env.*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", ".netrc", "_netrc",
    ".git-credentials", ".pypirc", ".npmrc", "credentials", "credentials.json", "*-credentials.json",
    "service-account*.json", "id_rsa*", "id_ed25519*", "id_ecdsa*", ".aws/", ".ssh/", ".kube/", ".docker/",
    ".gcloud/", ".config/gcloud/", ".config/wandb/", "wandb/settings", "kubeconfig", "*.kubeconfig",
)


def working_dir_excludes(cfg: ClusterConfig) -> list[str]:
    """What is left out of the repo shipped as working_dir: the user's excludes, then every credential file."""
    return list(cfg.runtime_env_excludes) + [pattern for pattern in CREDENTIAL_EXCLUDES
                                             if pattern not in cfg.runtime_env_excludes]


def build_runtime_env(cfg: ClusterConfig, *, remote: bool, env_vars: dict[str, str],
                      job_env_vars: dict[str, str] | None = None) -> dict:
    if job_env_vars is not None:
        # A submitted job's runtime_env already ships the repo, and Ray refuses a ray.init runtime_env that sets
        # any of the job's fields or env vars again: add only the env vars the job lacks.
        return {"env_vars": {name: value for name, value in env_vars.items() if name not in job_env_vars}}
    if remote:
        return {"working_dir": str(REPO_ROOT), "excludes": working_dir_excludes(cfg), "env_vars": env_vars}
    # Locally the workers see this filesystem; putting the repo on their path is enough.
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {"env_vars": {"PYTHONPATH": path, **env_vars}}


def connect(cfg: ClusterConfig, *, env_vars: dict[str, str] | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray; reuse a Ray that this process already started (tests, notebooks). `num_cpus` sizes
    an embedded Ray (default: one training run's workers, see local_cpu_count)."""
    import ray

    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    address = resolve_address(cfg)
    ray_env = {name: os.environ[name] for name in RAY_ENV_DEFAULTS}  # for trainers started by sweep trials, Serve
    runtime_env = build_runtime_env(cfg, remote=address is not None, env_vars={**ray_env, **(env_vars or {})},
                                    job_env_vars=submitted_job_env_vars())
    if address is None:
        num_cpus = num_cpus or local_cpu_count(cfg)
        logger.info("starting an embedded local Ray with %d logical CPUs", num_cpus)
        # address="local" always starts a new instance; None would join a `ray start` cluster found on disk.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=cfg.include_dashboard, runtime_env=runtime_env,
                 logging_level=logging.WARNING)
    else:
        logger.info("connecting to the Ray cluster at %s", address)
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as err:
            message = f"cannot reach the Ray cluster at cluster.address={address!r}: {err}{_auth_hint()}"
            raise ValueError(message) from err


def _auth_hint() -> str:
    # Clusters started with `ray start` in Ray 2.60 require a token by default, and a client whose
    # RAY_AUTH_MODE is unset does not send one: the refusal then looks like an unreachable address.
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return ""
    return (". If the cluster uses token authentication, set RAY_AUTH_MODE=token and provide its token "
            "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
