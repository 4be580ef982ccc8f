"""lm-evaluation-harness on Slipway's LLMs, with tasks defined locally: a directory of task YAML files whose data
are local files (`dataset_path: json` and `dataset_kwargs.data_files`), so nothing is downloaded.

Two ways to score, with the same numbers for the same version:
- over HTTP (`evaluate_endpoint`, scripts/eval_lm.py): lm-eval's own `local-completions` client against a served
  model's /v1/completions, tokenizing with the served version's own tokenizer files (our server has no
  /tokenizer_info route, so the client tokenizes, as it does for vLLM without one);
- in one process (`evaluate_export`, the eval gate's serve.gate_metric): serve/harness_model.py's ExportLM over
  an export, which runs the replica's code on the requests that client would send.

A task's relative data_files are resolved against the directory of its YAML file, so the same task runs from
any working directory (lm-eval itself would resolve them against the working directory).
"""

import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from conf.derived import LocalTask, TaskMetric, local_lm_eval_tasks, require_local_task
from serve.export import read_model_config

logger = logging.getLogger(__name__)

COMPLETIONS_PATH = "/v1/completions"
REQUEST_TIMEOUT_S = 300  # per request: a long generation on a CPU replica takes a while


# ---------------------------------------------------------------------------------------------- tasks

def task_specs(names: list[str], include_path: str | Path, *, keys: tuple[str, str] = ("--tasks", "--include-path")
               ) -> list[dict]:
    """The named tasks of `include_path` as lm-eval task configs (its !function tags imported), with relative
    data_files made absolute against each YAML file's directory. An unknown name lists the tasks there; `keys`
    name the task names' and the directory's settings in errors."""
    tasks_key, path_key = keys
    if not names:
        raise ValueError(f"{tasks_key} names no task")
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader: includes, !function

    tasks = local_lm_eval_tasks(include_path, key=path_key)
    specs = []
    for name in names:
        task: LocalTask = require_local_task(tasks, name, key=tasks_key, directory=include_path)
        config = load_yaml(task.yaml_path, resolve_func=True)
        specs.append(_with_local_data(config, base=task.yaml_path.parent))
    return specs


def _with_local_data(config: dict, *, base: Path) -> dict:
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        return config
    kwargs["data_files"] = _absolute(files, base=base)
    return {**config, "dataset_kwargs": kwargs}


def _absolute(files, *, base: Path):
    if isinstance(files, dict):
        return {split: _absolute(value, base=base) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute(value, base=base) for value in files]
    if "://" in str(files) or Path(files).expanduser().is_absolute():  # hf://, s3://: the user's choice to fetch
        return files
    return str(base / files)


def _task_manager(include_path: str | Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(include_path).expanduser().resolve()), include_defaults=False)


def _run(lm, specs: list[dict], *, include_path, limit: int | None, log_samples: bool) -> dict:
    from lm_eval.evaluator import simple_evaluate

    results = simple_evaluate(model=lm, tasks=specs, task_manager=_task_manager(include_path), limit=limit,
                              log_samples=log_samples)
    if results is None:  # only a non-zero rank of a distributed run gets None; we run one process
        raise RuntimeError("lm-eval returned no results")
    return results


# -------------------------------------------------------------------------------------------- in-process

def evaluate_export(directory: Path, *, version: int, tasks: list[str], include_path: str | Path,
                    limit: int | None = None, max_gen_toks: int | None = None, log_samples: bool = False) -> dict:
    """lm-eval's results for the LLM export in `directory`, scored in this process (serve/harness_model.py)."""
    from serve.completion import load_llm
    from serve.export import load_export
    from serve.harness_model import ExportLM

    specs = task_specs(tasks, include_path, keys=("serve.gate_metric", "serve.gate_tasks"))
    llm = load_llm(load_export(directory), version=version)
    lm = ExportLM(llm, directory=directory, max_length=llm.model.cfg.max_seq_len, max_gen_toks=max_gen_toks)
    return _run(lm, specs, include_path=include_path, limit=limit, log_samples=log_samples)


def score_export(directory: Path, metric: TaskMetric, *, version: int, include_path: str | Path,
                 limit: int | None = None) -> tuple[float, dict]:
    """One task metric of an export, in this process: (value, what the gate records about how it was measured)."""
    results = evaluate_export(directory, version=version, tasks=[metric.task], include_path=include_path,
                              limit=limit)
    value = metric_value(results, metric)
    evaluation = {"tasks": str(Path(include_path).expanduser().resolve()), "documents":
                  results.get("n-samples", {}).get(metric.task, {}).get("effective"),
                  "stderr": _number(results["results"][metric.task].get(f"{metric.metric}_stderr,{metric.filter}"))}
    return value, evaluation


def metric_value(results: dict, metric: TaskMetric) -> float:
    scores = results["results"].get(metric.task)
    if scores is None:
        raise ValueError(f"lm-eval reported no task {metric.task} (reported: {', '.join(results['results'])})")
    if metric.key not in scores:
        known = sorted(k for k in scores if "," in k and "_stderr" not in k)
        raise ValueError(f"task {metric.task} reported no {metric.key} (reported: {', '.join(known)})")
    return float(scores[metric.key])


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" for a stderr it lacks


# ------------------------------------------------------------------------------------------ over HTTP

@dataclass(frozen=True)
class Endpoint:
    """A served model: `base_url` as serve printed it (http://127.0.0.1:8000, with the route prefix if any; a
    trailing /v1 or /v1/completions is accepted too), the registry's model name, and its API key if it has one."""

    base_url: str
    model: str
    api_key: str | None = None

    @property
    def root(self) -> str:
        url = self.base_url.rstrip("/")
        for suffix in (COMPLETIONS_PATH, "/v1"):
            url = url.removesuffix(suffix)
        return url

    @property
    def completions_url(self) -> str:
        return self.root + COMPLETIONS_PATH


def api_key_from_env(name: str | None) -> str | None:
    """The key in environment variable `name` (keys never travel on a command line, where `ps` shows them)."""
    if name is None:
        return None
    key = os.environ.get(name)
    if not key:
        raise ValueError(f"--api-key-env {name}: the environment variable {name} is unset or empty")
    return key


def served_model(endpoint: Endpoint) -> dict:
    """The endpoint's /v1/models entry for `endpoint.model` (production_version, canary_version, ...)."""
    url = endpoint.root + "/v1/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {endpoint.api_key}"}
                                     if endpoint.api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            listing = json.loads(response.read())
    except urllib.error.HTTPError as err:
        if err.code == 401:
            raise ValueError(f"{url} answered 401: the endpoint wants an API key; put it in an environment "
                             "variable and name that with --api-key-env") from None
        raise ValueError(f"{url} answered {err.code}: is --base-url a Slipway LLM endpoint (with its route "
                         "prefix)?") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(f"--base-url {endpoint.base_url}: nothing answers at {url} ({reason}); is the model "
                         "served (python launch.py stage=serve ...)?") from None
    models = {entry.get("id"): entry for entry in listing.get("data", [])}
    if endpoint.model not in models:
        raise ValueError(f"--model {endpoint.model}: not served at {endpoint.root} (served: "
                         f"{', '.join(map(str, models)) or 'none'})")
    return models[endpoint.model]


def served_version(endpoint: Endpoint) -> int:
    """The version that answers every request: production, refused while a canary shares the traffic (the scores
    would mix two models)."""
    entry = served_model(endpoint)
    if entry.get("canary_version") is not None:
        raise ValueError(f"{endpoint.model} at {endpoint.root} serves canary v{entry['canary_version']} to "
                         f"{entry.get('canary_percent')}% of requests beside production v{entry['production_version']}"
                         ", so the scores would mix two models: remove the canary first (stage=canary "
                         "serve.canary_percent=0)")
    return int(entry["production_version"])


def version_directory(registry_uri: str, model: str, version: int, *, cache_dir: Path) -> Path:
    """A registered version's files (its tokenizer among them), each checked against its recorded sha256."""
    from serve.registry import Registry

    registry = Registry(registry_uri)
    if model not in registry.models():
        raise ValueError(f"--registry {registry_uri} has no model {model} (models there: "
                         f"{', '.join(registry.models()) or 'none'}); name the registry the endpoint serves from")
    return registry.fetch(model, version, cache_dir=cache_dir)


def context_length(tokenizer_dir: Path) -> int:
    """The model's context, from the registered directory's model_config.json, else a Hugging Face config.json."""
    if (tokenizer_dir / "model_config.json").is_file():
        return int(read_model_config(tokenizer_dir)["model"]["max_seq_len"])
    config = tokenizer_dir / "config.json"
    if config.is_file() and "max_position_embeddings" in json.loads(config.read_text()):
        return int(json.loads(config.read_text())["max_position_embeddings"])
    raise ValueError(f"--tokenizer {tokenizer_dir} has neither model_config.json nor a config.json with "
                     "max_position_embeddings; give the model's context with --max-length")


def evaluate_endpoint(endpoint: Endpoint, *, tasks: list[str], include_path: str | Path, tokenizer: Path,
                      max_length: int | None = None, max_gen_toks: int | None = None, limit: int | None = None,
                      num_concurrent: int = 4, log_samples: bool = False) -> dict:
    """lm-eval's results for the model served at `endpoint`, through lm-eval's local-completions client."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from serve.harness_model import default_max_gen_toks

    specs = task_specs(tasks, include_path)
    max_length = max_length or context_length(Path(tokenizer))
    model_args = {"model": endpoint.model, "base_url": endpoint.completions_url, "tokenizer": str(tokenizer),
                  "tokenizer_backend": "huggingface", "max_length": max_length, "num_concurrent": num_concurrent,
                  "max_gen_toks": max_gen_toks or default_max_gen_toks(max_length), "timeout": REQUEST_TIMEOUT_S}
    lm = LocalCompletionsAPI(**model_args)
    if endpoint.api_key:  # set on the client, so the key is in no model_args and no results file
        lm.header = {"Authorization": f"Bearer {endpoint.api_key}"}
    results = _run(lm, specs, include_path=include_path, limit=limit, log_samples=log_samples)
    results["config"]["model"], results["config"]["model_args"] = "local-completions", model_args
    return results


# ------------------------------------------------------------------------------------------- reporting

def format_results(results: dict) -> str:
    """Task, metric, filter, value and stderr, one line per metric, as text for the terminal."""
    lines = [f"{'task':<24} {'metric':<16} {'filter':<12} {'value':>8} {'stderr':>8} {'n':>5}"]
    for task, scores in results["results"].items():
        count = results.get("n-samples", {}).get(task, {}).get("effective", "")
        for key, value in scores.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = _number(scores.get(f"{metric}_stderr,{filter_name}"))
            lines.append(f"{task:<24} {metric:<16} {filter_name:<12} {value:>8.4f} "
                         f"{'' if stderr is None else format(stderr, '.4f'):>8} {count:>5}")
    return "\n".join(lines)


def write_results(results: dict, path: Path) -> Path:
    """The results as JSON (what lm-eval cannot serialize, e.g. a task's functions, as text)."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path
