"""Patch lifecycle: per-instance state, re-apply without stacking, exact revert, context manager, calling
conventions (return_dict, positional labels), Trainer loss-kwargs detection, autocast, loss dtype."""
import copy
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
from patches import SimPOCausalLMOutputWithPast, apply_fused_simpo, fused_simpo, patched_loss_fn, revert_fused_simpo
from patches.outputs import AUX_OUTPUT_NAMES, CACHE_FIELD


def hf_causal_lm_loss(model, input_ids, attention_mask, labels):
    """The unpatched model's own loss, written out: token-mean cross-entropy after the shift (HF's is float32)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).float()


def simpo_loss(model, batch):
    input_ids, attention_mask, labels = batch
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def test_apply_returns_same_object_and_touches_only_that_instance(tiny_model, preference_batch):
    patched, other = tiny_model("llama"), tiny_model("llama")
    class_forward = LlamaForCausalLM.forward
    input_ids, attention_mask, labels = batch = preference_batch()

    assert apply_fused_simpo(patched) is patched
    assert LlamaForCausalLM.forward is class_forward
    assert "forward" in patched.__dict__ and "forward" not in other.__dict__
    assert isinstance(patched(input_ids=input_ids, labels=labels), SimPOCausalLMOutputWithPast)
    with torch.no_grad():
        other_output = other(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert other_output.logits is not None and not isinstance(other_output, SimPOCausalLMOutputWithPast)
    torch.testing.assert_close(other_output.loss, hf_causal_lm_loss(other, *batch))


def test_apply_twice_updates_options_without_stacking(tiny_model, preference_batch):
    model, fresh = tiny_model("llama"), tiny_model("llama")
    batch = preference_batch()
    apply_fused_simpo(model, beta=1.0, gamma=0.3)
    forward_after_first = model.__dict__["forward"]
    first = simpo_loss(model, batch)
    apply_fused_simpo(model, beta=3.0, gamma=0.3)

    assert model.__dict__["forward"] is forward_after_first  # not wrapped a second time
    apply_fused_simpo(fresh, beta=3.0, gamma=0.3)
    torch.testing.assert_close(simpo_loss(model, batch), simpo_loss(fresh, batch), rtol=0, atol=0)
    assert not torch.allclose(simpo_loss(model, batch), first)
    revert_fused_simpo(model)  # one revert undoes both applies
    assert "forward" not in model.__dict__


def test_revert_restores_the_exact_original(tiny_model, preference_batch):
    model = tiny_model("gemma2", final_logit_softcapping=3.0)
    input_ids, attention_mask, labels = batch = preference_batch()
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    attributes_before = set(model.__dict__)

    apply_fused_simpo(model)
    assert model.accepts_loss_kwargs is False
    assert revert_fused_simpo(model) is model

    assert set(model.__dict__) == attributes_before
    assert "forward" not in model.__dict__ and "accepts_loss_kwargs" not in model.__dict__
    assert model.forward.__func__ is type(model).forward
    with torch.no_grad():
        after = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    torch.testing.assert_close(after.loss, hf_causal_lm_loss(model, *batch))
    assert revert_fused_simpo(model) is model  # reverting an unpatched model is a no-op


def test_revert_restores_an_instance_forward_that_existed_before(tiny_model, preference_batch):
    model = tiny_model("llama")
    own_forward = functools.partial(type(model).forward, model)
    model.forward = own_forward
    model.accepts_loss_kwargs = True
    input_ids, _, labels = preference_batch()

    apply_fused_simpo(model)
    assert isinstance(model(input_ids=input_ids, labels=labels), SimPOCausalLMOutputWithPast)
    with torch.no_grad():
        unpatched_logits = model(input_ids=input_ids).logits  # without labels: the instance's own forward
    torch.testing.assert_close(unpatched_logits, own_forward(input_ids=input_ids).logits, rtol=0, atol=0)
    revert_fused_simpo(model)
    assert model.__dict__["forward"] is own_forward and model.__dict__["accepts_loss_kwargs"] is True


def test_revert_refuses_when_forward_was_wrapped_after_patching(tiny_model):
    model = tiny_model("llama")
    apply_fused_simpo(model)
    model.forward = functools.partial(model.forward)
    with pytest.raises(RuntimeError, match="replaced by"):
        revert_fused_simpo(model)


def test_context_manager_reverts_on_exit_and_on_exception(tiny_model, preference_batch):
    model = tiny_model("llama")
    batch = preference_batch()
    with fused_simpo(model, beta=2.5) as patched:
        assert patched is model
        inside = simpo_loss(model, batch)
    assert "forward" not in model.__dict__
    apply_fused_simpo(model, beta=2.5)
    torch.testing.assert_close(inside, simpo_loss(model, batch), rtol=0, atol=0)
    revert_fused_simpo(model)

    with pytest.raises(KeyError):
        with fused_simpo(model):
            raise KeyError("boom")
    assert "forward" not in model.__dict__ and "accepts_loss_kwargs" not in model.__dict__


def test_context_manager_on_a_patched_model_restores_its_options(tiny_model, preference_batch):
    model = tiny_model("llama")
    batch = preference_batch()
    apply_fused_simpo(model, beta=1.5)
    outer = simpo_loss(model, batch)
    with fused_simpo(model, beta=4.0):
        assert not torch.allclose(simpo_loss(model, batch), outer)
    assert "forward" in model.__dict__
    torch.testing.assert_close(simpo_loss(model, batch), outer, rtol=0, atol=0)


class RecordingSimPOLoss(LigerFusedLinearSimPOLoss):
    """A loss module of the SimPO family that counts its calls."""

    calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return super().forward(*args, **kwargs)


def test_loss_fn_installs_the_given_loss_module_and_reverts(tiny_model, preference_batch):
    model = tiny_model("llama")
    batch = preference_batch()
    beta, gamma = 1.0 + torch.rand(()).item(), torch.rand(()).item()
    expected = simpo_loss(apply_fused_simpo(model, beta=beta, gamma=gamma), batch)
    revert_fused_simpo(model)
    loss_fn = RecordingSimPOLoss(beta=beta, gamma=gamma, compute_nll_loss=False)

    assert apply_fused_simpo(model, loss_fn=loss_fn) is model
    torch.testing.assert_close(simpo_loss(model, batch), expected, rtol=0, atol=0)
    assert loss_fn.calls == 1
    revert_fused_simpo(model)
    assert "forward" not in model.__dict__ and "accepts_loss_kwargs" not in model.__dict__

    apply_fused_simpo(model, beta=beta, gamma=gamma)
    with fused_simpo(model, loss_fn=loss_fn):
        simpo_loss(model, batch)
    assert loss_fn.calls == 2
    torch.testing.assert_close(simpo_loss(model, batch), expected, rtol=0, atol=0)  # its own loss back
    assert loss_fn.calls == 2


def test_patched_loss_fn_is_the_loss_the_patched_forward_calls(tiny_model):
    model = tiny_model("llama")
    assert patched_loss_fn(model) is None
    beta, chunk_size = 1.0 + torch.rand(()).item(), int(torch.randint(2, 5, ()))
    apply_fused_simpo(torch.compile(model), beta=beta, chunk_size=chunk_size)  # the model inside is patched
    patched = patched_loss_fn(model)
    assert type(patched) is LigerFusedLinearSimPOLoss and (patched.beta, patched.chunk_size) == (beta, chunk_size)
    given = LigerFusedLinearSimPOLoss()
    with fused_simpo(model, loss_fn=given):
        assert patched_loss_fn(model) is given
    assert patched_loss_fn(model) is patched
    revert_fused_simpo(model)
    assert patched_loss_fn(model) is None


def test_loss_fn_refuses_other_modules_and_simpo_options_beside_it(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="loss_fn must be a LigerFusedLinearSimPOLoss"):
        apply_fused_simpo(model, loss_fn=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"either loss_fn or the SimPO options.*beta=3\.0, chunk_size=2"):
        apply_fused_simpo(model, beta=3.0, chunk_size=2, loss_fn=LigerFusedLinearSimPOLoss())
    assert "forward" not in model.__dict__


def test_deepcopy_of_a_patched_model_is_patched_independently(tiny_model, preference_batch):
    model = apply_fused_simpo(tiny_model("llama"))
    batch = preference_batch()
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    with torch.no_grad():
        clone.lm_head.weight.mul_(1.5)
    assert isinstance(clone(input_ids=batch[0], labels=batch[2]), SimPOCausalLMOutputWithPast)
    assert not torch.allclose(simpo_loss(clone, batch), simpo_loss(model, batch))
    revert_fused_simpo(clone)
    assert "forward" in model.__dict__ and "forward" not in clone.__dict__


def test_return_dict_false_and_positional_labels(tiny_model, preference_batch):
    model = apply_fused_simpo(tiny_model("qwen2"))
    input_ids, attention_mask, labels = preference_batch()
    with torch.no_grad():
        as_dict = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        as_tuple = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)
        # LlamaForCausalLM-style order: input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels
        positional = model(input_ids, attention_mask, None, None, None, labels)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss)
    assert torch.equal(as_tuple[-1], as_dict.rejected_rewards)
    assert isinstance(positional, SimPOCausalLMOutputWithPast) and torch.equal(positional.loss, as_dict.loss)


def test_hf_trainer_sees_accepts_loss_kwargs_false_only_while_patched(tiny_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama", dtype=torch.float32)
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert Trainer(model=model, args=arguments).model_accepts_loss_kwargs is True
    apply_fused_simpo(model)
    assert Trainer(model=model, args=arguments).model_accepts_loss_kwargs is False
    revert_fused_simpo(model)
    assert Trainer(model=model, args=arguments).model_accepts_loss_kwargs is True


def test_autocast_bf16_matches_float32_reference(tiny_model, preference_batch, trl_reference, grads_of):
    """Under autocast the head runs in the autocast dtype, as ``lm_head(hidden)`` would; grads stay float32 and
    the loss is float32, like HF's causal-LM loss (which upcasts the logits)."""
    model = tiny_model("llama", dtype=torch.float32)
    input_ids, attention_mask, labels = preference_batch(seed=11)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    reference = trl_reference(logits, labels, beta=2.0, gamma=1.0, alpha=1.0, label_smoothing=0.0, compute_nll_loss=False)
    reference["loss"].backward()
    expected_grads = grads_of(model)

    apply_fused_simpo(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    output.loss.backward()
    assert output.loss.dtype == torch.float32
    assert all(getattr(output, name).dtype == torch.float32 for name in AUX_OUTPUT_NAMES)
    torch.testing.assert_close(output.loss.double(), reference["loss"].detach(), rtol=5e-2, atol=5e-2)
    for name, grad in grads_of(model).items():
        assert grad.dtype == torch.float32, name
        relative_error = (grad - expected_grads[name]).norm() / expected_grads[name].norm()
        assert relative_error < 5e-2, (name, float(relative_error))


def test_patched_forward_advertises_the_original_signature(tiny_model):
    """generate() and the Trainer inspect ``model.forward``'s parameters (attention_mask, logits_to_keep, ...)."""
    model = tiny_model("phi3")
    original = inspect.signature(model.forward)
    apply_fused_simpo(model)
    assert inspect.signature(model.forward) == original
    assert "logits_to_keep" in inspect.signature(model.forward).parameters


def test_a_token_count_for_the_loss_is_refused(tiny_model, preference_batch):
    """``num_items_in_batch`` (a token count, from a Trainer that will then skip its division by the accumulation
    steps) can normalise no mean over pairs: a labelled call with one raises; ``None`` or no labels pass."""
    model = apply_fused_simpo(tiny_model("llama"))
    input_ids, attention_mask, labels = batch = preference_batch()
    with pytest.raises(ValueError, match="mean over pairs and cannot be normalised by num_items_in_batch"):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=torch.tensor(7))
    with torch.no_grad():
        without_count = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                              num_items_in_batch=None).loss
        # no labels: the original forward, which computes no loss to normalise
        logits = model(input_ids=input_ids, attention_mask=attention_mask, num_items_in_batch=torch.tensor(7)).logits
    torch.testing.assert_close(without_count, simpo_loss(model, batch), rtol=0, atol=0)
    assert logits.shape == (*input_ids.shape, model.config.vocab_size)


def test_fused_loss_runs_inside_lm_head_call(tiny_model, preference_batch):
    """Hooks on lm_head (FSDP2's unshard/reshard) run around the fused loss; lm_head is left as it was."""
    model = apply_fused_simpo(tiny_model("llama"))
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    input_ids, attention_mask, labels = preference_batch(n_pairs=2, seq_len=9)
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert seen == [(4, 9, model.config.hidden_size)]
    assert "forward" not in model.lm_head.__dict__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_returns_a_float32_loss(dtype, tiny_model, preference_batch, trl_reference):
    """Like HF's causal-LM loss: float32, straight from the float32 accumulators, so dividing it by the gradient
    accumulation steps (as the Trainer does) does not round it to 8 (bf16) or 11 (fp16) bits again."""
    model = tiny_model("llama", dtype=dtype)
    input_ids, attention_mask, labels = preference_batch(seed=14)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    reference = trl_reference(logits, labels, beta=2.0, gamma=1.0, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True)
    apply_fused_simpo(model, compute_nll_loss=True)
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    assert output.loss.dtype == torch.float32
    assert all(getattr(output, name).dtype == torch.float32 for name in AUX_OUTPUT_NAMES)
    torch.testing.assert_close(output.loss.double(), reference["loss"], rtol=2e-2, atol=2e-2)
    steps = 3
    torch.testing.assert_close((output.loss / steps).double() * steps, output.loss.double(), rtol=1e-6, atol=0)
    output.loss.backward()
    assert model.lm_head.weight.grad.dtype == dtype


def test_loss_forward_builds_no_cache_and_logs_nothing_new(tiny_model, preference_batch):
    """A training forward needs no KV cache (unless asked for), and passes no argument the caller did not give:
    transformers logs deprecation warnings for renamed cache arguments and output fields."""
    import logging

    model = tiny_model("llama")
    assert model.config.use_cache
    input_ids, attention_mask, labels = preference_batch()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        logging.Logger.warning_once.cache_clear()  # transformers logs each warning once per process
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            apply_fused_simpo(model)
            output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            cached = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=True)
    finally:
        transformers_logger.removeHandler(handler)
    assert [record.getMessage() for record in records if record.levelno >= logging.WARNING] == []
    assert getattr(output, CACHE_FIELD) is None
    assert getattr(cached, CACHE_FIELD) is not None  # asked for: given
