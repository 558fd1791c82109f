"""Patched forward == TRL's CPOTrainer(loss_type="simpo") on the unpatched model's logits: loss, statistics
and every parameter gradient, for each supported family (float64 models, so any real mismatch shows)."""
import pytest
import torch
import torch.nn.functional as F

from patches import apply_fused_simpo

SOFTCAP = 3.0
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "phi3": {},
    "gemma": {},  # ties lm_head to the embedding by default
    "gemma2": dict(final_logit_softcapping=SOFTCAP),
    "gemma3_text": dict(final_logit_softcapping=SOFTCAP),
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_apply_parity_per_family(model_type, tiny_model, preference_batch, check_parity, simpo_options):
    model = tiny_model(model_type, **FAMILIES[model_type])
    unpatched = check_parity(model, preference_batch(), {**simpo_options, "chunk_size": 2})
    if "final_logit_softcapping" in FAMILIES[model_type]:
        # capped logits near the cap: the tanh is far from linear, so ignoring it could not pass
        assert unpatched.logits.abs().max() > 0.8 * SOFTCAP


def test_apply_parity_issue_defaults(tiny_model, preference_batch, check_parity):
    check_parity(tiny_model("llama"), preference_batch(n_pairs=2, seq_len=9, seed=5), None)


def test_apply_parity_gemma3_without_softcap(tiny_model, preference_batch, check_parity, simpo_options):
    check_parity(tiny_model("gemma3_text", final_logit_softcapping=None), preference_batch(seed=6), simpo_options)


def test_apply_parity_chunk_size_larger_than_batch(tiny_model, preference_batch, check_parity, simpo_options):
    batch = preference_batch(n_pairs=1, seq_len=13, seed=7)
    check_parity(tiny_model("llama"), batch, {**simpo_options, "chunk_size": 7})


def test_apply_parity_float32_model(tiny_model, preference_batch, check_parity, simpo_options):
    """float32 model against the float64 reference of its own logits: the float32 tolerance of docs/interface.md."""
    model = tiny_model("qwen2", dtype=torch.float32)
    check_parity(model, preference_batch(seed=2), simpo_options, tolerance=dict(rtol=5e-4, atol=1e-5))


def test_apply_parity_tied_embeddings(tiny_model, preference_batch, check_parity, simpo_options):
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    input_ids, attention_mask, labels = preference_batch(seed=3)
    check_parity(model, (input_ids, attention_mask, labels), simpo_options)
    # The head's gradient reached the shared matrix: rows of tokens absent from the input get one only from it.
    absent_tokens = torch.ones(model.config.vocab_size, dtype=torch.bool)
    absent_tokens[input_ids.unique()] = False
    assert absent_tokens.any()
    apply_fused_simpo(model)
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert model.model.embed_tokens.weight.grad[absent_tokens].abs().sum() > 0


def test_apply_parity_gradient_checkpointing(tiny_model, preference_batch, check_parity, simpo_options):
    def enable_checkpointing(model):
        model.gradient_checkpointing_enable()
        model.train()  # HF checkpoints only in training mode; these configs have no dropout
        assert all(layer.gradient_checkpointing for layer in model.model.layers)

    model = tiny_model("mistral")
    check_parity(model, preference_batch(seed=4), simpo_options, before_patch=enable_checkpointing)


def test_apply_parity_lm_head_with_bias(tiny_model, preference_batch, check_parity, simpo_options):
    model = tiny_model("llama")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True, dtype=torch.float64)
    torch.nn.init.normal_(head.bias, std=1.0)
    model.lm_head = head
    check_parity(model, preference_batch(seed=8), simpo_options)


def test_apply_parity_shift_labels(tiny_model, preference_batch, check_parity, simpo_options):
    """A ``shift_labels`` kwarg is the target as given (HF convention): ``labels`` is then only the trigger."""
    input_ids, attention_mask, labels = preference_batch(seed=9)
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    model = tiny_model("qwen3")
    check_parity(model, (input_ids, attention_mask, labels), simpo_options, shift_labels=shift_labels)

    apply_fused_simpo(model, **simpo_options)
    unrelated_labels = torch.randint(0, model.config.vocab_size, labels.shape)
    with torch.no_grad():
        from_labels = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        from_shift_labels = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=unrelated_labels, shift_labels=shift_labels
        ).loss
        from_unrelated = model(input_ids=input_ids, attention_mask=attention_mask, labels=unrelated_labels).loss
    torch.testing.assert_close(from_shift_labels, from_labels, rtol=0, atol=0)
    assert not torch.allclose(from_unrelated, from_labels)


def test_apply_parity_decoder_kwargs_pass_through(tiny_model, preference_batch, check_parity, simpo_options):
    """``position_ids``, ``output_hidden_states`` and ``use_cache`` reach the decoder on the SimPO path."""
    model = tiny_model("llama")
    input_ids, attention_mask, labels = batch = preference_batch(seed=10)
    position_ids = 2 * torch.arange(input_ids.shape[1]).expand_as(input_ids)  # RoPE: only gaps change anything
    model_kwargs = dict(position_ids=position_ids, output_hidden_states=True, use_cache=False)
    unpatched = check_parity(model, batch, simpo_options, model_kwargs=model_kwargs)

    apply_fused_simpo(model, **simpo_options)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **model_kwargs)
        default_positions = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert output.past_key_values is None
    assert len(output.hidden_states) == len(unpatched.hidden_states) == model.config.num_hidden_layers + 1
    for hidden, expected in zip(output.hidden_states, unpatched.hidden_states):
        torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
    assert not torch.allclose(default_positions, output.loss)  # the offset positions were really used
