"""Knowledge distillation: a student learns from a frozen teacher's logits as well as from the data.

A training step minimizes (1 - distill.weight) x the family's own loss + distill.weight x a divergence between
the teacher's and the student's distributions, both softened by the temperature T, times T^2 (Hinton et al.,
2015: the softened targets' gradients shrink as 1/T^2, and the scale keeps distill.weight meaning the same at
any temperature).

LLMs compare next-token distributions position by position, skipping the positions their own loss skips (the
prompt of a fine-tuning row). Rankers compare each row's two-class distribution (no click, click): there forward
KL is the cross-entropy of the student's softened logit against the teacher's softened click probability less
the teacher's entropy, a constant, so the gradients are those of that cross-entropy and a student that matches
its teacher scores 0.

Where the teacher comes from: launch.py resolves model.teacher on the driver to a verified local export
directory (TeacherSource); the run checks it against the student's prepared data (check_teacher_data) and every
worker loads it whole (load_teacher), beside the strategy's model rather than inside it.
"""

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from conf.derived import TEACHER_SYNTAX
from conf.schema import DistillConfig, DistillLoss
from trainers.families import Batch, Family

# (model, batch) -> (the loss to minimize, {metric name: detached scalar} logged beside train_loss)
Objective = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


# ------------------------------------------------------------------------------------------------ the losses

def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions at each position (the last dimension holds the
    classes), times T^2. Mass the teacher gives a class the student lacks costs most: the student spreads."""
    student, teacher = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1) * temperature**2


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) at each position, times T^2: mass the student puts where the teacher has little costs
    most, so the student settles on the teacher's main modes (MiniLLM, Gu et al., 2024)."""
    student, teacher = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return F.kl_div(teacher, student, log_target=True, reduction="none").sum(-1) * temperature**2


def mixture_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
               forward_share: float = 0.5) -> torch.Tensor:
    """forward_share x forward KL + (1 - forward_share) x reverse KL, at each position."""
    forward = forward_kl(student_logits, teacher_logits, temperature=temperature)
    reverse = reverse_kl(student_logits, teacher_logits, temperature=temperature)
    return forward_share * forward + (1 - forward_share) * reverse


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, cfg: DistillConfig) -> torch.Tensor:
    """distill.loss at each position, at distill.temperature."""
    if cfg.loss == DistillLoss.forward_kl:
        return forward_kl(student_logits, teacher_logits, temperature=cfg.temperature)
    if cfg.loss == DistillLoss.reverse_kl:
        return reverse_kl(student_logits, teacher_logits, temperature=cfg.temperature)
    if cfg.loss == DistillLoss.mixture:
        return mixture_kl(student_logits, teacher_logits, temperature=cfg.temperature,
                          forward_share=cfg.mixture_weight)
    raise ValueError(f"distill.loss={cfg.loss!r} is not one of {', '.join(DistillLoss)}")


def token_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, cfg: DistillConfig,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean divergence over the positions of (rows, positions, vocabulary) logits that `mask` keeps (all when
    None), averaged the way the family's token loss is: over this micro-batch's trained positions."""
    per_position = divergence(student_logits, teacher_logits, cfg=cfg)
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    # clamp: a micro-batch without trained positions gives 0 (and no gradient), as the family's loss does
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def binary_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                        cfg: DistillConfig) -> torch.Tensor:
    """The mean divergence of per-row click logits, each read as the two-class distribution softmax([0, logit])
    = (1 - sigmoid(logit), sigmoid(logit))."""
    return divergence(_two_classes(student_logits), _two_classes(teacher_logits), cfg=cfg).mean()


def _two_classes(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.stack([torch.zeros_like(logits), logits], dim=-1)


def build_objective(family: Family, *, teacher: nn.Module | None, cfg: DistillConfig) -> Objective:
    """What a training step minimizes: the family's loss alone without a teacher; with one, the mix of the
    family's loss and its distillation term, both also returned (detached) as the metrics data_loss and
    distill_loss, since train_loss is then the mix."""
    if teacher is None:
        return lambda model, batch: (family.loss(model, batch), {})

    def objective(model: nn.Module, batch: Batch):
        data_loss, term = family.distill_losses(model, teacher, batch, cfg=cfg)
        loss = (1 - cfg.weight) * data_loss + cfg.weight * term
        return loss, {"data_loss": data_loss.detach(), "distill_loss": term.detach()}

    return objective


# ----------------------------------------------------------------------------------------------- the teacher

@dataclass(frozen=True)
class TeacherSource:
    """model.teacher resolved on the driver (launch.py): what the workers load and the manifest records."""

    reference: str  # model.teacher as written
    directory: str  # a local export directory; a registry version's files were verified when fetched
    model: str | None = None  # the registry model and version, for a registry reference
    version: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def identity(self) -> str:
        """What the run learned from: a resumed run must learn from the same (an alias may have moved since)."""
        return f"registry:{self.model}@v{self.version}" if self.model else str(Path(self.directory).resolve())


def read_teacher_config(directory: Path, *, reference: str, family: str) -> dict:
    """The teacher export's model_config.json, refused unless `directory` is an export of a `family` model."""
    from trainers.checkpointing import TRAIN_STATE_FILE
    from trainers.exported import read_model_config
    from trainers.families import get_family

    directory = Path(directory)
    try:
        config = read_model_config(directory)
    except FileNotFoundError:
        raise ValueError(f"model.teacher={reference}: {directory} is not an export directory (no model_config.json); "
                         f"expected {TEACHER_SYNTAX}") from None
    if config["family"] != family:
        raise ValueError(f"model.teacher={reference} is a {config['family']} model, but model.family={family}: "
                         f"a teacher must be of the student's family")
    # A training checkpoint has a model_config.json too, but its weights are the strategy's (maybe sharded). An
    # optimized child keeps its weights in its method's layout, which its loader knows.
    identity = get_family(family).export_layout.identity_file
    if (directory / TRAIN_STATE_FILE).exists() or ("derived" not in config and not (directory / identity).is_file()):
        raise ValueError(f"model.teacher={reference}: {directory} is not an export directory (a training checkpoint, "
                         f"or no {identity}); export it with stage=promote, or name a registry version: "
                         f"{TEACHER_SYNTAX}")
    return config


def check_teacher_data(teacher: TeacherSource, *, family: Family, payload: dict) -> None:
    """The teacher's logits must mean what the student's do: the data facts `family.teacher_matches` names
    (vocabulary and tokenizer, or dense features and tables) equal in the teacher's export and in what the
    student's prepared data gives (`payload`: family.checkpoint_payload). A side file compares by content."""
    directory = Path(teacher.directory)
    config = read_teacher_config(directory, reference=teacher.reference, family=family.name)
    student = payload["model_config"]
    for key in family.teacher_matches:
        theirs, ours = config.get(key), student.get(key)
        if key in family.asset_keys:
            theirs, ours = _sha256(directory / str(theirs)), _sha256(Path(payload["files"][ours]))
            shown = f"its {key} file differs from the student's ({theirs[:12]} against {ours[:12]})"
        else:
            shown = f"its {key} is {theirs}, the student's data gives {ours}"
        if theirs != ours:
            raise ValueError(f"model.teacher={teacher.reference} does not fit the student's data: {shown}; expected "
                             f"a teacher trained on the same data ({', '.join(family.teacher_matches)} equal)")


def _sha256(path: Path) -> str:
    if not path.is_file():
        return "missing"
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def load_teacher(record: dict | None, *, device: torch.device) -> nn.Module | None:
    """The teacher on this worker's device, in eval mode and without gradients, or None without one.

    Whole on every worker and outside the strategy: it is never trained, so it has no optimizer state, no
    gradients and no place in the checkpoint. That suits the tiny LLMs and the rankers; a teacher too large to
    hold on each device would want sharding (FSDP2 without an optimizer, or ZeRO-3 inference)."""
    if record is None:
        return None
    from trainers.exported import load_exported_model

    model, _ = load_exported_model(Path(record["directory"]), device=device)
    return model
