"""launch.py as users run it: a subprocess, its exit code, its output and the run directory it leaves."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, TINY_OVERRIDES


def launch(*args: str, timeout: int = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_cfg_job_prints_the_resolved_config():
    result = launch("--cfg", "job", "+exp=llm_tiny", "strategy=zero3")
    assert result.returncode == 0, result.stderr
    assert "preset: tiny" in result.stdout and "name: zero3" in result.stdout


BAD_CONFIGS = [
    ("llm_tiny", "trainer.lrr=1", "trainer.lrr"),
    ("llm_tiny", "trainer.max_steps=abc", "trainer.max_steps"),
    ("llm_tiny", "strategy=zero4", "zero4"),
    ("llm_tiny", "model.cross_layers=2", "model.cross_layers"),  # a ranker key on an LLM
    ("ranker_dlrm", "model.n_heads=4", "model.n_heads"),  # and the other way round
    ("ranker_dlrm", "data.rows=many", "data.rows"),
]


@pytest.mark.parametrize("index", range(len(BAD_CONFIGS)), ids=[named for _, _, named in BAD_CONFIGS])
def test_bad_config_fails_at_composition_naming_the_key(index, bad_input_outcomes):
    returncode, output = bad_input_outcomes[len(BAD_INPUTS) + index]
    named = BAD_CONFIGS[index][2]
    assert returncode != 0
    assert named in output
    assert "Started a local Ray" not in output


BAD_INPUTS = [
    (["data=text_dir", "data.path=/nonexistent/corpus"], "data.path"),
    (["data.seq_len=512"], "model.max_seq_len"),
    (["strategy.name=zero9"], "strategy.name"),
    (["trainer.global_batch_size=10"], "trainer.global_batch_size"),
    (["cluster.num_workers=64"], "cluster.num_workers=64"),
    (["+exp=ranker_dlrm", "model=llm_tiny"], "model.family=llm trains on text or chat data"),
    (["+exp=ranker_dlrm", "data=stdlib"], "model.family=ranker trains on clicklog data"),
    (["+exp=ranker_dlrm", "data=criteo_tsv", "data.path=/nonexistent/day_0"], "data.path='/nonexistent/day_0'"),
    (["+exp=ranker_dlrm", "data.hash_buckets=[5,5]"], "data.hash_buckets must be"),
    (["+exp=ranker_dlrm", "trainer.activation_checkpointing=true"], "trainer.activation_checkpointing"),
    (["+exp=ranker_dlrm", "trainer.compile=true"], "trainer.compile=true does not apply to model.family=ranker"),
    (["strategy=zero3", "trainer.compile=true"], "trainer.compile=true is not supported with strategy=zero3"),
    (["strategy=fsdp", "strategy.fsdp_prefetch_blocks=0"], "strategy.fsdp_prefetch_blocks=0 must be at least 1"),
    (["cluster.launcher=processes", "cluster.address=127.0.0.1:6379"],
     "cluster.launcher=processes trains on this machine without Ray, but cluster.address=127.0.0.1:6379"),
    (["cluster.launcher=processes", "sweep=asha"], "but sweep=asha runs its trials under Ray Tune"),
    (["cluster.launcher=threads"], "cluster.launcher"),
]


@pytest.fixture(scope="module")
def bad_input_outcomes(tmp_path_factory) -> list[tuple[int, str]]:
    """Every BAD_INPUTS command, then every BAD_CONFIGS one, started together: each spends seconds importing
    before it fails, and the imports of sixteen processes overlap on two cores better than they run one after
    another."""
    root = tmp_path_factory.mktemp("bad_input")
    commands = [([] if any(item.startswith("+exp=") for item in overrides) else ["+exp=llm_tiny"]) + overrides
                for overrides, _ in BAD_INPUTS]
    commands += [[f"+exp={exp}", override] for exp, override, _ in BAD_CONFIGS]
    processes = [subprocess.Popen([sys.executable, "launch.py", f"paths.root={root / str(index)}", *command],
                                  cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for index, command in enumerate(commands)]
    return [(process.wait(timeout=180), process.stdout.read()) for process in processes]


@pytest.mark.parametrize("index", range(len(BAD_INPUTS)), ids=[named for _, named in BAD_INPUTS])
def test_bad_input_exits_2_with_a_message_naming_the_key(index, bad_input_outcomes):
    returncode, output = bad_input_outcomes[index]
    assert returncode == 2, output
    assert BAD_INPUTS[index][1] in output
    assert "Traceback" not in output


def test_gpu_request_on_a_machine_without_gpus_names_both_numbers_before_ray_starts(tmp_path):
    result = launch(*TINY_OVERRIDES, f"paths.root={tmp_path}", "cluster.use_gpu=true", "trainer.precision=fp32",
                    timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "needs 2 GPU, but this machine has 0 GPU" in output
    assert "starting an embedded local Ray" not in output and "prepared data" not in output


def test_an_unwritable_paths_root_exits_2_naming_it_before_ray_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("paths.root must be a directory; this is a file\n")
    result = launch(*TINY_OVERRIDES, f"paths.root={blocker}/outputs", f"paths.data_cache={tmp_path}/data",
                    timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"paths.root={blocker}/outputs/runs is not writable: Not a directory" in output
    assert "Traceback" not in output and "starting an embedded local Ray" not in output


def test_a_full_disk_is_an_error_naming_the_file(tmp_path):
    from trainers.outputs import atomic_write

    target = tmp_path / "manifest.json"
    target.write_text("{}")
    (tmp_path / "manifest.json.tmp").symlink_to("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(ValueError, match=f"cannot write {target}: No space left on device"):
        atomic_write(target, "{\"a\": 1}")
    assert target.read_text() == "{}"  # what was there is intact


def _live_session_processes(session_id: int, *, grace_s: float = 15.0) -> list:
    """Processes still running in the session, after giving Ray's daemons `grace_s` to exit (zombies excluded)."""
    import time

    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for process in psutil.process_iter(["pid"]):
            try:
                if os.getsid(process.pid) == session_id and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group; emulate exactly that."""
    import signal
    import time

    args = [sys.executable, "launch.py", *TINY_OVERRIDES, f"paths.root={tmp_path}", "trainer.max_steps=24",
            "checkpoint.every_n_steps=5", "trainer.eval_every_n_steps=10"]
    process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any(row.get("step", 0) >= 8 for path in tmp_path.glob("runs/*/metrics.jsonl")
                      for row in map(json.loads, path.read_text().splitlines())):
            assert time.monotonic() < deadline and process.poll() is None, "run never reached step 8"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        leftovers = _live_session_processes(process.pid)
        for leftover in leftovers:  # only processes of the session this test created
            leftover.kill()

    assert process.returncode != 0
    assert "rerun the same command to resume" in output
    assert not leftovers, f"processes left running after Ctrl-C: {[p.pid for p in leftovers]}"

    rerun = launch(*args[2:], timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "restored checkpoint checkpoint_step_000000" in rerun.stdout + rerun.stderr
    run_dir = tmp_path.joinpath(rerun.stdout.strip().splitlines()[-1].removeprefix("run_dir: "))
    steps = [row["step"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train_loss" in row]
    assert steps == list(range(1, 25)), "each step must be logged exactly once across the interrupted run and rerun"
