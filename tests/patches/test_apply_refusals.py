"""Heads the fused loss cannot reproduce exactly are refused at apply time, naming the model type."""
import pytest
import torch
from transformers import LlamaForCausalLM, LlamaModel

from patches import UnsupportedModelError, apply_fused_simpo, patched_loss_fn, revert_fused_simpo
from patches.heads import HEAD_SOFTCAP

REFUSED = {
    "cohere": "logit_scale",
    "cohere2": "logit_scale",
    "granite": "logits_scaling",
    "mixtral": "router",
    "qwen2_moe": "router",
    "gpt2": "not been checked",  # plain head, but not verified: unknown types are refused too
}


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_unsupported_head_is_refused_naming_the_model_type(model_type, tiny_model):
    model = tiny_model(model_type, dtype=torch.float32)
    assert model.config.model_type == model_type
    with pytest.raises(UnsupportedModelError, match=rf"'{model_type}'.*{REFUSED[model_type]}"):
        apply_fused_simpo(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_fused_simpo_state")


def test_gemma3_multimodal_is_refused():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4,
    )
    model = Gemma3ForConditionalGeneration(config)
    with pytest.raises(UnsupportedModelError, match="'gemma3'.*gemma3_text"):
        apply_fused_simpo(model)


def test_model_without_lm_head_is_refused(tiny_model):
    decoder_only = LlamaModel(tiny_model("llama").config)
    with pytest.raises(UnsupportedModelError, match="no output embeddings"):
        apply_fused_simpo(decoder_only)


def test_registry_lists_the_issue_families():
    """Every registry entry needs a parity test in test_apply_parity.py: keep the two lists in step."""
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"} == set(HEAD_SOFTCAP)


class RescaledLlama(LlamaForCausalLM):
    """Overrides forward (here: halves the logits): the fused loss would silently skip that."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 0.5
        return output


class NamedLlama(LlamaForCausalLM):
    """A subclass that keeps LlamaForCausalLM.forward."""


def test_subclass_overriding_forward_is_refused_unless_allowed(tiny_model, preference_batch):
    model = RescaledLlama(tiny_model("llama").config)
    with pytest.raises(UnsupportedModelError, match=r"RescaledLlama.*overrides LlamaForCausalLM\.forward.*allow_custom_forward=True"):
        apply_fused_simpo(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_fused_simpo_state")

    input_ids, attention_mask, labels = preference_batch()
    assert apply_fused_simpo(model, 2.0, 1.0, allow_custom_forward=True) is model  # positional options unchanged
    assert model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits is None
    with pytest.raises(TypeError, match="allow_custom_forward must be a bool"):
        apply_fused_simpo(model, allow_custom_forward="yes")


def test_subclass_keeping_forward_is_accepted(tiny_model, preference_batch, check_parity, simpo_options):
    model = NamedLlama(tiny_model("llama").config).double()
    check_parity(model, preference_batch(seed=13), simpo_options)


def test_fsdp2_dynamic_subclass_is_accepted(tiny_model, preference_batch):
    """``fully_shard`` swaps the class for ``FSDP<Name>(FSDPModule, <Name>)``: that is not a custom forward."""
    from torch.distributed.fsdp import FSDPModule

    model = tiny_model("llama")
    model.__class__ = type(f"FSDP{type(model).__name__}", (FSDPModule, type(model)), {})
    input_ids, attention_mask, labels = preference_batch()
    apply_fused_simpo(model)
    assert model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits is None


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(compute_nll_loss="False"), TypeError, "compute_nll_loss"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(beta=-2), ValueError, "beta"),
        (dict(beta="2"), TypeError, "beta"),
        (dict(gamma=float("nan")), TypeError, "gamma"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    ],
)
def test_invalid_options_are_refused_before_the_model_is_touched(tiny_model, options, error, message):
    model = tiny_model("llama")
    attributes = dict(model.__dict__)
    with pytest.raises(error, match=message):
        apply_fused_simpo(model, **options)
    assert model.__dict__ == attributes and not hasattr(model, "_fused_simpo_state")


@pytest.mark.parametrize("function", [apply_fused_simpo, revert_fused_simpo, patched_loss_fn])
@pytest.mark.parametrize("value, shown", [(None, "None"), ("gpt2", "a str")])
def test_a_non_module_is_refused_with_a_type_error(function, value, shown):
    with pytest.raises(TypeError, match=rf"^{function.__name__} needs a torch.nn.Module \(a HF causal LM\), got {shown}$"):
        function(value)


@pytest.mark.parametrize(
    "make_labels, message",
    [
        (lambda labels: labels[0], r"labels must be a \(2B, T\) tensor like input_ids.*\(11,\)"),
        (lambda labels: labels[:, :-1], r"labels must have the shape of input_ids, \(2B, T\) = \(6, 11\); got \(6, 10\)"),
        (lambda labels: labels[:, :, None], r"labels must be a \(2B, T\) tensor.*\(6, 11, 1\)"),
    ],
)
def test_malformed_labels_are_refused_clearly(make_labels, message, tiny_model, preference_batch):
    model = apply_fused_simpo(tiny_model("llama"))
    input_ids, attention_mask, labels = preference_batch()
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=make_labels(labels))


@pytest.mark.parametrize("name, dtype", [("labels", torch.float32), ("labels", torch.bool),
                                         ("shift_labels", torch.float64)])
def test_labels_that_are_not_token_ids_are_refused_by_their_name(tiny_model, preference_batch, name, dtype):
    model = apply_fused_simpo(tiny_model("llama"))
    input_ids, attention_mask, labels = preference_batch()
    inputs = dict(labels=labels, shift_labels=torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100))
    inputs[name] = inputs[name].to(dtype)
    with pytest.raises(TypeError, match=rf"^{name} must hold integer token ids .*got {dtype}$"):
        model(input_ids=input_ids, attention_mask=attention_mask, **inputs)


def test_odd_number_of_rows_is_refused(tiny_model, preference_batch):
    model = apply_fused_simpo(tiny_model("llama"))
    input_ids, attention_mask, labels = preference_batch()
    with pytest.raises(ValueError, match=r"even number of rows, 2B \(B chosen rows, then their B rejected rows\); got 5"):
        model(input_ids=input_ids[:5], attention_mask=attention_mask[:5], labels=labels[:5])
    embeds = model.get_input_embeddings()(input_ids)
    with pytest.raises(ValueError, match=r"shape of inputs_embeds, \(2B, T\) = \(6, 11\); got \(5, 11\)"):
        model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels[:5])


@pytest.mark.parametrize("bad_id", [500, -5])
def test_out_of_vocabulary_label_is_reported_at_its_position_in_labels(tiny_model, preference_batch, bad_id):
    model = apply_fused_simpo(tiny_model("llama"))
    input_ids, attention_mask, labels = preference_batch()
    vocab = model.lm_head.weight.shape[0]
    labels = labels.clone()
    labels[0, 0] = bad_id  # the first column predicts nothing (the shift drops it): not an error
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    labels[1, 5] = bad_id
    with pytest.raises(ValueError, match=rf"^labels holds id {bad_id} at position \(1, 5\), outside \[0, V={vocab}\) "
                                         rf"and not ignore_index=-100$"):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    # shift_labels are already in the loss's coordinates
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with pytest.raises(ValueError, match=rf"^shift_labels holds id {bad_id} at position \(1, 4\)"):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, shift_labels=shift_labels)
