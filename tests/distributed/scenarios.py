"""What the 2-process FSDP2 run and its single-process reference share: model, global batch, options, training.

The worker (``fsdp2_worker.py``, under torchrun) and the test (one process) build the same random-init Llama
from the same seed and train it on the same global batch, so every difference comes from the sharding.
"""
from typing import Callable, Dict, List

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from patches import apply_fused_simpo

N_PAIRS = 4  # global batch: 2 pairs per rank on 2 ranks
SEQ_LEN = 13
STEPS = 3
#: SGD with momentum: its update is linear in the gradient, so rounding-level gradient differences stay
#: rounding-level in the weights (AdamW's g / (|g| + eps) turns a 1e-8 difference in a gradient near eps
#: into a difference of 0.1·lr in the update)
LEARNING_RATE = 0.05
MOMENTUM = 0.9
#: non-default SimPO options, so a dropped option shows (no NLL term: see docs/distributed.md, "NLL term")
SIMPO_OPTIONS = dict(beta=2.5, gamma=0.7, label_smoothing=0.1, compiled=False)
#: name -> (tied embeddings, layout, bf16 mixed precision, training steps); layouts: see fsdp2_worker.shard
SCENARIOS = {
    "root": (False, "root", False, STEPS),
    "root_tied": (True, "root", False, STEPS),
    "accelerate_fsdp2": (False, "accelerate", False, 1),
    "accelerate_fsdp2_tied": (True, "accelerate", False, 1),
    "lm_head_own_unit": (False, "lm_head_unit", False, 1),
    "bf16_mixed_precision": (True, "root", True, 1),
}
#: scenarios whose trained model the worker saves (``save_full_model``) for the reload test
SAVED = ("root", "root_tied")


#: random-init Llama with odd sizes; wider init than HF's 0.02 so the logits spread and a wrong shard shows
TINY_LLAMA = dict(
    vocab_size=131,
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=64,
    pad_token_id=0,
    initializer_range=0.2,
)


def build_model(tied: bool, dtype: torch.dtype = torch.float32, **config) -> LlamaForCausalLM:
    """Patched random-init Llama (``TINY_LLAMA`` updated by ``config``), identical for the same arguments."""
    torch.manual_seed(1234)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config, "tie_word_embeddings": tied})).to(dtype)
    return apply_fused_simpo(model, **SIMPO_OPTIONS)


def global_batch(n_pairs: int = N_PAIRS, seq_len: int = SEQ_LEN, vocab_size: int = 131) -> Dict[str, torch.Tensor]:
    """``[chosen; rejected]`` batch of ``n_pairs`` pairs: per-row prompt lengths (-100) and right padding."""
    generator = torch.Generator().manual_seed(99)
    rows = 2 * n_pairs
    input_ids = torch.randint(3, vocab_size, (rows, seq_len), generator=generator)
    positions = torch.arange(seq_len)
    prompt_lengths = torch.randint(1, max(2, seq_len // 3), (rows, 1), generator=generator)
    lengths = torch.randint(seq_len - seq_len // 3, seq_len + 1, (rows, 1), generator=generator)
    attention_mask = (positions < lengths).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill((positions < prompt_lengths) | (attention_mask == 0), -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def train(
    model: torch.nn.Module,
    batch: Dict[str, torch.Tensor],
    steps: int,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    gradients_of: Callable[[torch.nn.Module], Dict[str, torch.Tensor]],
) -> Dict[str, List]:
    """``steps`` SGD steps on ``batch``: per step the (global) loss and every gradient before the update, and
    the dtypes the gradients had."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    losses, gradients, gradient_dtypes = [], [], set()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss_of(loss).item())
        step_gradients = gradients_of(model)
        gradient_dtypes.update(str(grad.dtype) for grad in step_gradients.values())
        gradients.append({name: grad.double().cpu() for name, grad in step_gradients.items()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(losses=losses, gradients=gradients, gradient_dtypes=sorted(gradient_dtypes))


def own_gradients(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: grad}`` of an unsharded model (the single-process counterpart of ``full_gradients``)."""
    return {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}


def relative_error(gradients: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> float:
    """``‖g − g_ref‖ / ‖g_ref‖`` over all parameters together."""
    difference = sum((gradients[name] - reference[name]).square().sum() for name in reference)
    return (difference / sum(grad.square().sum() for grad in reference.values())).sqrt().item()
