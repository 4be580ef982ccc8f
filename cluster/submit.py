"""`submit=true`: run this command on a cluster through the Ray Jobs API and follow it to the end.

The repo travels as the job's `runtime_env.working_dir` (minus `cluster.runtime_env_excludes`); the job's
driver runs `python launch.py <the same overrides> cluster.address=null` on the head, where Ray's job
supervisor sets RAY_ADDRESS to the cluster it belongs to. Ctrl-C stops following, never the job.
"""

import asyncio
import collections
import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import time
from urllib.parse import urlsplit

from cluster.connection import RAY_ENV_DEFAULTS, build_runtime_env
from conf.derived import SECRET_KEYS
from conf.schema import ClusterConfig

logger = logging.getLogger(__name__)

DASHBOARD_PORT = 8265
# Ports that speak gRPC, not the dashboard's HTTP: what users paste from `ray start` output by mistake.
NOT_JOBS_API_PORTS = {6379: "the GCS (ray start --port)", 10001: "the Ray Client server"}
# (connect, read) seconds for the first request. The Jobs client sends requests without a timeout: an address
# that drops packets would hang for minutes (TCP retries), and a port that accepts but never answers, forever.
PROBE_TIMEOUT_S = (5.0, 10.0)
# Environment the run reads on the cluster (trainers/tracking.py): passed by name, values never logged.
PASSED_ENV_VARS = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT")
# Lines of launch.py's own output naming what a stage produced (DESIGN.md section 3).
PRODUCED_LINE = re.compile(r"^(run_dir|sweep_dir|endpoint|promotion|production|canary|registry): (.+)$")
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
TAIL_LINES = 20
DASHBOARD_HINT = "is the head's dashboard running (ray start --head --include-dashboard=true, port 8265)?"


class JobFailedError(RuntimeError):
    """The submitted job ended FAILED or STOPPED (or could not be followed to its end)."""


def submit_job(cluster: ClusterConfig, *, overrides: list[str], experiment: str) -> str:
    """Submit this command to the cluster's Jobs API, stream its logs until it ends; returns
    "<job id> succeeded", plus what the job's last stage produced; raises JobFailedError otherwise."""
    key, url = jobs_api_url(cluster)
    client = connect_jobs_api(url, key=key)
    entrypoint = build_entrypoint(overrides)
    runtime_env = build_job_runtime_env(cluster, secrets=secret_env_vars(overrides))
    logger.info("submitting to %s: %s", url, entrypoint)
    job_id = _submit(client, entrypoint=entrypoint, runtime_env=runtime_env, metadata={"experiment": experiment},
                     url=url)
    logger.info("submitted job %s; dashboard: %s/#/jobs/%s", job_id, url, job_id)
    logger.info("follow it later: %s | stop it: %s", _cli("logs -f", url, job_id), _cli("stop", url, job_id))
    status, tail = follow_job(client, job_id, url=url)
    if status != "SUCCEEDED":
        raise JobFailedError(_failure_message(client, job_id, status=status, tail=tail))
    produced = _produced(tail)
    if produced is None:
        return f"{job_id} succeeded"
    return f"{job_id} succeeded ({produced[0]} on the cluster: {produced[1]})"


def jobs_api_url(cluster: ClusterConfig) -> tuple[str, str]:
    """(the key it came from, the Jobs API URL): http(s)://host:port as given, a bare host[:port] as http."""
    key = "cluster.address" if cluster.address else "RAY_ADDRESS"
    address = (cluster.address or os.environ.get("RAY_ADDRESS") or "").strip().rstrip("/")
    if not address:
        raise ValueError("submit=true needs the cluster's Jobs API address: cluster.address=http://HEAD:8265 "
                         "(or RAY_ADDRESS)")
    scheme = address.split("://", 1)[0].lower() if "://" in address else None
    if scheme not in (None, "http", "https"):
        raise ValueError(f"{key}={address}: {_needs_dashboard()}")
    url = address if scheme else f"http://{address}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ValueError(f"{key}={address} is not a valid address: {err}") from err
    if not parts.hostname:
        raise ValueError(f"{key}={address} names no host: {_needs_dashboard()}")
    if port in NOT_JOBS_API_PORTS:
        raise ValueError(f"{key}={address} looks like {NOT_JOBS_API_PORTS[port]}: {_needs_dashboard()}")
    if scheme is None and port is None:
        url = f"{url}:{DASHBOARD_PORT}"
    return key, url


def _needs_dashboard() -> str:
    return ("submit=true needs the head's dashboard (Jobs API) address, http://HEAD:8265; "
            "cluster.address without submit=true connects to a GCS or ray:// address directly")


def connect_jobs_api(url: str, *, key: str, headers: dict | None = None):
    """A JobSubmissionClient for `url`, after one request with a timeout that turns an unreachable address,
    a port that is not a dashboard, or a refused token into a ValueError that says which."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    from ray.job_submission import JobSubmissionClient

    headers = {**(headers or {}), **get_auth_headers_if_auth_enabled(headers or {})}
    _probe(url, key=key, headers=headers)
    # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given; the key we named wins.
    with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        return JobSubmissionClient(url, headers=headers)


def _probe(url: str, *, key: str, headers: dict) -> None:
    import requests

    try:
        response = requests.get(f"{url}/api/version", headers=headers, timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as err:
        raise ValueError(f"cannot reach the Ray Jobs API at {key}={url}: {_reason(err)}; {DASHBOARD_HINT}") from err
    if response.status_code in (401, 403):
        raise ValueError(_auth_message(url, key=key, status=response.status_code, body=response.text))
    try:
        is_ray = response.status_code == 200 and "ray_version" in response.json()
    except ValueError:
        is_ray = False
    if not is_ray:
        raise ValueError(f"{key}={url} answered HTTP {response.status_code} to /api/version, not as a Ray "
                         f"dashboard; {DASHBOARD_HINT}")


def _reason(err: Exception) -> str:
    import requests

    if isinstance(err, requests.ConnectTimeout):
        return f"no connection within {PROBE_TIMEOUT_S[0]:g} s (a wrong IP, a firewall, or the head is down)"
    if isinstance(err, requests.ReadTimeout):
        return f"connected, but no answer within {PROBE_TIMEOUT_S[1]:g} s"
    text = str(err)
    if "BadStatusLine" in text or "Connection aborted" in text:
        return f"the port answered, but not in HTTP (a GCS or Ray Client port? {_needs_dashboard()})"
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    return errno.group(0) if errno else text


def _auth_message(url: str, *, key: str, status: int, body: str) -> str:
    refused = f"the Ray Jobs API at {key}={url} refused the request (HTTP {status}: {body.strip()[:200]})"
    if status == 401 and os.environ.get("RAY_AUTH_MODE") != "token":
        return (f"{refused}: the cluster uses token authentication; set RAY_AUTH_MODE=token and provide the "
                "cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; on the head, "
                "`ray get-auth-token` prints it)")
    return (f"{refused}: the token sent is missing or not this cluster's; check RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            "or ~/.ray/auth_token against `ray get-auth-token` on the head")


@contextlib.contextmanager
def _without_env(*names: str):
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _logger_level(name: str, level: int):
    log = logging.getLogger(name)
    saved = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(saved)


def build_entrypoint(overrides: list[str]) -> str:
    """This command for the cluster: the same overrides, minus submitting and the Jobs API address (the job's
    driver joins the cluster through the RAY_ADDRESS that the job supervisor sets). A secret given on the
    command line becomes a reference to the environment variable it travels in (secret_env_vars): the
    entrypoint is shown by the dashboard, `ray job list` and the job's own log."""
    kept = [_secret_as_reference(override) for override in overrides
            if _override_key(override) not in ("submit", "cluster.address")]
    return shlex.join(["python", "launch.py", *kept, "cluster.address=null"])


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").strip()


def _override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def _env_reference(value: str) -> str | None:
    """The variable that `${oc.env:NAME}` (or `${oc.env:NAME,default}`) reads, else None."""
    match = re.fullmatch(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)(,[^}]*)?\}", value.strip())
    return match.group(1) if match else None


def _secret_as_reference(override: str) -> str:
    key = _override_key(override)
    if key not in SECRET_KEYS or _env_reference(_override_value(override)):
        return override
    prefix = override.split("=", 1)[0]
    return f"{prefix}=${{oc.env:{SECRET_KEYS[key]}}}"


def secret_env_vars(overrides: list[str]) -> dict[str, str]:
    """The environment variables that carry this command's secrets to the job: a literal value under the
    variable its key reads on the cluster (SECRET_KEYS), a `${oc.env:NAME}` reference as NAME's value here."""
    carried = {}
    for override in overrides:
        key, value = _override_key(override), _override_value(override)
        if key not in SECRET_KEYS or not value:
            continue
        name = _env_reference(value)
        if name is None:
            carried[SECRET_KEYS[key]] = value
        elif os.environ.get(name):
            carried[name] = os.environ[name]
        else:
            raise ValueError(f"{key}={value}: the environment variable {name} is not set here, so the job "
                             f"could not read it either; export {name}=<the secret> and submit again")
    return carried


def build_job_runtime_env(cluster: ClusterConfig, *, secrets: dict[str, str] | None = None) -> dict:
    """The repo as working_dir, and the environment the run needs on every process of the job (secrets
    included, as variables: never on the command line)."""
    env_vars = {name: os.environ.get(name, default) for name, default in RAY_ENV_DEFAULTS.items()}
    env_vars.update({name: os.environ[name] for name in PASSED_ENV_VARS if os.environ.get(name)})
    env_vars.update(secrets or {})
    logger.info("job environment: %s", ", ".join(sorted(env_vars)))  # names only: some are secrets
    return build_runtime_env(cluster, remote=True, env_vars=env_vars)


def _submit(client, *, entrypoint: str, runtime_env: dict, metadata: dict, url: str) -> str:
    """client.submit_job, with the upload limit and other refusals turned into errors that say what to change."""
    try:
        # Packaging logs each .gitignore it leaves out at INFO; its warnings (files over 10 MiB) stay.
        with _logger_level("ray._private.runtime_env", logging.WARNING):
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata)
    except RuntimeError as err:
        text = str(err)
        # The dashboard refuses request bodies over 100 MiB (413); the GCS stores packages up to 512 MiB.
        if "status code 413" in text or "exceeds the maximum size" in text:
            raise ValueError(
                f"the zipped working_dir {runtime_env['working_dir']} is over the Ray Jobs API's upload limit "
                f"(100 MiB by default): add its large folders or files to cluster.runtime_env_excludes (now "
                f"{runtime_env.get('excludes')}), .gitignore or .rayignore; Ray's warnings above name files "
                "over 10 MiB") from err
        raise ValueError(f"the Ray Jobs API at {url} refused the job: {text[:2000]}") from err


def _cli(command: str, url: str, job_id: str) -> str:
    return f"ray job {command} --address {url} {job_id}"


def follow_job(client, job_id: str, *, url: str) -> tuple[str, list[str]]:
    """Stream the job's logs to stdout until it ends; returns (final status, its last log lines)."""
    import aiohttp

    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    # asyncio.run turns Ctrl-C into cancelling its task, and a cancellation that lands in the log stream's
    # websocket read can be absorbed there: following then went on to the job's end and exited 0. A handler of our
    # own (asyncio.run keeps any but Python's default) raises KeyboardInterrupt wherever the main thread is.
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        asyncio.run(_stream_logs(client, job_id, tail))
    except KeyboardInterrupt:
        # launch.py then says "rerun to resume", which here would submit a second job.
        logger.error("stopped following; job %s keeps running on the cluster (rerunning this command would submit "
                     "a second one). Follow it: %s | stop it: %s",
                     job_id, _cli("logs -f", url, job_id), _cli("stop", url, job_id))
        raise
    except (RuntimeError, OSError, aiohttp.ClientError) as err:
        raise JobFailedError(f"lost the log stream of job {job_id} ({err}); it may still be running: "
                             f"{_cli('status', url, job_id)}") from err
    finally:
        signal.signal(signal.SIGINT, previous)
    status = _final_status(client, job_id)
    if status not in TERMINAL_STATUSES:
        raise JobFailedError(f"the log stream of job {job_id} ended while it is {status}: "
                             f"{_cli('logs -f', url, job_id)}")
    return status, list(tail)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


async def _stream_logs(client, job_id: str, tail: collections.deque) -> None:
    partial = ""
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)  # the job's own output is this command's product output
        sys.stdout.flush()
        lines = (partial + chunk).split("\n")
        partial = lines.pop()
        tail.extend(line for line in lines if line.strip())
    if partial.strip():
        tail.append(partial)


def _final_status(client, job_id: str, *, timeout_s: float = 30.0) -> str:
    # The log stream closes as the job ends; its status can trail it by a moment.
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_STATUSES or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _failure_message(client, job_id: str, *, status: str, tail: list[str]) -> str:
    message = (client.get_job_info(job_id).message or "").strip().splitlines()
    # Ray's message goes on with the job's last 20,000 characters of log; the last lines below are enough.
    reason = f": {message[0].split(', last available logs')[0][:300]}" if message else ""
    lines = "\n".join(f"  | {line}" for line in tail[-10:]) or "  (no output)"
    return f"job {job_id} {status}{reason}\nlast lines of its log:\n{lines}"


def _produced(tail: list[str]) -> tuple[str, str] | None:
    for line in reversed(tail):
        match = PRODUCED_LINE.match(line.strip())
        if match:
            return match.group(1), match.group(2)
    return None
