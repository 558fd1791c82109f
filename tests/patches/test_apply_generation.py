"""Without labels a patched model is the original model: logits, KV cache, logits_to_keep and generate()."""
import pytest
import torch

from patches import apply_fused_simpo, fused_simpo
from patches.outputs import CACHE_FIELD


def left_padded_prompts(seed=0, rows=3, length=7, vocab=97):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    attention_mask[2, :1] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def run_unpatched_and_patched(model, call):
    """``call(model)`` on the original model, then inside ``fused_simpo(model)``."""
    expected = call(model)
    with fused_simpo(model, beta=2.5):
        assert "forward" in model.__dict__
        actual = call(model)
    return expected, actual


@pytest.mark.parametrize("model_type, overrides", [("llama", {}), ("gemma2", dict(final_logit_softcapping=3.0))])
def test_forward_without_labels_is_untouched(model_type, overrides, tiny_model):
    model = tiny_model(model_type, **overrides)
    input_ids, attention_mask = left_padded_prompts()

    def forward(m):
        with torch.no_grad():
            full = m(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
            last = m(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
            as_tuple = m(input_ids=input_ids, attention_mask=attention_mask, return_dict=False, use_cache=False)
        return full, last, as_tuple

    (full, last, as_tuple), (full_p, last_p, as_tuple_p) = run_unpatched_and_patched(model, forward)
    assert type(full_p) is type(full)
    # Some transformers versions give NaN logits on left-padded rows of an unpatched Gemma-2: the patched forward
    # must give NaN exactly there too, and equal values everywhere else (row 1 has no padding: always finite).
    assert full.logits[1].isfinite().all()
    torch.testing.assert_close(full_p.logits, full.logits, rtol=0, atol=0, equal_nan=True)
    assert last_p.logits.shape == (3, 1, model.config.vocab_size)
    torch.testing.assert_close(last_p.logits, last.logits, rtol=0, atol=0, equal_nan=True)
    assert isinstance(as_tuple_p, tuple)
    torch.testing.assert_close(as_tuple_p[0], as_tuple[0], rtol=0, atol=0, equal_nan=True)
    cache, cache_p = getattr(full, CACHE_FIELD), getattr(full_p, CACHE_FIELD)
    for layer, layer_p in zip(cache.layers, cache_p.layers):
        torch.testing.assert_close(layer_p.keys, layer.keys, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(layer_p.values, layer.values, rtol=0, atol=0, equal_nan=True)


def test_generate_is_untouched(tiny_model):
    model = tiny_model("qwen3")
    input_ids, attention_mask = left_padded_prompts(seed=1)

    def generate(m):
        return m.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=6,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )

    expected, actual = run_unpatched_and_patched(model, generate)
    assert expected.sequences.shape[1] > input_ids.shape[1]
    assert torch.equal(actual.sequences, expected.sequences)
    for scores, scores_p in zip(expected.scores, actual.scores):
        assert torch.equal(scores_p, scores)


def test_incremental_decoding_with_cache_position(tiny_model):
    """One decoding step fed the cache and explicit ``cache_position``/``position_ids`` by hand."""
    model = tiny_model("mistral")
    input_ids, _ = left_padded_prompts(seed=2)
    next_token = torch.randint(3, 97, (3, 1))

    def two_steps(m):
        with torch.no_grad():
            prefix = m(input_ids=input_ids, use_cache=True)
            step = m(
                input_ids=next_token,
                **{CACHE_FIELD: getattr(prefix, CACHE_FIELD)},
                cache_position=torch.tensor([input_ids.shape[1]]),
                position_ids=torch.full((3, 1), input_ids.shape[1]),
                use_cache=True,
            )
        return step.logits

    expected, actual = run_unpatched_and_patched(model, two_steps)
    assert torch.equal(actual, expected)
    apply_fused_simpo(model)
    with torch.no_grad():
        full = model(input_ids=torch.cat((input_ids, next_token), dim=1)).logits[:, -1:]
    torch.testing.assert_close(actual, full)
