"""Heads the fused loss cannot reproduce exactly are refused at apply time, naming the model type."""
import pytest
import torch
from transformers import LlamaModel

from patches import UnsupportedModelError, apply_fused_simpo
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
