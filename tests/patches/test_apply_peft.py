"""PEFT: LoRA on attention/MLP patched through the PeftModel (parity, revert, generate); adapters on lm_head
refused, at apply time and when added after patching."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from patches import UnsupportedModelError, apply_fused_simpo, revert_fused_simpo

ATTENTION_AND_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


def lora_model(base_model, target_modules=ATTENTION_AND_MLP, **config):
    # init_lora_weights=False: random A and B, so the adapters change the logits and get non-zero gradients
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules, init_lora_weights=False, **config)
    return get_peft_model(base_model, lora)


def test_lora_parity_and_revert(tiny_model, preference_batch, check_parity, simpo_options):
    base = tiny_model("llama")
    peft_model = lora_model(base)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    check_parity(peft_model, preference_batch(seed=12), simpo_options)  # reverts through the PeftModel at the end
    assert "forward" not in base.__dict__
    assert apply_fused_simpo(peft_model) is peft_model
    assert "forward" in base.__dict__  # the HF model inside the wrapper carries the patch
    assert base.accepts_loss_kwargs is False
    revert_fused_simpo(peft_model)
    assert "forward" not in base.__dict__ and "accepts_loss_kwargs" not in base.__dict__


def test_lora_generate_is_untouched(tiny_model):
    peft_model = lora_model(tiny_model("qwen2"))
    input_ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = peft_model.generate(input_ids=input_ids, **options)
    apply_fused_simpo(peft_model)
    assert torch.equal(peft_model.generate(input_ids=input_ids, **options), expected)


@pytest.mark.parametrize(
    "adapter", [dict(target_modules=["q_proj", "lm_head"]), dict(target_modules=["q_proj"], modules_to_save=["lm_head"])]
)
def test_adapter_on_lm_head_is_refused(adapter, tiny_model):
    peft_model = lora_model(tiny_model("llama"), **adapter)
    with pytest.raises(UnsupportedModelError, match="lm_head.*PEFT adapter"):
        apply_fused_simpo(peft_model)
    assert "forward" not in peft_model.get_base_model().__dict__


def test_adapter_on_lm_head_added_after_patching_is_refused_at_call(tiny_model, preference_batch):
    model = apply_fused_simpo(tiny_model("llama"))
    peft_model = lora_model(model, target_modules=["lm_head"])
    input_ids, attention_mask, labels = preference_batch()
    with pytest.raises(UnsupportedModelError, match="lm_head"):
        peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
