"""Packed ("padding-free") batches through the patched forward: one row, position_ids restarting at each sequence,
no attention mask. Same loss, log-probs, rewards and parameter gradients as the padded batch of the same pairs."""
import pytest
import torch

from patches import apply_fused_simpo, revert_fused_simpo
from patches.fused_forward import PACKED_ATTENTION
from patches.labels import packed_sequence_offsets
from tests.helpers import padded_and_packed, preference_sequences

#: (prompt, chosen answer, rejected answer) lengths: ragged, and pair 2's rejected answer is empty
PAIRS = [(3, 5, 2), (1, 7, 4), (4, 3, 0), (2, 1, 6)]
OPTIONS = dict(beta=2.5, gamma=0.7, alpha=0.6, label_smoothing=0.15, compute_nll_loss=True)
F32 = dict(rtol=5e-4, atol=2e-5)
FAMILIES = {"llama": {}, "mistral": {}, "qwen2": {}, "gemma2": dict(final_logit_softcapping=3.0)}


def sequences(pairs=PAIRS, seed=0):
    """(prompt ids, answer ids) of the 2B sequences: the chosen ones, then the rejected ones."""
    return preference_sequences(pairs, seed)


def packed_inputs(packed):
    """The no-label forward of a packed row: a KV cache would make transformers mix the sequences."""
    return dict(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)


def run(model, batch):
    output = model(**batch)
    output.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return output, grads


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_packed_equals_padded_per_family(model_type, tiny_model):
    model = tiny_model(model_type, dtype=torch.float32, **FAMILIES[model_type])
    padded, packed = padded_and_packed(sequences(seed=len(model_type)))
    if model_type in ("llama", "gemma2"):  # gradient checkpointing (training mode; no dropout in these configs)
        model.gradient_checkpointing_enable()
        model.train()
    apply_fused_simpo(model, **OPTIONS, chunk_size=2)
    expected, expected_grads = run(model, padded)
    output, grads = run(model, packed)
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "nll_loss"):
        torch.testing.assert_close(getattr(output, name), getattr(expected, name), **F32, msg=name)
    assert output.rejected_logps[2] == 0  # the empty answer
    assert grads.keys() == expected_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **F32, msg=lambda m: f"grad of {name}: {m}")

    # the logits means average the real positions of each half (no padding to average over)
    revert_fused_simpo(model)
    logits = model(**packed_inputs(packed)).logits[0].double()
    n_chosen = sum(len(p) + len(a) for p, a in sequences(seed=len(model_type))[: len(PAIRS)])
    torch.testing.assert_close(output.chosen_logits_mean.double(), logits[:n_chosen].mean(), **F32)
    torch.testing.assert_close(output.rejected_logits_mean.double(), logits[n_chosen:].mean(), **F32)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_unpatched_packed_logits_equal_the_padded_ones(implementation, tiny_model):
    """What the packed loss relies on: the decoder keeps packed sequences apart given position_ids alone."""
    model = tiny_model("mistral", dtype=torch.float32, attn_implementation=implementation)
    assert model.config._attn_implementation == implementation in PACKED_ATTENTION
    seqs = sequences(seed=3)
    padded, packed = padded_and_packed(seqs)
    with torch.no_grad():
        packed_logits = model(**packed_inputs(packed)).logits[0]
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    start = 0
    for row, (prompt, answer) in enumerate(seqs):
        n = len(prompt) + len(answer)
        torch.testing.assert_close(packed_logits[start : start + n], padded_logits[row, :n], **F32)
        start += n


def test_no_label_forward_and_generate_are_untouched(tiny_model):
    model = tiny_model("llama", dtype=torch.float32)
    _, packed = padded_and_packed(sequences(seed=4))
    inputs = packed_inputs(packed)
    prompt = packed["input_ids"][:, :4]
    with torch.no_grad():
        expected_logits = model(**inputs).logits
        expected_tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
        apply_fused_simpo(model)
        torch.testing.assert_close(model(**inputs).logits, expected_logits, rtol=0, atol=0)
        assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), expected_tokens)


def test_packed_batches_that_would_mix_sequences_are_refused(tiny_model):
    model = apply_fused_simpo(tiny_model("llama", dtype=torch.float32))
    _, packed = padded_and_packed(sequences(seed=5))
    with pytest.raises(ValueError, match="cannot use a KV cache.*use_cache=False"):
        model(**packed, use_cache=True)
    model.config._attn_implementation = "paged|sdpa"  # a kernel the packed-mask detection does not cover
    with pytest.raises(ValueError, match="attn_implementation='paged\\|sdpa'.*flex_attention"):
        model(**packed)


def test_an_odd_number_of_packed_sequences_is_refused_with_the_count(tiny_model):
    model = apply_fused_simpo(tiny_model("llama", dtype=torch.float32))
    seqs = sequences(seed=5)
    _, packed = padded_and_packed(seqs)
    first, second = (len(prompt) + len(answer) for prompt, answer in seqs[:2])
    cut = {  # tokens kept -> the start of each sequence left and how the restarts are counted
        first - 1: ("never restart", "1 sequence", "0"),
        first + second + 1: ("restart 2 times", "3 sequences", f"0, {first}, {first + second}"),
    }
    for n_tokens, (restarts, count, starts) in cut.items():
        with pytest.raises(ValueError) as refusal:
            model(**{key: value[:, :n_tokens] for key, value in packed.items()})
        message = str(refusal.value)
        assert message.startswith(f"position_ids {restarts}, so this packed batch"), message
        assert f"holds {count} (starting at tokens {starts});" in message
        assert "needs an even number of sequences, 2B: B chosen, then their B rejected" in message


def test_a_packed_batch_with_an_attention_mask_is_refused_as_packed(tiny_model):
    """With a mask, transformers would let each packed sequence attend to the ones before it: say to drop it."""
    model = apply_fused_simpo(tiny_model("llama", dtype=torch.float32))
    _, packed = padded_and_packed(sequences(seed=7))
    with pytest.raises(ValueError, match=r"^this looks like a packed batch \(one row whose position_ids restart at 0 "
                       rf"for each of {2 * len(PAIRS)} sequences\) given together with an attention_mask: pass it "
                       "without attention_mask"):
        model(**packed, attention_mask=torch.ones_like(packed["input_ids"]))
    # one row that is no packed batch: the row count is the error, and what a packed one would need
    with pytest.raises(ValueError, match="even number of rows.*got 1. A packed batch .* needs position_ids restarting "
                       "at 0 at each sequence and no attention_mask"):
        model(input_ids=packed["input_ids"], attention_mask=torch.ones_like(packed["input_ids"]),
              labels=packed["labels"])


def test_sequence_offsets_follow_transformers_restart_rule():
    # a sequence starts wherever the position does not follow the previous one (not only at 0)
    positions = torch.tensor([[0, 1, 2, 0, 1, 5, 6, 0]])
    assert packed_sequence_offsets(positions).tolist() == [0, 3, 5, 7, 8]


def test_a_sequence_never_predicts_the_next_ones_first_token(tiny_model):
    """Labels on each sequence's first token (as a user may pass them) change nothing: the shift stays inside."""
    model = apply_fused_simpo(tiny_model("qwen2", dtype=torch.float32), **OPTIONS)
    _, packed = padded_and_packed(sequences(seed=6))
    starts = packed["position_ids"][0] == 0
    labelled = dict(packed, labels=torch.where(starts, packed["input_ids"], packed["labels"]))
    assert not torch.equal(labelled["labels"], packed["labels"])
    expected, output = model(**packed), model(**labelled)
    torch.testing.assert_close(output.loss, expected.loss, rtol=0, atol=0)
    torch.testing.assert_close(output.chosen_logps, expected.chosen_logps, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_packed_equals_padded_on_cuda(implementation, tiny_model):
    """The fast path of the loss with the GPU attention kernels: flex_attention runs the packed row block-sparse."""
    # flex_attention's CUDA kernels need a head dimension of at least 16
    model = tiny_model("llama", dtype=torch.float32, hidden_size=64, head_dim=16).cuda().train()
    padded, packed = padded_and_packed(sequences(seed=7))
    apply_fused_simpo(model, **OPTIONS)
    model.set_attn_implementation("sdpa")
    expected, expected_grads = run(model, {k: v.cuda() for k, v in padded.items()})
    model.set_attn_implementation(implementation)
    output, grads = run(model, {k: v.cuda() for k, v in packed.items()})
    for name in ("loss", "chosen_logps", "rejected_logps", "nll_loss"):
        torch.testing.assert_close(getattr(output, name), getattr(expected, name), **F32, msg=name)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **F32, msg=lambda m: f"grad of {name}: {m}")
