"""submit=true: the command runs on a cluster through the Ray Jobs API (a real `ray start` head with its
dashboard, tests/cluster/conftest.py), and wrong addresses fail fast with a message that says what to change."""

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from cluster import submit
from cluster.connection import build_runtime_env
from conf.schema import ClusterConfig
from tests.helpers import REPO_ROOT, TINY_OVERRIDES


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _launch(overrides: list[str], *, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *overrides], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


# ---- addresses and the job's command, no cluster needed


@pytest.mark.parametrize("address, url", [
    ("http://head:8265", "http://head:8265"),
    ("https://ray.example.com/", "https://ray.example.com"),
    ("head:8265", "http://head:8265"),
    ("10.0.0.5", "http://10.0.0.5:8265"),
])
def test_jobs_api_address_forms(address, url):
    assert submit.jobs_api_url(ClusterConfig(address=address)) == ("cluster.address", url)


@pytest.mark.parametrize("address", ["ray://head:10001", "head:6379", "http://10.0.0.5:6379", "gcs://head"])
def test_gcs_and_ray_client_addresses_are_refused_with_the_dashboard_address(address):
    with pytest.raises(ValueError, match=r"submit=true needs the head's dashboard .*http://HEAD:8265.*without submit"):
        submit.jobs_api_url(ClusterConfig(address=address))


def test_submit_without_an_address_names_cluster_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match=r"cluster.address=http://HEAD:8265 \(or RAY_ADDRESS\)"):
        submit.submit_job(ClusterConfig(), overrides=["submit=true"], experiment="llm_tiny")


def test_entrypoint_reruns_the_overrides_without_submit_or_the_jobs_address():
    entrypoint = submit.build_entrypoint(["+exp=llm_tiny", "cluster=gpu_node", "cluster.address=http://h:8265",
                                          "submit=true", "data.cardinalities=[4, 5]", "++submit=true"])
    assert entrypoint == ("python launch.py +exp=llm_tiny cluster=gpu_node 'data.cardinalities=[4, 5]' "
                          "cluster.address=null")


def test_job_env_passes_secrets_by_name_only(monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "secret-value-123")
    with caplog.at_level(logging.INFO):
        env = submit.build_job_runtime_env(ClusterConfig())
    assert env["env_vars"]["WANDB_API_KEY"] == "secret-value-123"
    assert env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    assert env["working_dir"] == str(REPO_ROOT) and ".git" in env["excludes"]
    assert "WANDB_API_KEY" in caplog.text and "secret-value-123" not in caplog.text


def test_a_secret_travels_as_a_variable_never_in_the_entrypoint(monkeypatch):
    literal = ["+exp=llm_tiny", "serve.api_key=sk-literal-42", "submit=true"]
    assert "sk-literal-42" not in submit.build_entrypoint(literal)
    assert "'serve.api_key=${oc.env:SLIPWAY_API_KEY}'" in submit.build_entrypoint(literal)
    assert submit.secret_env_vars(literal) == {"SLIPWAY_API_KEY": "sk-literal-42"}
    referenced = ["+exp=llm_tiny", "serve.api_key=${oc.env:MY_KEY}"]
    with pytest.raises(ValueError, match=r"serve.api_key=\$\{oc.env:MY_KEY\}: the environment variable MY_KEY is "
                                         "not set here"):
        submit.secret_env_vars(referenced)
    monkeypatch.setenv("MY_KEY", "sk-from-env")
    assert submit.secret_env_vars(referenced) == {"MY_KEY": "sk-from-env"}
    assert "'serve.api_key=${oc.env:MY_KEY}'" in submit.build_entrypoint(referenced)


def test_credential_files_never_ship_as_working_dir(tmp_path):
    """Ray's own packaging of a directory with credentials in it, and a .gitignore that un-ignores one."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from cluster.connection import working_dir_excludes

    secrets = [".env", ".env.production", "server.pem", "tls.key", ".netrc", ".git-credentials", "credentials",
               "gcp-credentials.json", "wandb/settings", ".aws/credentials", ".ssh/id_rsa", "config/id_ed25519"]
    kept = ["launch.py", "trainers/loop.py", "conf/serve/default.yaml", "credentials_check.py", "envs.md"]
    for name in secrets + kept:
        (tmp_path / "repo" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / name).write_text("x")
    (tmp_path / "repo" / ".gitignore").write_text("!.env\n!*.pem\n")
    cluster = ClusterConfig(runtime_env_excludes=[".git"])  # a user's excludes that list none of them
    create_package(str(tmp_path / "repo"), tmp_path / "pkg.zip", include_gitignore=True,
                   excludes=working_dir_excludes(cluster))
    shipped = {name for name in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not name.endswith("/")}
    assert not shipped & set(secrets), sorted(shipped & set(secrets))
    assert set(kept) <= shipped


def test_a_driver_inside_a_submitted_job_does_not_ship_the_repo_again():
    # Ray refuses a ray.init runtime_env that repeats a field or env var of the job's own runtime_env.
    env = build_runtime_env(ClusterConfig(), remote=True, env_vars={"A": "1", "B": "2"}, job_env_vars={"A": "1"})
    assert env == {"env_vars": {"B": "2"}}


def test_a_closed_port_fails_within_seconds_with_the_dashboard_hint():
    address = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(ValueError) as error:
        submit.submit_job(ClusterConfig(address=address), overrides=[], experiment="llm_tiny")
    assert time.monotonic() - started < 10
    assert str(error.value).startswith(f"cannot reach the Ray Jobs API at cluster.address={address}: ")
    assert "Connection refused" in str(error.value) and "--include-dashboard=true" in str(error.value)


def test_a_port_that_never_answers_times_out_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(submit, "PROBE_TIMEOUT_S", (1.0, 1.0))
    with socket.socket() as silent:  # the kernel accepts the connection; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"cannot reach the Ray Jobs API .*no answer within 1 s"):
            submit.connect_jobs_api(f"http://127.0.0.1:{silent.getsockname()[1]}", key="cluster.address")
        assert time.monotonic() - started < 5


def test_an_unknown_key_fails_locally_before_anything_is_submitted():
    result = _launch(["+exp=llm_tiny", "trainer.no_such_key=1", f"cluster.address=127.0.0.1:{_closed_port()}",
                      "submit=true"], env={}, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no_such_key" in output
    assert "cannot reach the Ray Jobs API" not in output and "raysubmit_" not in output


# ---- against a real head with the Jobs API


def test_a_refused_token_says_how_to_provide_one(ray_head):
    # This process was not given the head's token (ray_head.env goes to subprocesses only).
    with pytest.raises(ValueError, match=r"refused the request \(HTTP 40[13].*RAY_AUTH_TOKEN"):
        submit.connect_jobs_api(ray_head.dashboard_url, key="cluster.address")


def test_a_working_dir_over_the_upload_limit_names_runtime_env_excludes(ray_head, tmp_path):
    (tmp_path / "weights.bin").write_bytes(os.urandom(101 * 2**20))  # random: zipping cannot shrink it
    client = submit.connect_jobs_api(ray_head.dashboard_url, key="cluster.address",
                                     headers={"Authorization": f"Bearer {ray_head.env['RAY_AUTH_TOKEN']}"})
    runtime_env = {"working_dir": str(tmp_path), "excludes": [".git"]}
    with pytest.raises(ValueError, match=r"over the Ray Jobs API's upload limit .*cluster.runtime_env_excludes"):
        submit._submit(client, entrypoint="true", runtime_env=runtime_env, metadata={}, url=ray_head.dashboard_url)


def test_submit_runs_the_command_on_the_cluster_and_follows_its_logs(ray_head, tmp_path, data_cache):
    """The key given on the command line reaches the job's config (which resolves it from the variable it
    travels in) but not its entrypoint, log or run directory."""
    secret = f"sk-{uuid.uuid4().hex}"
    result = _launch([*TINY_OVERRIDES, f"paths.root={tmp_path}", f"paths.data_cache={data_cache}",
                      f"serve.api_key={secret}", f"cluster.address={ray_head.dashboard_url}", "submit=true"],
                     env=ray_head.env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    job_id = re.search(r"submitted job (raysubmit_\w+)", output).group(1)
    client = submit.connect_jobs_api(ray_head.dashboard_url, key="cluster.address",
                                     headers={"Authorization": f"Bearer {ray_head.env['RAY_AUTH_TOKEN']}"})
    assert "oc.env:SLIPWAY_API_KEY" in client.get_job_info(job_id).entrypoint
    assert secret not in client.get_job_info(job_id).entrypoint and secret not in output
    assert not [path for path in tmp_path.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]
    assert f"{ray_head.dashboard_url}/#/jobs/{job_id}" in output
    assert f"ray job logs -f --address {ray_head.dashboard_url} {job_id}" in output
    # The job's driver joined the cluster through the RAY_ADDRESS its supervisor set; workers trained.
    assert "connecting to the Ray cluster at" in output and "starting an embedded local Ray" not in output
    assert "step 6/6 | loss" in output
    package = re.search(r"gcs://(_ray_pkg_\w+)\.zip", output).group(1)
    assert list(ray_head.temp_dir.glob(f"session_*/runtime_resources/working_dir_files/{package}"))
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"job: {job_id} succeeded (run_dir on the cluster: {tmp_path}/runs/llm_tiny-"), last
    assert (tmp_path / "runs" / last.split("/runs/")[1].rstrip(")") / "summary.json").exists()


def test_a_job_that_fails_on_the_cluster_exits_non_zero_with_its_error(ray_head, tmp_path, data_cache):
    # Capacity is only known on the cluster: 2 workers x 3 CPU do not fit the head's 4 CPU.
    result = _launch([*TINY_OVERRIDES, f"paths.root={tmp_path}", f"paths.data_cache={data_cache}",
                      "cluster.cpus_per_worker=3",
                      f"cluster.address={ray_head.dashboard_url}", "submit=true"], env=ray_head.env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    error = output[output.rindex("error: job raysubmit_"):]
    assert "FAILED" in error.splitlines()[0] and "exit code 2" in error.splitlines()[0]
    assert "6 CPU" in error  # the job's own error, quoted from its log


def test_ctrl_c_stops_following_but_not_the_job(ray_head, tmp_path):
    command = [sys.executable, "launch.py", *TINY_OVERRIDES, f"paths.root={tmp_path}",
               f"cluster.address={ray_head.dashboard_url}", "submit=true"]
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **ray_head.env})
    seen = []
    for line in launcher.stdout:  # the job's own output arrives: we are following its logs
        seen.append(line)
        if "Running entrypoint for job" in line:
            launcher.send_signal(signal.SIGINT)
            break
    output = "".join(seen) + launcher.communicate(timeout=60)[0]
    assert launcher.returncode == 130, output[-4000:]
    job_id = re.search(r"submitted job (raysubmit_\w+)", output).group(1)
    assert f"job {job_id} keeps running on the cluster" in output
    assert f"ray job stop --address {ray_head.dashboard_url} {job_id}" in output
    client = submit.connect_jobs_api(ray_head.dashboard_url, key="cluster.address",
                                     headers={"Authorization": f"Bearer {ray_head.env['RAY_AUTH_TOKEN']}"})
    assert str(client.get_job_status(job_id).value) in ("PENDING", "RUNNING")
    client.stop_job(job_id)  # the head's CPUs are shared with the other tests
    deadline = time.monotonic() + 30
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
