"""Distillation (issue 18): the loss terms, the teacher reference and its errors, and students that learn from a
registered teacher on each strategy, log the distillation term and resume.

The teachers are the session's shared runs (llm-ddp, ranker-reference), promoted into registries of this module,
so the student runs are the only training this module adds: a handful of steps each.
"""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conf.schema import DistillConfig, DistillLoss
from trainers.distill import (
    binary_distill_loss,
    build_objective,
    forward_kl,
    mixture_kl,
    reverse_kl,
    token_distill_loss,
)

# ------------------------------------------------------------------------------------------------ the losses


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("divergence", [forward_kl, reverse_kl, mixture_kl])
def test_a_student_that_matches_its_teacher_scores_zero(divergence):
    logits = _logits(2, 5, 11)
    assert divergence(logits, logits.clone(), temperature=2.0).abs().max() < 1e-6
    shifted = logits + 7.0  # a softmax does not see a constant added to every class
    assert divergence(shifted, logits, temperature=2.0).abs().max() < 1e-5


def test_forward_and_reverse_kl_differ_and_the_mixture_weighs_them():
    student, teacher = _logits(4, 11, seed=1), _logits(4, 11, seed=2)
    forward = forward_kl(student, teacher)
    reverse = reverse_kl(student, teacher)
    assert (forward > 0).all() and (reverse > 0).all()
    assert not torch.allclose(forward, reverse)
    # by hand: KL(p || q) = sum p (log p - log q)
    p, q = teacher.softmax(-1), student.softmax(-1)
    assert torch.allclose(forward, (p * (p.log() - q.log())).sum(-1), atol=1e-5)
    assert torch.allclose(reverse, (q * (q.log() - p.log())).sum(-1), atol=1e-5)
    assert torch.allclose(mixture_kl(student, teacher, forward_share=0.3), 0.3 * forward + 0.7 * reverse, atol=1e-6)
    assert torch.allclose(mixture_kl(student, teacher, forward_share=1.0), forward)


def test_the_temperature_softens_both_sides_and_the_term_is_scaled_by_its_square():
    student, teacher = _logits(3, 11, seed=3), _logits(3, 11, seed=4)
    for divergence in (forward_kl, reverse_kl):
        at_two = divergence(student, teacher, temperature=2.0)
        assert torch.allclose(at_two, 4 * divergence(student / 2, teacher / 2), atol=1e-5)
    # Softer distributions are closer: the unscaled divergence shrinks as T grows.
    assert (forward_kl(student, teacher, temperature=4.0) / 16 < forward_kl(student, teacher)).all()


def test_masked_positions_are_left_out_of_the_token_term():
    cfg = DistillConfig(loss=DistillLoss.mixture, temperature=2.0)
    student, teacher = _logits(2, 6, 11, seed=5), _logits(2, 6, 11, seed=6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.float32)
    loss = token_distill_loss(student, teacher, cfg=cfg, mask=mask)
    changed = student.clone()
    changed[mask == 0] = _logits(int((mask == 0).sum()), 11, seed=7)  # only where the mask is 0
    assert torch.allclose(token_distill_loss(changed, teacher, cfg=cfg, mask=mask), loss)
    kept = mask.bool()
    expected = mixture_kl(student[kept], teacher[kept], temperature=2.0).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert token_distill_loss(student, teacher, cfg=cfg, mask=torch.zeros_like(mask)) == 0  # no 0 / 0


def test_the_ranker_term_is_the_cross_entropy_against_the_teachers_softened_probability():
    """Forward KL of the two-class (no click, click) distributions = BCE(student / T, sigmoid(teacher / T)) less
    the teacher's entropy, times T^2: the same gradients as that cross-entropy, and 0 for a matching student."""
    student, teacher, temperature = _logits(64, seed=8), _logits(64, seed=9), 2.0
    loss = binary_distill_loss(student, teacher, cfg=DistillConfig(temperature=temperature))
    target = torch.sigmoid(teacher / temperature)
    cross_entropy = torch.nn.functional.binary_cross_entropy_with_logits(student / temperature, target,
                                                                         reduction="none")
    entropy = torch.nn.functional.binary_cross_entropy(target, target, reduction="none")
    assert torch.allclose(loss, ((cross_entropy - entropy) * temperature**2).mean(), atol=1e-5)
    assert binary_distill_loss(teacher, teacher, cfg=DistillConfig()).abs() < 1e-6


def test_the_objective_mixes_the_data_loss_and_the_term_by_distill_weight():
    data_loss, term = torch.tensor(2.0), torch.tensor(0.5)
    family = SimpleNamespace(loss=lambda model, batch: data_loss,
                             distill_losses=lambda model, teacher, batch, *, cfg: (data_loss, term))
    loss, extra = build_objective(family, teacher=torch.nn.Identity(), cfg=DistillConfig(weight=0.25))(None, {})
    assert loss.item() == pytest.approx(0.75 * 2.0 + 0.25 * 0.5)
    assert extra == {"data_loss": data_loss, "distill_loss": term}
    assert build_objective(family, teacher=None, cfg=DistillConfig())(None, {}) == (data_loss, {})


# ------------------------------------------------------------------------------------------------ the config

LLM_STUDENT = ["+exp=llm_distill", "data.max_chars=400000", "data.seq_len=64", "data.val_fraction=0.2",
               "trainer.max_steps=4", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
               "trainer.warmup_steps=1", "trainer.log_every_n_steps=1", "trainer.eval_every_n_steps=2",
               "trainer.eval_batches=2", "checkpoint.every_n_steps=2"]


def _typed(overrides):
    from tests.helpers import compose_config
    from trainers.config import config_from_dict, plain_config

    plain = plain_config(compose_config(overrides))
    return config_from_dict(plain), plain


def test_distill_loss_is_one_of_its_choices_at_composition():
    from tests.helpers import composition_error

    message = composition_error([*LLM_STUDENT, "distill.loss=js"])
    assert "full_key: distill.loss" in message
    assert f"expected one of [{', '.join(DistillLoss)}]" in message


@pytest.mark.parametrize("override, message", [
    ("distill.temperature=0", "distill.temperature=0.0 must be above 0"),
    ("distill.weight=1.5", "distill.weight=1.5 must be in [0, 1]"),
    ("distill.mixture_weight=-0.1", "distill.mixture_weight=-0.1 must be in [0, 1]"),
    ("model.teacher=registry:llm_tiny", "model.teacher='registry:llm_tiny' is not a registry reference"),
    ("model.teacher=registry:llm_tiny@v0", "model.teacher='registry:llm_tiny@v0': registry versions are numbered"),
    ("model.teacher=' '", "model.teacher is empty"),
])
def test_distill_settings_are_checked_with_the_config(override, message):
    from trainers.run import check_config

    cfg, _ = _typed([*LLM_STUDENT, override])
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        check_config(cfg)


def test_the_teacher_reference_forms():
    from conf.derived import parse_teacher

    assert parse_teacher("registry:llm_small@production") == parse_teacher("registry:llm_small@production")
    alias = parse_teacher("registry:llm_small@production")
    assert (alias.model, alias.alias, alias.version, alias.path) == ("llm_small", "production", None, None)
    version = parse_teacher("registry:llm.small-2@v12")
    assert (version.model, version.alias, version.version) == ("llm.small-2", None, 12)
    assert parse_teacher("/exports/llm_small").path == "/exports/llm_small"


def test_a_teacher_and_its_distill_settings_name_the_run_and_nothing_else_changes():
    from trainers.outputs import config_hash

    def name(*overrides):
        return config_hash(_typed([*LLM_STUDENT, *overrides])[1])

    student = name("model.teacher=null")
    assert student == name("model.teacher=null", "distill.temperature=4")  # no teacher: distill is unread
    with_teacher = name()
    assert with_teacher != student
    assert with_teacher != name("distill.temperature=4") and with_teacher != name("distill.loss=reverse_kl")
    assert with_teacher != name("model.teacher=registry:llm_tiny@v1")
    # Runs without a teacher keep the names they had before the distill block and model.teacher existed.
    _, plain = _typed([*LLM_STUDENT, "model.teacher=null"])
    del plain["distill"], plain["model"]["teacher"]
    assert config_hash(plain) == student


# ---------------------------------------------------------------------------------------- registered teachers

LLM_MODEL, RANKER_MODEL = "tiny-teacher", "ranker-teacher"


@pytest.fixture(scope="module")
def teachers(trained_runs, tmp_path_factory):
    """The session's llm-ddp and ranker-reference runs promoted into one registry: production of each model."""
    from conf.schema import ServeConfig
    from serve.promote import promote
    from tests.helpers import LLM_STRATEGY_RUNS, RANKER_REFERENCE_RUN

    root = tmp_path_factory.mktemp("teachers")
    serve_cfg = ServeConfig(registry=str(root / "registry"))
    sources = {LLM_MODEL: (trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"]), "llm_tiny"),
               RANKER_MODEL: (trained_runs("ranker-reference", RANKER_REFERENCE_RUN, ranker=True), "ranker_dlrm")}
    for model, (run_dir, experiment) in sources.items():
        event = promote(serve_cfg, model=model, source=run_dir, experiment=experiment, cache_dir=root / "cache")
        assert event["decision"] == "promoted"
    return SimpleNamespace(root=root, registry=root / "registry", llm_run=sources[LLM_MODEL][0],
                           ranker_run=sources[RANKER_MODEL][0])


def _resolve(teachers, *overrides, base=LLM_STUDENT):
    import launch

    cfg, _ = _typed([*base, f"serve.registry={teachers.registry}", f"paths.root={teachers.root}", *overrides])
    return launch.resolve_teacher(cfg)


def test_a_registry_teacher_resolves_to_its_verified_version_directory(teachers):
    by_alias = _resolve(teachers, f"model.teacher=registry:{LLM_MODEL}@production")
    by_version = _resolve(teachers, f"model.teacher=registry:{LLM_MODEL}@v1")
    assert (by_alias.model, by_alias.version) == (LLM_MODEL, 1) and by_alias.directory == by_version.directory
    by_path = _resolve(teachers, f"model.teacher={by_alias.directory}")
    assert by_path.model is None and by_path.directory == by_alias.directory
    assert (_resolve(teachers, "model.teacher=null")) is None


@pytest.mark.parametrize("teacher, message", [
    ("registry:nobody@production", "the registry .* has no model 'nobody'; its models: ranker-teacher, tiny-teacher"),
    (f"registry:{LLM_MODEL}@staging", f"model '{LLM_MODEL}' has no alias 'staging' \\(its aliases: production\\)"),
    (f"registry:{LLM_MODEL}@v9", f"model '{LLM_MODEL}' has no version 9; its versions: v1"),
    ("/no/such/export", "/no/such/export is not a directory"),
    (f"registry:{RANKER_MODEL}@production", "is a ranker model, but model.family=llm"),
])
def test_a_teacher_that_cannot_be_used_is_named(teachers, teacher, message):
    with pytest.raises(ValueError, match=f"^model.teacher={teacher}.*{message}"):
        _resolve(teachers, f"model.teacher={teacher}")


def test_a_directory_that_is_not_an_export_is_named(teachers):
    checkpoint = json.loads((teachers.llm_run / "summary.json").read_text())["best_checkpoint"]
    with pytest.raises(ValueError, match="is not an export directory \\(a training checkpoint"):
        _resolve(teachers, f"model.teacher={checkpoint}")
    with pytest.raises(ValueError, match="is not an export directory \\(no model_config.json\\)"):
        _resolve(teachers, f"model.teacher={teachers.root}")


def test_a_teacher_of_other_data_is_named(teachers):
    from trainers.distill import check_teacher_data
    from trainers.families import get_family

    llm = get_family("llm")
    teacher = _resolve(teachers, f"model.teacher=registry:{LLM_MODEL}@production")
    exported = json.loads((Path(teacher.directory) / "model_config.json").read_text())
    vocab = exported["vocab_size"]
    payload = {"model_config": {**exported, "vocab_size": vocab - 1},
               "files": {"tokenizer.json": str(Path(teacher.directory) / "tokenizer.json")}}
    with pytest.raises(ValueError, match=f"its vocab_size is {vocab}, the student's data gives {vocab - 1}"):
        check_teacher_data(teacher, family=llm, payload=payload)
    other_tokenizer = teachers.root / "tokenizer.json"
    other_tokenizer.write_text("{}")
    payload = {"model_config": exported, "files": {"tokenizer.json": str(other_tokenizer)}}
    with pytest.raises(ValueError, match="^model.teacher=.* its tokenizer file differs from the student's"):
        check_teacher_data(teacher, family=llm, payload=payload)


def test_a_ranker_teacher_with_other_tables_is_refused_before_training(teachers, data_cache, tmp_path):
    from tests.helpers import run_ranker

    overrides = [f"model.teacher=registry:{RANKER_MODEL}@production", f"serve.registry={teachers.registry}",
                 "data.cardinalities=[30,20,200,100,10,5,100,30,3,200,40,200,60,5,60,120,4,40,30,4,200,5,5,120,10,"
                 "120]"]
    with pytest.raises(ValueError, match="does not fit the student's data: its table_sizes is \\[41, 21"):
        run_ranker(tmp_path, data_cache, overrides)


# ----------------------------------------------------------------------------------------------- the students

# One tiny LLM student per kind of strategy: DDP, FSDP2 and DeepSpeed ZeRO-3. The DDP one crashes once after its
# step-2 checkpoint and resumes from it, loading its teacher again (the sharded restores are test_resume.py's).
STUDENT_STRATEGIES = {"ddp": ["strategy=ddp"], "fsdp": ["strategy=fsdp"], "zero3": ["strategy=zero3"]}
CRASH_AT = {"ddp": 3}


@pytest.fixture(scope="module")
def llm_students(teachers, data_cache, tmp_path_factory):
    """strategy -> the run directory of its student, trained on first use."""
    import os

    from tests.helpers import run_training
    from trainers.loop import CRASH_AT_STEP_ENV

    runs = {}

    def get(strategy: str):
        if strategy not in runs:
            overrides = [*STUDENT_STRATEGIES[strategy], f"model.teacher=registry:{LLM_MODEL}@production",
                         f"serve.registry={teachers.registry}", "distill.loss=mixture"]
            if strategy in CRASH_AT:
                os.environ[CRASH_AT_STEP_ENV] = str(CRASH_AT[strategy])
            try:
                runs[strategy] = run_training(tmp_path_factory.mktemp(f"student-{strategy}"), data_cache, overrides,
                                              experiment="llm_distill", base=LLM_STUDENT)
            finally:
                os.environ.pop(CRASH_AT_STEP_ENV, None)
        return runs[strategy]

    return get


@pytest.mark.parametrize("strategy", list(STUDENT_STRATEGIES))
def test_an_llm_student_learns_from_a_registry_teacher(strategy, llm_students):
    from tests.helpers import read_metrics

    run_dir = llm_students(strategy)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4
    logged = [row for row in read_metrics(run_dir) if "train_loss" in row]
    assert sorted({row["step"] for row in logged}) == [1, 2, 3, 4]
    for row in logged:  # the step's loss is the mix of its two terms, each logged
        assert row["distill_loss"] > 0 and row["data_loss"] > 0
        assert row["train_loss"] == pytest.approx(0.5 * row["data_loss"] + 0.5 * row["distill_loss"], rel=1e-4)
    assert all(math.isfinite(row["val_loss"]) for row in read_metrics(run_dir) if "val_loss" in row)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["teacher"]["model"] == LLM_MODEL and manifest["teacher"]["version"] == 1
    assert manifest["launches"][-1]["teacher"] == f"registry:{LLM_MODEL}@v1"
    # The checkpoints are the student's: its own (smaller) model config
    best = json.loads((run_dir / summary["best_checkpoint"].rsplit("/", 1)[1] / "model_config.json").read_text())
    assert best["model"]["dim"] == 64 and best["model"]["teacher"] == f"registry:{LLM_MODEL}@production"
    if strategy in CRASH_AT:
        assert (run_dir / f".crash_injected_at_{CRASH_AT[strategy]}").exists(), "the fault hook did not fire"


def test_the_strategies_compute_the_same_distillation(llm_students):
    """Same seed, data and teacher: the sharded students must follow DDP's curve, terms included (a term averaged
    where it should be summed, or taken from one rank only, would show here)."""
    from tests.helpers import read_metrics

    def terms(strategy):
        rows = {row["step"]: row for row in read_metrics(llm_students(strategy)) if "train_loss" in row}
        return {(step, key): rows[step][key] for step in rows for key in ("train_loss", "distill_loss", "data_loss")}

    reference = terms("ddp")
    for strategy in ("fsdp", "zero3"):
        assert terms(strategy) == pytest.approx(reference, rel=1e-4), strategy


def test_a_ranker_student_learns_from_a_registry_teacher_and_a_moved_alias_is_not_resumed(teachers, data_cache,
                                                                                          tmp_path):
    from serve.registry import Registry
    from tests.helpers import read_metrics, run_ranker

    overrides = [f"model.teacher=registry:{RANKER_MODEL}@production", f"serve.registry={teachers.registry}",
                 "model.top_mlp=[32]", "distill.loss=forward_kl"]
    run_dir = run_ranker(tmp_path, data_cache, overrides)
    rows = read_metrics(run_dir)
    assert all(row["distill_loss"] >= 0 for row in rows if "train_loss" in row)
    assert [row["step"] for row in rows if "auc" in row] == [4, 8]
    assert run_ranker(tmp_path, data_cache, overrides) == run_dir  # finished: the same command does not retrain

    # Production moves to another version: the same command would learn from another teacher.
    registry = Registry(teachers.registry)
    export = tmp_path / "same_export"  # the same files as a new version: the registry's own records left behind
    shutil.copytree(registry.fetch(RANKER_MODEL, 1, cache_dir=teachers.root / "cache"), export,
                    ignore=shutil.ignore_patterns("claim.json", "version.json"))
    again = registry.register(RANKER_MODEL, export, metadata={})["version"]
    registry.move_alias(RANKER_MODEL, "production", again, reason="a newer teacher")
    try:
        with pytest.raises(ValueError, match=f"the teacher \\(registry:{RANKER_MODEL}@v1 -> registry:{RANKER_MODEL}"
                                             f"@v{again}\\) changed"):
            run_ranker(tmp_path, data_cache, overrides)
    finally:
        registry.move_alias(RANKER_MODEL, "production", 1, reason="back to the first teacher")
