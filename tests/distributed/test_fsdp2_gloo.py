"""FSDP2 on 2 CPU processes (gloo) == one process on the same global batch: loss, gathered gradients and weights
for a few SGD steps, in our layout, the one accelerate builds and an lm_head unit of its own; tied embeddings; bf16 mixed
precision; save as a plain HF checkpoint and reload.

The worker (``fsdp2_worker.py``) runs once under torchrun for the whole module; the single-process reference
is computed here, in float64, from the same seed and batch (``fsdp2_setup.py``).
"""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from patches import apply_fused_simpo
from patches.distributed import full_gradients
from tests.distributed import fsdp2_setup, scenarios
from tests.distributed.launcher import run_torchrun

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed"),
              pytest.mark.subprocess]

WORKER = Path(__file__).with_name("fsdp2_worker.py")
FLOAT32 = dict(rtol=1e-4, atol=2e-5)  # measured: losses within 2e-6, gradients within 7e-6 of float64
FIXED_PRECISION_SCENARIOS = [name for name, scenario in scenarios.SCENARIOS.items() if not scenario[2]]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Results of the 2-process FSDP2 worker (``results.pt``) and the folder of its saved models."""
    output_dir = tmp_path_factory.mktemp("fsdp2")
    run_torchrun([str(WORKER), str(output_dir)], timeout=240)
    return torch.load(output_dir / "results.pt"), output_dir



def single_process_run(scenario: str, dtype=torch.float64):
    """The reference: one process, unsharded, the whole global batch; returns (run, trained model)."""
    tied, _, _, steps = scenarios.SCENARIOS[scenario]
    model = fsdp2_setup.build_model(tied, dtype)
    run = fsdp2_setup.train(model, fsdp2_setup.sgd(model), fsdp2_setup.global_batch(), steps, lambda loss: loss,
                            full_gradients)
    return run, model



@pytest.mark.parametrize("scenario", FIXED_PRECISION_SCENARIOS)
def test_fsdp2_matches_single_process(fsdp_run, scenario):
    results, _ = fsdp_run
    sharded = results[scenario]
    reference, reference_model = single_process_run(scenario)
    _, layout, _, steps = scenarios.SCENARIOS[scenario]
    assert len(sharded["losses"]) == steps
    assert sharded["lm_head_unit"] == (layout != "root"), "not the FSDP layout the scenario is about"
    assert sharded["accelerate_prepared"] == (layout == "accelerate"), "the accelerate layout comes from Accelerator.prepare only"
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(reference["losses"]), **FLOAT32)
    for step, (gradients, reference_gradients) in enumerate(zip(sharded["gradients"], reference["gradients"])):
        assert gradients.keys() == reference_gradients.keys(), f"step {step}: not the same parameters got gradients"
        for name, reference_gradient in reference_gradients.items():
            torch.testing.assert_close(gradients[name], reference_gradient, **FLOAT32, msg=f"step {step}: {name}")
    reference_state = reference_model.state_dict()
    assert sharded["state_dict"].keys() == reference_state.keys()
    for name, value in sharded["state_dict"].items():
        torch.testing.assert_close(value.double(), reference_state[name], rtol=1e-4, atol=2e-6, msg=name)


@pytest.mark.parametrize("scenario", [name for name in scenarios.SCENARIOS if scenarios.SCENARIOS[name][0]])
def test_tied_embedding_stays_one_parameter(fsdp_run, scenario):
    results, _ = fsdp_run
    assert results[scenario]["tie_kept"]
    # the embedding's gradient includes lm_head's part: checked against the reference in the parity test
    assert not any(name.endswith("lm_head.weight") for name in results[scenario]["gradients"][0])


def test_bf16_mixed_precision_is_as_close_as_plain_bf16(fsdp_run):
    """bf16 compute, fp32 shards and fp32 reduction: as close to float64 as one process computing in bf16."""
    sharded = fsdp_run[0]["bf16_mixed_precision"]
    assert sharded["parameter_dtypes"] == ["torch.float32"] and sharded["gradient_dtypes"] == ["torch.float32"]
    reference, _ = single_process_run("bf16_mixed_precision")
    plain_bf16, _ = single_process_run("bf16_mixed_precision", torch.bfloat16)
    gradient_error = fsdp2_setup.relative_error(sharded["gradients"][0], reference["gradients"][0])
    plain_gradient_error = fsdp2_setup.relative_error(plain_bf16["gradients"][0], reference["gradients"][0])
    assert 0 < gradient_error < 1.5 * plain_gradient_error, (gradient_error, plain_gradient_error)
    assert abs(sharded["losses"][0] - reference["losses"][0]) < 2e-2


@pytest.mark.parametrize("scenario", scenarios.SAVED)
def test_saved_model_reloads_with_the_trained_weights(fsdp_run, scenario):
    results, output_dir = fsdp_run
    trained = results[scenario]["state_dict"]
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir / scenario)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    state = reloaded.state_dict()
    assert set(trained) <= set(state)
    for name, value in trained.items():
        assert torch.equal(state[name], value), name
    tied = scenarios.SCENARIOS[scenario][0]
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    # the reloaded model, patched again, gives the trained reference model's loss
    _, reference_model = single_process_run(scenario)
    apply_fused_simpo(reloaded.double(), **fsdp2_setup.SIMPO_OPTIONS)
    batch = fsdp2_setup.global_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).loss, reference_model(**batch).loss, rtol=1e-4, atol=1e-5)
