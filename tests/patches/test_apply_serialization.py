"""A patched model survives pickle, torch.save/torch.load and deepcopy: still patched (bound to the copy), same
loss, statistics and gradients, and revertable."""
import copy
import io
import pickle

import pytest
import torch

from patches import apply_fused_simpo, revert_fused_simpo
from patches.outputs import AUX_OUTPUT_NAMES
from tests.helpers import simpo_output_and_grads


def torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "torch.save": torch_save_load,
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("round_trip", sorted(ROUND_TRIPS))
def test_round_trip_keeps_the_patch(round_trip, tiny_model, preference_batch, simpo_options):
    model = apply_fused_simpo(tiny_model("gemma2", final_logit_softcapping=3.0), **simpo_options, chunk_size=2)
    batch = input_ids, attention_mask, labels = preference_batch(seed=15)
    expected, expected_grads = simpo_output_and_grads(model, batch)

    clone = ROUND_TRIPS[round_trip](model)
    assert clone.forward.__self__ is clone and clone._fused_simpo_state is not model._fused_simpo_state
    output, grads = simpo_output_and_grads(clone, batch)
    torch.testing.assert_close(output.loss, expected.loss, rtol=0, atol=0)
    for name in AUX_OUTPUT_NAMES:
        torch.testing.assert_close(getattr(output, name), getattr(expected, name), rtol=0, atol=0, msg=name)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0, msg=name)

    # the copy's forward works on the copy's own weights, not on the original's
    with torch.no_grad():
        clone.lm_head.weight.mul_(1.5)
        assert not torch.allclose(clone(input_ids=input_ids, labels=labels).loss, model(input_ids=input_ids, labels=labels).loss)

    revert_fused_simpo(clone)
    assert "forward" not in clone.__dict__ and "accepts_loss_kwargs" not in clone.__dict__
    assert clone(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits is not None
    assert "forward" in model.__dict__
