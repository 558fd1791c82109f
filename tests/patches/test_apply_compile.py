"""torch.compile and a patched model: the decoder compiles, the fused loss runs eagerly behind a graph break;
loss, statistics and gradients equal eager. Patching a compiled model patches the model inside it."""
import pytest
import torch

from patches import SimPOCausalLMOutputWithPast, apply_fused_simpo, revert_fused_simpo
from patches.outputs import AUX_OUTPUT_NAMES

#: one decoder layer keeps compilation short; float32 is what compiled training runs in
MODEL = dict(model_type="llama", dtype=torch.float32, num_hidden_layers=1)
TOLERANCE = dict(rtol=5e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_output_and_grads(model, batch, grads_of, parameters_of=None):
    """Output of ``model`` with labels and the gradients of ``parameters_of`` (default: ``model``), by name."""
    input_ids, attention_mask, labels = batch
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert isinstance(output, SimPOCausalLMOutputWithPast)
    output.loss.backward()
    return output, grads_of(parameters_of or model)


def check_same(output, grads, expected, expected_grads, tolerance=TOLERANCE):
    torch.testing.assert_close(output.loss, expected.loss, **tolerance)
    for name in AUX_OUTPUT_NAMES:
        torch.testing.assert_close(getattr(output, name), getattr(expected, name), **tolerance, msg=name)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **tolerance, msg=name)


@pytest.mark.parametrize(
    "backend", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_torch_compile_of_a_patched_model_matches_eager(backend, tiny_model, preference_batch, grads_of, simpo_options):
    model = apply_fused_simpo(tiny_model(**MODEL), **simpo_options)
    batch = preference_batch(seed=16)
    expected, expected_grads = loss_output_and_grads(model, batch, grads_of)

    compiled = torch.compile(model, backend=backend)
    output, grads = loss_output_and_grads(compiled, batch, grads_of, model)
    check_same(output, grads, expected, expected_grads)


def test_module_compile_of_a_patched_model_matches_eager(tiny_model, preference_batch, grads_of, simpo_options):
    """``model.compile()`` compiles ``model.__call__`` in place, with the instance's (patched) forward."""
    model = apply_fused_simpo(tiny_model(**MODEL), **simpo_options)
    batch = preference_batch(seed=17)
    expected, expected_grads = loss_output_and_grads(model, batch, grads_of)

    model.compile(backend="eager")
    output, grads = loss_output_and_grads(model, batch, grads_of)
    check_same(output, grads, expected, expected_grads)
    revert_fused_simpo(model)
    input_ids, attention_mask, labels = batch
    assert model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits is not None


def test_patching_a_compiled_model_patches_the_model_inside(tiny_model, preference_batch, grads_of, simpo_options):
    model = tiny_model(**MODEL)
    input_ids, attention_mask, labels = batch = preference_batch(seed=18)
    compiled = torch.compile(model, backend="eager")
    assert compiled(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits is not None

    assert apply_fused_simpo(compiled, **simpo_options) is compiled
    assert "forward" in model.__dict__ and compiled._fused_simpo_state is model._fused_simpo_state
    output, grads = loss_output_and_grads(compiled, batch, grads_of, model)  # dynamo recompiles: new forward
    expected, expected_grads = loss_output_and_grads(model, batch, grads_of)
    check_same(output, grads, expected, expected_grads)

    revert_fused_simpo(compiled)
    assert "forward" not in model.__dict__
    assert compiled(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits is not None
