"""``shard_with_accelerate`` in one process: the plugin it builds, and its refusal of an Accelerator that would not
shard. The sharding itself (2 processes, ``Accelerator.prepare`` on gloo) is checked by ``test_fsdp2_gloo.py``."""
import pytest
import torch
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed.tensor import DTensor

from patches.distributed import accelerate_fsdp2_plugin, shard_with_accelerate
from tests.distributed import fsdp2_setup


@pytest.fixture
def fresh_accelerate_state():
    """No accelerate state before the test, and none left after it (it is process-wide)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_plugin_is_fsdp2_with_a_unit_per_decoder_layer_and_takes_options():
    plugin = accelerate_fsdp2_plugin(reshard_after_forward=False)
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.reshard_after_forward is False
    assert accelerate_fsdp2_plugin(fsdp_version=1).fsdp_version == 1  # the options override the defaults


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_an_accelerator_without_fsdp2_is_refused_before_prepare(fresh_accelerate_state, with_optimizer):
    """One process (or CPU): accelerate ignores the FSDP plugin and its prepare would not shard; say so instead."""
    model = fsdp2_setup.build_model(tied=True)
    optimizer = fsdp2_setup.sgd(model) if with_optimizer else None
    with pytest.raises(RuntimeError, match=r"does not use FSDP2 \(distributed type .*NO\).*shard_fused_simpo_model"):
        shard_with_accelerate(model, optimizer)
    assert not any(isinstance(parameter, DTensor) for parameter in model.parameters())
    assert not getattr(model, "_is_accelerate_prepared", False)
    model(**fsdp2_setup.global_batch(n_pairs=1)).loss.backward()  # untouched: it still trains
    assert all(isinstance(parameter.grad, torch.Tensor) for parameter in model.parameters())
