"""Loading a checkpoint runs no code from it: each strategy's files, crafted to call a function when unpickled,
are refused with an error naming the file, and the function never runs (its marker file stays absent)."""

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from conf.schema import Precision
from tests.helpers import one_rank_group
from trainers.safe_loading import CheckpointRefused, _AllowListUnpickler, install_safe_deepspeed_loader
from trainers.strategies import build_strategy, default_options, get_strategy


class _Exploit:
    """Unpickling it touches `marker`: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickle_op_string(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


def test_dotted_names_cannot_reach_through_an_allowed_module():
    # The reproduction: STACK_GLOBAL of an allowed module and "os.getpid", then call it.
    payload = (b"\x80\x04" + _pickle_op_string("torch.distributed.checkpoint.filesystem")
               + _pickle_op_string("os.getpid") + b"\x93)R.")
    with pytest.raises(pickle.UnpicklingError, match="os.getpid, which is not on the allow-list"):
        _AllowListUnpickler(io.BytesIO(payload)).load()


def test_only_exact_pairs_of_an_allowed_module_resolve(tmp_path):
    payload = (b"\x80\x04" + _pickle_op_string("torch.distributed.checkpoint.filesystem")
               + _pickle_op_string("os") + b"\x93.")
    with pytest.raises(pickle.UnpicklingError, match="filesystem.os"):
        _AllowListUnpickler(io.BytesIO(payload)).load()


@pytest.fixture
def world_of_one():
    with one_rank_group():
        yield


def _strategy(name: str):
    strategy = build_strategy(default_options(name), device=torch.device("cpu"), precision=Precision.fp32,
                              accum_steps=1, grad_clip=1.0, micro_batch_size=2)
    blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    strategy.setup(nn.Sequential(*blocks), blocks=blocks, weight_decay=0.0,
                   build_optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3),
                   build_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    strategy.unwrapped_model()(torch.randn(2, 4)).sum().backward()
    strategy.step()
    return strategy


def test_ddp_resume_and_export_refuse_a_crafted_file(world_of_one, tmp_path):
    marker = tmp_path / "ran"
    strategy = _strategy("ddp")
    strategy.save_state(tmp_path, rank=0)
    torch.save({"state": {}, "param_groups": [_Exploit(marker)]}, tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointRefused, match=f"{tmp_path / 'optimizer.pt'}: refused to load"):
        strategy.load_state(tmp_path)
    torch.save({"0.weight": _Exploit(marker)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointRefused, match=f"{tmp_path / 'model.pt'}: refused to load"):
        get_strategy("ddp").checkpoint.consolidate(tmp_path, {})
    assert not marker.exists()


def test_fsdp_resume_refuses_a_crafted_optimizer_item(world_of_one, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    marker = tmp_path / "ran"
    strategy = _strategy("fsdp")
    strategy.save_state(tmp_path, rank=0)
    model_state, optim_state = get_state_dict(strategy.model, strategy.optimizer)
    optim_state["param_groups"][0]["lr"] = _Exploit(marker)  # DCP stores non-tensor items as pickled bytes
    dcp.save({"model": model_state, "optimizer": optim_state},
             storage_writer=dcp.FileSystemWriter(str(tmp_path / "dcp"), overwrite=True))
    with pytest.raises(CheckpointRefused, match=rf"{tmp_path / 'dcp'}/__0_0\.distcp: refused to load: "
                                                r"optimizer\.param_groups"):
        strategy.load_state(tmp_path)
    assert not marker.exists()
    strategy.save_state(tmp_path, rank=0)  # an honest checkpoint still loads through the same planner
    strategy.load_state(tmp_path)


def test_zero_resume_and_export_refuse_a_crafted_state_file(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "ran"
    state_dir = tmp_path / "deepspeed" / "state"
    state_dir.mkdir(parents=True)
    crafted = state_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "buffer_names": _Exploit(marker)}, crafted)

    class Engine:  # the attribute DeepSpeed's engine loads every state file through
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    install_safe_deepspeed_loader(engine)
    with pytest.raises(CheckpointRefused, match=f"{crafted}: refused to load"):
        engine.checkpoint_engine.load(str(crafted))
    with pytest.raises(CheckpointRefused, match=f"{crafted}: refused to load: it refers to posix.system"):
        get_strategy("zero3").checkpoint.consolidate(tmp_path, {})
    assert not marker.exists()
