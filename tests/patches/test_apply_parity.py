"""Patched forward == TRL's CPOTrainer(loss_type="simpo") on the unpatched model's logits: loss, statistics
and every parameter gradient, for each supported family (float64 models, so any real mismatch shows)."""
import pytest
import torch
import torch.nn.functional as F

from patches import apply_fused_simpo, revert_fused_simpo

#: non-default values for every option, so a dropped or swapped option changes the result
OPTIONS = dict(beta=2.5, gamma=0.7, alpha=0.6, label_smoothing=0.15, compute_nll_loss=True)
#: the defaults the issue fixes for apply_fused_simpo
ISSUE_DEFAULTS = dict(beta=2.0, gamma=1.0, alpha=1.0, label_smoothing=0.0, compute_nll_loss=False)
STATISTICS = (
    "chosen_logps",
    "rejected_logps",
    "chosen_rewards",
    "rejected_rewards",
    "chosen_logits_mean",
    "rejected_logits_mean",
    "nll_loss",
)
FLOAT64_TOLERANCE = dict(rtol=1e-9, atol=1e-11)
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


def check_parity(
    model, batch, trl_reference, grads_of, options, *, tolerance=FLOAT64_TOLERANCE, before_patch=None, **call_kwargs
):
    """Reference from the unpatched model, then the patched model on the same batch; compare everything.

    ``options`` None: apply with no arguments and expect the issue's defaults. ``before_patch(model)`` runs
    after the reference (e.g. to switch gradient checkpointing on only for the patched run).
    Returns the reference logits.
    """
    input_ids, attention_mask, labels = batch
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    math_options = {name: (options or ISSUE_DEFAULTS)[name] for name in ISSUE_DEFAULTS}
    reference = trl_reference(logits, labels, **math_options)
    reference["loss"].backward()
    expected_grads = grads_of(model)

    if before_patch is not None:
        before_patch(model)
    apply_fused_simpo(model, **(options or {}))
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **call_kwargs)
    output.loss.backward()
    grads = grads_of(model)
    revert_fused_simpo(model)

    assert output.logits is None
    torch.testing.assert_close(output.loss.double(), reference["loss"].detach(), **tolerance)
    for name in STATISTICS:
        torch.testing.assert_close(getattr(output, name).double(), reference[name], **tolerance, msg=name)
    assert grads.keys() == expected_grads.keys()
    for name, expected in expected_grads.items():
        torch.testing.assert_close(grads[name], expected, **tolerance, msg=lambda m: f"grad of {name}: {m}")
    return logits


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_apply_parity_per_family(model_type, tiny_model, preference_batch, trl_reference, grads_of):
    model = tiny_model(model_type, **FAMILIES[model_type])
    logits = check_parity(model, preference_batch(), trl_reference, grads_of, {**OPTIONS, "chunk_size": 2})
    if "final_logit_softcapping" in FAMILIES[model_type]:
        # capped logits near the cap: the tanh is far from linear, so ignoring it could not pass
        assert logits.abs().max() > 0.8 * SOFTCAP


def test_apply_parity_issue_defaults(tiny_model, preference_batch, trl_reference, grads_of):
    check_parity(tiny_model("llama"), preference_batch(n_pairs=2, seq_len=9, seed=5), trl_reference, grads_of, None)


def test_apply_parity_gemma3_without_softcap(tiny_model, preference_batch, trl_reference, grads_of):
    model = tiny_model("gemma3_text", final_logit_softcapping=None)
    check_parity(model, preference_batch(seed=6), trl_reference, grads_of, OPTIONS)


def test_apply_parity_chunk_size_larger_than_batch(tiny_model, preference_batch, trl_reference, grads_of):
    batch = preference_batch(n_pairs=1, seq_len=13, seed=7)
    check_parity(tiny_model("llama"), batch, trl_reference, grads_of, {**OPTIONS, "chunk_size": 7})


def test_apply_parity_float32_model(tiny_model, preference_batch, trl_reference, grads_of):
    """float32 model against the float64 reference of its own logits: SPEC §8 float32 tolerance."""
    model = tiny_model("qwen2", dtype=torch.float32)
    check_parity(model, preference_batch(seed=2), trl_reference, grads_of, OPTIONS, tolerance=dict(rtol=5e-4, atol=1e-5))


def test_apply_parity_tied_embeddings(tiny_model, preference_batch, trl_reference, grads_of):
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    check_parity(model, preference_batch(seed=3), trl_reference, grads_of, OPTIONS)
    # the head's gradient reached the shared embedding: rows of tokens never fed in still get one via the head
    unused_tokens = torch.ones(model.config.vocab_size, dtype=torch.bool)
    unused_tokens[preference_batch(seed=3)[0].unique()] = False
    apply_fused_simpo(model)
    input_ids, attention_mask, labels = preference_batch(seed=3)
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert model.model.embed_tokens.weight.grad[unused_tokens].abs().sum() > 0


def test_apply_parity_gradient_checkpointing(tiny_model, preference_batch, trl_reference, grads_of):
    def enable_checkpointing(model):
        model.gradient_checkpointing_enable()
        model.train()  # HF checkpoints only in training mode; these configs have no dropout
        assert all(layer.gradient_checkpointing for layer in model.model.layers)

    model = tiny_model("mistral")
    check_parity(model, preference_batch(seed=4), trl_reference, grads_of, OPTIONS, before_patch=enable_checkpointing)


def test_apply_parity_lm_head_with_bias(tiny_model, preference_batch, trl_reference, grads_of):
    model = tiny_model("llama")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True, dtype=torch.float64)
    torch.nn.init.normal_(head.bias, std=1.0)
    model.lm_head = head
    check_parity(model, preference_batch(seed=8), trl_reference, grads_of, OPTIONS)
    assert "lm_head.bias" in dict(model.named_parameters())


def test_apply_parity_shift_labels(tiny_model, preference_batch, trl_reference, grads_of):
    """A ``shift_labels`` kwarg is the target as given (HF convention): ``labels`` itself is then not read."""
    input_ids, attention_mask, labels = preference_batch(seed=9)
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    unrelated_labels = torch.randint(0, 97, labels.shape)
    model = tiny_model("qwen3")
    check_parity(
        model,
        (input_ids, attention_mask, labels),
        trl_reference,
        grads_of,
        OPTIONS,
        shift_labels=shift_labels,
    )
    apply_fused_simpo(model, **OPTIONS)
    with torch.no_grad():
        from_labels = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        from_shift = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=unrelated_labels, shift_labels=shift_labels
        ).loss
    torch.testing.assert_close(from_shift, from_labels, rtol=0, atol=0)
