"""Wrappers around the model's forward (accelerate mixed precision and hooks): the fused path runs inside them,
in either order of patching and wrapping; revert gives back the wrapped forward; unknown wrappers are refused."""
import functools

import pytest
import torch

from patches import SimPOCausalLMOutputWithPast, UnsupportedModelError, apply_fused_simpo, revert_fused_simpo
from tests.helpers import simpo_output_and_grads


@pytest.fixture
def bf16_accelerator():
    """accelerate's ``Accelerator(mixed_precision="bf16", cpu=True)``; its process-wide state is reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(mixed_precision="bf16", cpu=True)
    AcceleratorState._reset_state(True)


def record_q_proj_dtypes(model):
    """The input dtypes the first attention's q_proj sees from now on (bfloat16 iff autocast reached the decoder)."""
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    return seen


@pytest.mark.parametrize("order", ["apply_then_prepare", "prepare_then_apply"])
def test_accelerate_mixed_precision_reaches_the_fused_path(order, bf16_accelerator, tiny_model, preference_batch,
                                                          trl_reference, simpo_options):
    batch = preference_batch(seed=21)
    input_ids, attention_mask, labels = batch
    # Expected: the same patched model run under the autocast accelerate uses, and TRL on the autocast logits.
    model = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    apply_fused_simpo(model, **simpo_options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = simpo_output_and_grads(model, batch)
    revert_fused_simpo(model)

    if order == "apply_then_prepare":
        model = bf16_accelerator.prepare(apply_fused_simpo(model, **simpo_options))
    else:
        model = bf16_accelerator.prepare(model)
        wrapped_forward = model.__dict__["forward"]
        apply_fused_simpo(model, **simpo_options)
    q_proj_dtypes = record_q_proj_dtypes(model)
    output, grads = simpo_output_and_grads(model, batch)

    assert q_proj_dtypes == [torch.bfloat16]
    assert output.loss.dtype == torch.float32
    torch.testing.assert_close(output.loss, expected.loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0, msg=name)
    reference = trl_reference(autocast_logits, labels, **{k: v for k, v in simpo_options.items()})
    torch.testing.assert_close(output.loss.double(), reference["loss"], rtol=2e-2, atol=2e-2)

    # Without labels the prepared forward (autocast, float32 outputs) runs as before.
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.dtype == torch.float32 and q_proj_dtypes[-1] == torch.bfloat16
    torch.testing.assert_close(logits, autocast_logits.float(), rtol=0, atol=0)

    if order == "prepare_then_apply":
        revert_fused_simpo(model)
        assert model.__dict__["forward"] is wrapped_forward
        assert "accepts_loss_kwargs" not in model.__dict__ and not hasattr(model, "_fused_simpo_state")
    else:
        # accelerate takes its own wrapper off again; what is left is the patched forward, which reverts
        bf16_accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        assert isinstance(model(input_ids=input_ids, labels=labels), SimPOCausalLMOutputWithPast)
        revert_fused_simpo(model)
        assert "forward" not in model.__dict__
    assert model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits is not None


@pytest.mark.parametrize("order", ["apply_then_prepare", "prepare_then_apply"])
def test_accelerate_unwrap_without_fp32_wrapper_keeps_the_patch_and_drops_mixed_precision(
        order, bf16_accelerator, tiny_model, preference_batch, simpo_options):
    """``unwrap_model(keep_fp32_wrapper=False)`` takes accelerate's autocast and float32 outputs off: the model stays
    patched, runs as a float32 model patched without accelerate, and reverts to what an unpatched model unwrapped the
    same way has."""
    batch = preference_batch(seed=23)
    input_ids, attention_mask, labels = batch
    model = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        float32_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    apply_fused_simpo(model, **simpo_options)
    expected, expected_grads = simpo_output_and_grads(model, batch)
    revert_fused_simpo(model)
    # what unwrap leaves on an unpatched model: the class's forward (undecorated), bound to the instance
    unpatched = bf16_accelerator.unwrap_model(bf16_accelerator.prepare(tiny_model("llama")), keep_fp32_wrapper=False)
    unpatched_forward = unpatched.__dict__["forward"].__func__

    if order == "apply_then_prepare":
        model = bf16_accelerator.prepare(apply_fused_simpo(model, **simpo_options))
    else:
        model = apply_fused_simpo(bf16_accelerator.prepare(model), **simpo_options)
    model = bf16_accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    q_proj_dtypes = record_q_proj_dtypes(model)
    output, grads = simpo_output_and_grads(model, batch)

    assert q_proj_dtypes == [torch.float32]  # no autocast left
    torch.testing.assert_close(output.loss, expected.loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits, float32_logits, rtol=0, atol=0)
    assert q_proj_dtypes[-1] == torch.float32

    revert_fused_simpo(model)
    assert not hasattr(model, "_fused_simpo_state") and "accepts_loss_kwargs" not in model.__dict__
    if order == "apply_then_prepare":
        assert "forward" not in model.__dict__  # patched before prepare: nothing of accelerate's was saved
    else:
        assert model.__dict__["forward"].__func__ is unpatched_forward
    assert model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits is not None


def test_revert_right_after_accelerate_unwrap_gives_the_unwrapped_forward(bf16_accelerator, tiny_model):
    unpatched = bf16_accelerator.unwrap_model(bf16_accelerator.prepare(tiny_model("llama")), keep_fp32_wrapper=False)
    model = apply_fused_simpo(bf16_accelerator.prepare(tiny_model("llama")))
    model = revert_fused_simpo(bf16_accelerator.unwrap_model(model, keep_fp32_wrapper=False))
    assert model.__dict__["forward"].__func__ is unpatched.__dict__["forward"].__func__
    assert not hasattr(model, "_fused_simpo_state")


def test_lm_head_forward_hook_replacing_the_output_is_refused(tiny_model, preference_batch):
    """A forward hook returning None (FSDP's, this counter) runs around the fused loss; one returning a new output
    expects logits the fused loss never builds, and is refused naming the hook."""
    model = apply_fused_simpo(tiny_model("llama"))
    input_ids, attention_mask, labels = preference_batch(seed=5)
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, output: calls.append(output) and None)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert len(calls) == 1 and calls[0][0] is loss

    model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(RuntimeError, match=r"forward hook on Linear \(the model's lm_head\) replaced its output"):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert "forward" not in model.lm_head.__dict__  # lm_head's own forward is back
    assert model(input_ids=input_ids, attention_mask=attention_mask).logits is not None  # without labels: as before


def test_lm_head_forward_hook_passing_tensors_through_keeps_them(tiny_model, preference_batch):
    """DeepSpeed ZeRO-3's forward hooks return the output with each tensor passed through an autograd function of
    theirs (same shapes), whose backward must run: such a hook is accepted and its tensors are what the model
    returns."""

    class Through(torch.autograd.Function):
        backward_calls = 0

        @staticmethod
        def forward(ctx, tensor):
            return tensor.view_as(tensor)

        @staticmethod
        def backward(ctx, grad):
            Through.backward_calls += 1
            return grad

    def pass_through(module, args, output):
        loss, aux = output
        return Through.apply(loss), tuple(aux)

    model = apply_fused_simpo(tiny_model("llama"))
    input_ids, attention_mask, labels = preference_batch(seed=5)
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    model.lm_head.register_forward_hook(pass_through)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    assert Through.backward_calls == 1 and torch.equal(loss.detach(), expected.detach())


def test_accelerate_hook_runs_around_the_fused_path(tiny_model, preference_batch):
    """accelerate's ``add_hook_to_module`` (device-map dispatch): pre_forward and post_forward run with labels."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class HalveInputsEmbeds(ModelHook):
        """Changes the inputs and marks the output, so that skipping either side shows."""

        def pre_forward(self, module, *args, **kwargs):
            kwargs["inputs_embeds"] = module.get_input_embeddings()(kwargs.pop("input_ids")) * 0.5
            return args, kwargs

        def post_forward(self, module, output):
            output.hooked = True
            return output

    batch = preference_batch(seed=22)
    input_ids, attention_mask, labels = batch
    model = tiny_model("llama")
    apply_fused_simpo(model)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids) * 0.5
        expected = model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss
    revert_fused_simpo(model)

    add_hook_to_module(model, HalveInputsEmbeds())
    hooked_forward = model.__dict__["forward"]
    apply_fused_simpo(model)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert output.hooked
    torch.testing.assert_close(output.loss, expected, rtol=0, atol=0)
    revert_fused_simpo(model)
    assert model.__dict__["forward"] is hooked_forward


def test_wrappers_see_a_labelled_call_bound_once_by_name(tiny_model, preference_batch):
    """The patched forward binds a call's arguments once: the layers it re-runs get them by name, positional ones
    included, and the fused path takes what they pass on."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Record(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append((args, dict(kwargs)))
            return args, kwargs

    seen = []
    input_ids, attention_mask, labels = preference_batch(seed=int(torch.randint(0, 2**31, ())))
    model = apply_fused_simpo(tiny_model("llama"))
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    revert_fused_simpo(model)
    add_hook_to_module(model, Record())
    apply_fused_simpo(model)
    loss = model(input_ids, attention_mask, labels=labels).loss
    ((args, kwargs),) = seen
    assert args == () and kwargs.keys() == {"input_ids", "attention_mask", "labels"}
    assert kwargs["input_ids"] is input_ids and kwargs["labels"] is labels
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_unknown_forward_wrapper_is_refused_naming_the_order_that_works(tiny_model):
    model = tiny_model("llama")
    original = model.forward

    @functools.wraps(original)
    def logging_forward(*args, **kwargs):
        return original(*args, **kwargs)

    model.forward = logging_forward
    with pytest.raises(UnsupportedModelError, match=r"logging_forward.*Patch the model first, then wrap"):
        apply_fused_simpo(model)
    assert model.__dict__["forward"] is logging_forward and not hasattr(model, "_fused_simpo_state")

    # The order that works: patch, then wrap (the wrapper then runs around the patched forward).
    del model.forward
    apply_fused_simpo(model)
    patched = model.forward
    model.forward = functools.wraps(patched)(lambda *args, **kwargs: patched(*args, **kwargs))
    batch = torch.randint(3, 97, (2, 6))
    assert isinstance(model(input_ids=batch, labels=batch), SimPOCausalLMOutputWithPast)
