"""Fast checks of the pieces around the loop: schedule, run naming, safe checkpoint loading."""

import io
import os
import pickle

import pytest

from tests.helpers import compose_config
from trainers.optim import lr_multiplier
from trainers.outputs import config_hash, run_name
from trainers.safe_loading import _AllowListUnpickler


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    schedule = dict(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_multiplier(0, **schedule) == pytest.approx(0.1)
    assert lr_multiplier(9, **schedule) == pytest.approx(1.0)
    assert lr_multiplier(60, **schedule) == pytest.approx(0.55)
    assert lr_multiplier(110, **schedule) == pytest.approx(0.1)
    assert lr_multiplier(500, **schedule) == pytest.approx(0.1)


def _plain(overrides):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config(["+exp=llm_tiny", *overrides]), resolve=True)


def test_run_name_ignores_logging_and_paths_but_not_training_settings():
    base = _plain([])
    assert run_name(base, experiment="llm_tiny").startswith("llm_tiny-")
    assert config_hash(base) == config_hash(_plain(["logger=wandb", "paths.root=/elsewhere"]))
    assert config_hash(base) == config_hash(_plain(["trainer.log_every_n_steps=3"]))
    assert config_hash(base) != config_hash(_plain(["trainer.max_steps=7"]))
    assert config_hash(base) != config_hash(_plain(["strategy=fsdp"]))
    # The default launcher leaves the names runs had before it existed; a run without Ray is named apart.
    without_launcher = {**base, "cluster": {key: value for key, value in base["cluster"].items() if key != "launcher"}}
    assert config_hash(base) == config_hash(without_launcher)
    assert config_hash(base) != config_hash(_plain(["cluster.launcher=processes"]))


def test_unknown_key_fails_at_composition():
    with pytest.raises(Exception, match="lrr"):
        compose_config(["+exp=llm_tiny", "trainer.lrr=1"])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_metadata_loader_refuses_arbitrary_objects():
    with pytest.raises(pickle.UnpicklingError, match="allow-list"):
        _AllowListUnpickler(io.BytesIO(pickle.dumps(_Exploit()))).load()


def test_checkpoint_metadata_loader_reads_dcp_metadata():
    import torch
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    metadata = Metadata(state_dict_metadata={"w": TensorStorageMetadata(
        properties=__import__("torch").distributed.checkpoint.metadata.TensorProperties(dtype=torch.float32),
        size=torch.Size([2, 3]), chunks=[])})
    loaded = _AllowListUnpickler(io.BytesIO(pickle.dumps(metadata))).load()
    assert loaded.state_dict_metadata["w"].size == torch.Size([2, 3])


def test_a_cpu_run_too_big_for_memory_is_refused_before_ray(monkeypatch):
    from collections import namedtuple

    import psutil
    from omegaconf import OmegaConf

    from trainers.run import check_memory_fits

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    memory = namedtuple("memory", "total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(total=24 * 2**30))
    cfg = OmegaConf.to_object(compose_config(["+exp=ranker_dlrm_large"]))
    data = {"num_dense": 13, "table_sizes": list(cfg.data.hash_buckets)}
    with pytest.raises(ValueError, match=r"11.39B parameters.* need about 170 GiB, more than this machine's 24 GiB"):
        check_memory_fits(cfg, data=data)
    small = OmegaConf.to_object(compose_config(["+exp=ranker_dlrm"]))
    check_memory_fits(small, data={"num_dense": 13, "table_sizes": [101] * 26})  # fits: no error
