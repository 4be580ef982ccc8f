"""The speed options of training (trainers/strategies/common.py, trainers/loop.py): compiled blocks, selective
and full activation checkpointing, fused AdamW and FSDP2's prefetch, each under the strategies that wrap the
blocks afterwards. They change how a step runs, never what it computes: every case here trains three steps
and must match the eager, unfused, uncheckpointed run of the same strategy."""

import pytest
import torch

from conf.schema import LLMConfig, TrainerConfig
from tests.helpers import one_rank_group
from trainers import llm, optim
from trainers.families import get_family
from trainers.strategies import build_strategy, default_options
from trainers.strategies.common import block_preparer
from trainers.strategies.fsdp import FSDPConfig, set_prefetch

TINY = LLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=32)
VOCAB = 100


@pytest.fixture(scope="module")
def world_of_one():
    with one_rank_group():
        yield


def _train_three_steps(strategy_name: str, *, compile: bool = False, fused: bool = False,
                       checkpointing: str | None = None, prefetch: int = 1) -> tuple[list[float], object]:
    options = FSDPConfig(fsdp_prefetch_blocks=prefetch) if strategy_name == "fsdp" else default_options(strategy_name)
    strategy = build_strategy(options, device=torch.device("cpu"), precision="fp32", accum_steps=1, grad_clip=1.0,
                              micro_batch_size=4)
    torch.manual_seed(0)
    with strategy.init_context(pretrained=False):
        model = llm.build_llm(TINY, vocab_size=VOCAB)
    trainer = TrainerConfig(lr=1e-3, warmup_steps=0)
    strategy.setup(model, blocks=model.layers, weight_decay=0.1,
                   build_optimizer=lambda groups: optim.build_optimizer(groups, trainer, fused=fused),
                   build_scheduler=lambda optimizer: optim.build_scheduler(optimizer, trainer),
                   prepare_blocks=block_preparer(checkpointing=checkpointing is not None,
                                                 selective=checkpointing == "selective", compile=compile))
    tokens = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    loss_of = get_family("llm").loss
    losses = []
    for _ in range(3):
        with strategy.micro_step(is_last=True), strategy.autocast():
            loss = loss_of(strategy.model, {"tokens": tokens})
        strategy.backward(loss)
        strategy.step()
        losses.append(loss.item())
    return losses, strategy


@pytest.mark.parametrize("strategy_name", ["ddp", "fsdp", "zero2"])
def test_compiled_checkpointed_blocks_and_fused_adamw_train_like_eager(strategy_name, world_of_one):
    from torch._dynamo.utils import counters

    eager, _ = _train_three_steps(strategy_name)
    torch._dynamo.reset()  # compile afresh: a graph cached from another case would be reused uncounted
    counters.clear()
    tuned, strategy = _train_three_steps(strategy_name, compile=True, fused=True, checkpointing="selective",
                                         prefetch=2)
    assert tuned == pytest.approx(eager, rel=1e-5)
    assert eager[-1] < eager[0]  # it trained
    model = strategy.unwrapped_model()
    # Compiled in place, so the parameter names a checkpoint stores stay the same; each block runs one graph.
    assert all(block._compiled_call_impl is not None for block in model.layers)
    assert "layers.0.attention.wq.weight" in {name.replace("_checkpoint_wrapped_module.", "")
                                              for name, _ in model.named_parameters()}
    assert counters["stats"]["calls_captured"] >= TINY.n_layers and not counters["graph_break"]
    torch_optimizer = getattr(strategy.optimizer, "optimizer", strategy.optimizer)  # DeepSpeed wraps the client's
    assert torch_optimizer.defaults["fused"] is True


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointing_policies_recompute_to_the_same_gradients(policy):
    """Both policies give the eager gradients; selective keeps matmul and attention outputs, so it recomputes
    fewer ops in backward than full does (counted by the dispatcher during backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.matmuls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.matmuls += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
            return func(*args, **(kwargs or {}))

    def gradients_and_backward_matmuls(checkpointing):
        torch.manual_seed(0)
        model = llm.build_llm(TINY, vocab_size=VOCAB)
        if checkpointing:
            block_preparer(checkpointing=True, selective=checkpointing == "selective", compile=False)(model.layers)
        tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
        loss = get_family("llm").loss(model, {"tokens": tokens})
        with CountOps() as counted:
            loss.backward()
        return [param.grad for param in model.parameters()], counted.matmuls

    reference, plain_matmuls = gradients_and_backward_matmuls(None)
    gradients, matmuls = gradients_and_backward_matmuls(policy)
    for got, expected in zip(gradients, reference, strict=True):
        torch.testing.assert_close(got, expected)
    # Full recomputes each block's wq, wk, wv, wo, w1 and w3, but not w2: recomputation stops once it has what
    # backward needs (torch.utils.checkpoint's early stop), and w2's output is not among it. Selective none.
    recomputed = matmuls - plain_matmuls
    assert recomputed == (TINY.n_layers * 6 if policy == "full" else 0)


def test_prefetch_asks_each_block_for_the_next_ones_forward_and_the_previous_ones_backward():
    class Recorder:
        def __init__(self, name):
            self.name, self.forward, self.backward = name, None, None

        def set_modules_to_forward_prefetch(self, modules):
            self.forward = [module.name for module in modules]

        def set_modules_to_backward_prefetch(self, modules):
            self.backward = [module.name for module in modules]

    blocks = [Recorder(index) for index in range(4)]
    set_prefetch(blocks, ahead=2)
    assert [block.forward for block in blocks] == [[1, 2], [2, 3], [3], []]
    assert [block.backward for block in blocks] == [[], [0], [1, 0], [2, 1]]


@pytest.mark.parametrize("on_gpu, family, strategy, expected", [
    (True, "llm", "fsdp", True), (True, "llm", "zero3", False), (True, "ranker", "ddp", False),
    (False, "llm", "fsdp", False),
])
def test_compile_and_fused_adamw_default_on_where_they_help(on_gpu, family, strategy, expected):
    from tests.helpers import compose_config
    from trainers.loop import compiles_blocks, fuses_optimizer

    exp = "+exp=llm_tiny" if family == "llm" else "+exp=ranker_dlrm"
    cfg = compose_config([exp, f"strategy={strategy}"])
    assert compiles_blocks(cfg, get_family(family), on_gpu=on_gpu) is expected
    assert fuses_optimizer(cfg, on_gpu=on_gpu) is on_gpu
    set_by_user = compose_config([exp, f"strategy={strategy}", "trainer.compile=false",
                                  "trainer.fused_optimizer=false"])
    assert not compiles_blocks(set_by_user, get_family(family), on_gpu=True)
    assert not fuses_optimizer(set_by_user, on_gpu=True)
