"""lm-evaluation-harness on Slipway's LLMs (issue 15 item 7): scripts/eval_lm.py scores the served tiny chat model
on a local log-likelihood task and a local generation task (task YAML + jsonl, nothing downloaded), and both
scores are checked against transformers on the registered directory; the eval gate gates on such a score
(serve.gate_metric), records it in the registry history, and its in-process score is the endpoint's.
"""

import json
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conf.derived import check_serve, parse_gate_metric
from conf.schema import ServeConfig
from serve import harness
from tests.helpers import REPO_ROOT

EXAMPLE_TASKS = REPO_ROOT / "scripts" / "lm_eval_tasks"
CHOICE, QA, GEN = "slipway_choice", "slipway_qa", "continue_text"
# Prompts on which the tiny fine-tuned model's greedy continuations differ (it repeats itself, or ends at once)
PROMPTS = ["The quick brown fox", "def add(a, b", "import os", "clouds carry the water", "I am fine, thank",
           "A quick brown", "Hello there friend", "Use a"]
WRONG = "zzzz"  # a target no answer here matches
# A generation task of the test's own: its targets are written once the model's answers are known.
GEN_TASK = f"""task: {GEN}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {GEN}.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", ","]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: ["\\\\s+"]
"""


# ------------------------------------------------------------------------------ references (transformers)

@pytest.fixture(scope="module")
def reference(served_chat_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = served_chat_llm.export_dir
    return SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(directory),
                           model=AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval())


def loglikelihood(reference, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) from transformers' full forward, tokenized as lm-eval does (no BOS; the
    whole text encoded once and split where the context's tokens end)."""
    whole = reference.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(reference.tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(reference.model(torch.tensor([whole])).logits[0].float(), dim=-1)
    rows, targets = logprobs[start - 1 : -1], torch.tensor(whole[start:])
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def greedy_answer(reference, prompt: str, *, max_new_tokens: int, until: list[str]) -> str:
    ids = torch.tensor([reference.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        generated = reference.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:]
    text = reference.tokenizer.decode(generated, skip_special_tokens=True)
    cut = min([text.index(stop) for stop in until if stop in text], default=len(text))
    return text[:cut]


def normalized(text: str, *, punctuation: bool = True) -> str:
    """What the tasks' exact_match compares: case and whitespace ignored (and punctuation, for slipway_qa)."""
    text = re.sub(r"\s+", "", text).lower()
    return text.translate(str.maketrans("", "", string.punctuation)) if punctuation else text


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, reference):
    """The example tasks as shipped, copied away from the repo with their data beside them (so relative
    data_files must resolve against the YAML's directory), and a generation task whose targets are the model's
    own greedy continuations (from transformers) for every other prompt and a wrong answer for the rest, so its
    exact_match has a known value that is neither 0 nor 1. Holds the expected answers and scores."""
    directory = tmp_path_factory.mktemp("lm_eval_tasks") / "tasks"
    directory.mkdir()
    for name in (f"{CHOICE}.yaml", f"{CHOICE}.jsonl", f"{QA}.yaml", f"{QA}.jsonl"):
        shutil.copy(EXAMPLE_TASKS / name, directory / name)
    qa_docs = [json.loads(line) for line in (directory / f"{QA}.jsonl").read_text().splitlines()]
    qa = {doc["question"]: greedy_answer(reference, f"Q: {doc['question']}\nA:", max_new_tokens=16,
                                         until=["\n", "Q:"]) for doc in qa_docs}
    qa_score = sum(normalized(qa[doc["question"]]) == normalized(doc["answer"]) for doc in qa_docs) / len(qa_docs)
    answers = {prompt: greedy_answer(reference, prompt, max_new_tokens=12, until=["\n", ","]) for prompt in PROMPTS}
    scored = [prompt for prompt in PROMPTS if normalized(answers[prompt], punctuation=False)]
    assert len(scored) >= 4, answers
    docs = [{"prompt": p, "answer": answers[p] if i % 2 == 0 else WRONG} for i, p in enumerate(scored)]
    (directory / f"{GEN}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (directory / f"{GEN}.yaml").write_text(GEN_TASK)
    return SimpleNamespace(path=directory, answers={**qa, **answers}, qa_exact_match=qa_score,
                           exact_match=sum(i % 2 == 0 for i in range(len(docs))) / len(docs), documents=len(docs))


# ------------------------------------------------------------------------------ the script, over HTTP

def eval_lm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "eval_lm.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def endpoint_results(served_chat_llm, fine_tuned_llm, task_dir, tmp_path_factory):
    """scripts/eval_lm.py, run as a user runs it (from another directory), on both tasks of `task_dir`."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    out = cwd / "results.json"
    done = eval_lm("--base-url", served_chat_llm.url, "--model", served_chat_llm.model, "--registry",
                   str(fine_tuned_llm.registry), "--include-path", str(task_dir.path), "--tasks", CHOICE, QA, GEN,
                   "--output", str(out), "--log-samples", "--num-concurrent", "2", cwd=cwd)
    assert done.returncode == 0, done.stderr[-4000:]
    print(done.stdout)  # the table, shown by pytest -rP
    return SimpleNamespace(stdout=done.stdout, results=json.loads(out.read_text()), path=out)


def test_the_script_prints_a_table_and_writes_the_results(endpoint_results, served_chat_llm):
    stdout, results = endpoint_results.stdout, endpoint_results.results
    assert f"evaluating {served_chat_llm.model} v1 at {served_chat_llm.url}/v1/completions" in stdout
    assert re.search(rf"^{CHOICE}\s+acc\s+none\s+\d\.\d{{4}}\s+\d\.\d{{4}}\s+8$", stdout, re.M), stdout
    assert re.search(rf"^{QA}\s+exact_match\s+none\s+\d\.\d{{4}}", stdout, re.M), stdout
    assert f"results: {endpoint_results.path}" in stdout
    assert results["slipway"] == {"model": served_chat_llm.model, "version": 1, "base_url": served_chat_llm.url}
    assert results["config"]["model"] == "local-completions"
    assert results["config"]["model_args"]["tokenizer_backend"] == "huggingface"
    assert {"acc,none", "acc_norm,none"} <= set(results["results"][CHOICE])
    assert "exact_match,none" in results["results"][QA]


def test_the_loglikelihood_task_scores_what_transformers_computes(endpoint_results, reference):
    """Every choice's log-likelihood is transformers' (the served replica's KV-cached prefill, over HTTP), and
    the accuracy is the share of questions whose labelled choice has the highest."""
    samples = endpoint_results.results["samples"][CHOICE]
    assert len(samples) == 8
    correct = []
    for sample in samples:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        expected = [loglikelihood(reference, context, f" {choice}") for choice in doc["choices"]]
        served = [response[0] for response in sample["resps"]]
        assert [s[0] for s in served] == pytest.approx([e[0] for e in expected], abs=1e-3)
        assert [s[1] for s in served] == [e[1] for e in expected]
        correct.append(max(range(len(expected)), key=lambda i: expected[i][0]) == doc["label"])
    assert endpoint_results.results["results"][CHOICE]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_the_generation_tasks_score_transformers_greedy_answers(endpoint_results, task_dir):
    """Each answer is transformers' greedy continuation cut at the task's `until` (or at the end-of-turn token),
    and exact_match counts the targets that were the model's own answers."""
    results = endpoint_results.results
    for task, key in ((QA, "question"), (GEN, "prompt")):
        for sample in results["samples"][task]:
            assert sample["resps"][0][0] == task_dir.answers[sample["doc"][key]], sample
    assert len(results["samples"][GEN]) == task_dir.documents
    assert results["results"][GEN]["exact_match,none"] == pytest.approx(task_dir.exact_match)
    assert 0 < task_dir.exact_match < 1
    assert results["results"][QA]["exact_match,none"] == pytest.approx(task_dir.qa_exact_match)


def test_lm_evals_own_cli_scores_the_served_model_as_the_readme_shows(served_chat_llm, task_dir, endpoint_results,
                                                                       tmp_path):
    """The issue's user story: `lm_eval --model local-completions --model_args base_url=.../v1/completions,...`
    run from the task directory, tokenizing with the registered directory: the same accuracy as the script."""
    model_args = (f"base_url={served_chat_llm.url}/v1/completions,model={served_chat_llm.model},"
                  f"tokenizer={served_chat_llm.export_dir},tokenizer_backend=huggingface,max_length=256,"
                  "num_concurrent=2")
    done = subprocess.run([str(Path(sys.executable).with_name("lm_eval")), "--model", "local-completions",
                           "--tasks", CHOICE, "--include_path", ".", "--model_args", model_args, "--output_path",
                           str(tmp_path / "out")], cwd=task_dir.path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (results_file,) = (tmp_path / "out").glob("**/results_*.json")
    ours = endpoint_results.results["results"][CHOICE]
    assert json.loads(results_file.read_text())["results"][CHOICE]["acc,none"] == ours["acc,none"]


def test_the_script_names_what_is_wrong(served_chat_llm, fine_tuned_llm, task_dir, tmp_path):
    base = ["--base-url", served_chat_llm.url, "--registry", str(fine_tuned_llm.registry), "--include-path",
            str(task_dir.path), "--output", str(tmp_path / "out.json")]
    done = eval_lm(*base, "--model", "nope", "--tasks", CHOICE, cwd=tmp_path)
    assert done.returncode == 2 and f"--model nope: not served at {served_chat_llm.url} (served: " \
        f"{served_chat_llm.model})" in done.stderr, done.stderr
    done = eval_lm(*base, "--model", served_chat_llm.model, "--tasks", "hellaswag", cwd=tmp_path)
    assert done.returncode == 2 and "no lm-eval task 'hellaswag'" in done.stderr, done.stderr
    assert f"tasks there: {GEN}, {CHOICE}, {QA}" in done.stderr
    done = eval_lm(*base[2:], "--base-url", "http://127.0.0.1:9", "--model", "m", "--tasks", CHOICE, cwd=tmp_path)
    assert done.returncode == 2 and "nothing answers at http://127.0.0.1:9/v1/models" in done.stderr, done.stderr
    done = eval_lm(*base, "--model", served_chat_llm.model, "--tasks", CHOICE, "--api-key-env", "SLIPWAY_NO_SUCH",
                   cwd=tmp_path)
    assert done.returncode == 2 and "SLIPWAY_NO_SUCH is unset or empty" in done.stderr, done.stderr
    assert not (tmp_path / "out.json").exists()


# ------------------------------------------------------------------------------ the gate, in-process

@pytest.fixture(scope="module")
def gated(imported_llm, fine_tuned_llm, task_dir, tmp_path_factory):
    """A registry of its own: the imported checkpoint promoted first (no production yet), then the fine-tuned
    one, gated against it on slipway_choice's accuracy."""
    from serve.promote import promote
    from serve.registry import Registry

    root = tmp_path_factory.mktemp("gated")
    serve_cfg = ServeConfig(registry=str(root / "registry"), gate_metric=f"lm_eval:{CHOICE}:acc",
                            gate_tasks=str(task_dir.path), min_improvement=-1.0)  # -1: any score passes
    first = promote(serve_cfg, model="gated", source=imported_llm.run_dir, experiment="t", cache_dir=root)
    second = promote(serve_cfg, model="gated", source=fine_tuned_llm.run_dir, experiment="t", cache_dir=root)
    return SimpleNamespace(registry=Registry(root / "registry"), first=first, second=second, root=root)


def test_the_gate_records_the_lm_eval_metric_and_both_values(gated, task_dir):
    metric = f"lm_eval:{CHOICE}:acc"
    assert gated.first["decision"] == "promoted" and gated.first["production"] is None
    assert gated.second["challenger"] == 2 and gated.second["production"] == 1
    gates = [event for event in gated.registry.history("gated") if event["event"] == "gate"]
    assert len(gates) == 2
    recorded = gates[-1]
    print(json.dumps(recorded, indent=1))  # shown by pytest -rP
    assert recorded["metric"] == metric and recorded["mode"] == "max" and recorded["decision"] == "promoted"
    assert recorded["challenger_value"] == gated.second["challenger_value"]
    assert recorded["production_value"] == gates[0]["challenger_value"]  # v1 scored the same both times
    assert all(isinstance(recorded[key], float) and 0 <= recorded[key] <= 1
               for key in ("challenger_value", "production_value"))
    assert recorded["evaluation"]["documents"] == 8 and recorded["evaluation"]["tasks"] == str(task_dir.path)
    assert recorded["evaluation"]["challenger_stderr"] is not None
    assert metric in recorded["reason"] and gated.registry.resolve("gated", "production") == 2


def test_the_gates_in_process_score_is_the_endpoints(gated, endpoint_results, task_dir):
    """v2 of the gated registry holds the weights the endpoint serves (the same checkpoint, exported in fp32):
    the gate's number is the endpoint's, and so is every document's score and answer."""
    assert gated.second["challenger_value"] == endpoint_results.results["results"][CHOICE]["acc,none"]
    directory = gated.registry.fetch("gated", 2, cache_dir=gated.root)
    local = harness.evaluate_export(directory, version=2, tasks=[CHOICE, QA, GEN], include_path=task_dir.path,
                                    log_samples=True)
    for task in (CHOICE, QA, GEN):
        served = {s["doc_id"]: s["resps"] for s in endpoint_results.results["samples"][task]}
        for sample in local["samples"][task]:
            if task != CHOICE:
                assert sample["resps"] == served[sample["doc_id"]]
                continue
            ours = [response[0] for response in sample["resps"]]
            theirs = [response[0] for response in served[sample["doc_id"]]]
            assert [o[0] for o in ours] == pytest.approx([t[0] for t in theirs], abs=1e-4)
            assert [o[1] for o in ours] == [t[1] for t in theirs]
        for key, value in endpoint_results.results["results"][task].items():
            if "," in key and "_stderr" not in key:
                assert local["results"][task][key] == pytest.approx(value), key


# ---------------------------------------------------------------------------- config, before anything runs

def serve_check(*, family: str = "llm", **serve) -> None:
    check_serve(SimpleNamespace(serve=ServeConfig(**serve), model=SimpleNamespace(family=family)))


@pytest.mark.parametrize("serve, says", [
    ({"gate_metric": "acc"}, "must be lm_eval:TASK:METRIC[,FILTER]"),
    ({"gate_metric": "lm_eval:slipway_choice"}, "must be lm_eval:TASK:METRIC[,FILTER]"),
    ({"gate_metric": f"lm_eval:{CHOICE}:acc"}, "needs serve.gate_tasks=DIR"),
    ({"gate_metric": "lm_eval:hellaswag:acc", "gate_tasks": str(EXAMPLE_TASKS)},
     f"no lm-eval task 'hellaswag' in {EXAMPLE_TASKS} (tasks there: {CHOICE}, {QA})"),
    ({"gate_metric": f"lm_eval:{CHOICE}:f1", "gate_tasks": str(EXAMPLE_TASKS)}, "reports acc, acc_norm, not f1"),
    ({"gate_metric": f"lm_eval:{CHOICE}:acc,strict", "gate_tasks": str(EXAMPLE_TASKS)},
     "under the filters none, not strict"),
    ({"gate_metric": f"lm_eval:{CHOICE}:acc", "gate_tasks": "/no/such/dir"}, "serve.gate_tasks=/no/such/dir is not"),
    ({"gate_mode": "max"}, "serve.gate_mode is set but serve.gate_metric is null"),
    ({"gate_tasks": str(EXAMPLE_TASKS)}, "serve.gate_tasks is set but serve.gate_metric is null"),
])
def test_a_bad_gate_metric_is_named_before_anything_runs(serve, says):
    with pytest.raises(ValueError) as caught:
        serve_check(**serve)
    assert says in str(caught.value)


def test_a_ranker_cannot_gate_on_an_lm_eval_task():
    with pytest.raises(ValueError, match="model.family=ranker is not one: leave serve.gate_metric null"):
        serve_check(family="ranker", gate_metric=f"lm_eval:{CHOICE}:acc", gate_tasks=str(EXAMPLE_TASKS))


def test_a_good_gate_metric_passes_and_its_direction_is_the_tasks():
    from conf.derived import check_gate_metric

    def cfg(**serve):
        return SimpleNamespace(serve=ServeConfig(gate_tasks=str(EXAMPLE_TASKS), **serve),
                               model=SimpleNamespace(family="llm"))

    assert check_gate_metric(cfg(gate_metric=f"lm_eval:{QA}:exact_match")) == "max"
    assert check_gate_metric(cfg(gate_metric=f"lm_eval:{CHOICE}:acc_norm,none", gate_mode="min")) == "min"
    assert parse_gate_metric(f"lm_eval:{QA}:exact_match").key == "exact_match,none"


def test_relative_data_files_resolve_against_the_yaml_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (spec,) = harness.task_specs([CHOICE], EXAMPLE_TASKS)
    assert spec["dataset_kwargs"]["data_files"] == {"test": str(EXAMPLE_TASKS / f"{CHOICE}.jsonl")}
    assert spec["task"] == CHOICE and spec["output_type"] == "multiple_choice"
