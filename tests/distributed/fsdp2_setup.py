"""What every FSDP2 parity run shares: model, global batch, SimPO options, training loop and sharding layouts.

Used by the CPU parity test ``tests/distributed`` (2 processes, gloo), by ``tests/helpers.py`` (the batch) and by
``benchmarks/multi_gpu_parity.py`` (GPUs, NCCL). The sharded run and its single-process reference build the same random-init Llama from the
same seed and train it on the same global batch, so every difference comes from the sharding.
"""
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from patches import apply_fused_simpo
from patches.distributed import decoder_layers, default_mesh, shard_fused_simpo_model

N_PAIRS = 4  # global batch: 2 pairs per rank on 2 ranks
SEQ_LEN = 13
#: SGD with momentum: its update is linear in the gradient, so rounding-level gradient differences stay
#: rounding-level in the weights (AdamW's g / (|g| + eps) turns a 1e-8 difference in a gradient near eps
#: into a difference of 0.1·lr in the update)
LEARNING_RATE = 0.05
MOMENTUM = 0.9
#: non-default SimPO options, so a dropped option shows (no NLL term: see docs/distributed.md, "NLL term")
SIMPO_OPTIONS = dict(beta=2.5, gamma=0.7, label_smoothing=0.1, compiled=False)
#: the sharding layouts :func:`shard` builds
LAYOUTS = ("root", "accelerate", "lm_head_unit")

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


def global_batch(
    n_pairs: int = N_PAIRS,
    seq_len: int = SEQ_LEN,
    vocab_size: int = TINY_LLAMA["vocab_size"],
    seed: int = 99,
    max_prompt_length: Optional[int] = None,
    max_padding: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """``[chosen; rejected]`` batch of ``n_pairs`` pairs, the same for the same arguments: per row a prompt of 1 to
    ``max_prompt_length`` tokens (labels -100) and 0 to ``max_padding`` positions of right padding (mask 0, labels
    -100); both default to about a third of ``seq_len``."""
    max_prompt_length = max(1, seq_len // 3 - 1) if max_prompt_length is None else max_prompt_length
    max_padding = seq_len // 3 if max_padding is None else max_padding
    generator = torch.Generator().manual_seed(seed)
    rows = 2 * n_pairs
    input_ids = torch.randint(3, vocab_size, (rows, seq_len), generator=generator)
    positions = torch.arange(seq_len)
    prompt_lengths = torch.randint(1, max_prompt_length + 1, (rows, 1), generator=generator)
    lengths = torch.randint(seq_len - max_padding, seq_len + 1, (rows, 1), generator=generator)
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


def relative_error(gradients: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> float:
    """``‖g − g_ref‖ / ‖g_ref‖`` over all parameters together."""
    difference = sum((gradients[name] - reference[name]).square().sum() for name in reference)
    return (difference / sum(grad.square().sum() for grad in reference.values())).sqrt().item()


def accelerate_fsdp2(model, mesh):
    """The sharding ``accelerate launch`` with FSDP2 applies (its own ``fsdp2_prepare_model``; accelerate 1.15:
    a unit per decoder layer, a ``[norm, (embed,) lm_head]`` unit never resharded after forward, the root).

    accelerate sets FSDP up on GPUs only; its preparation function itself runs on CPU, given what it reads of
    the Accelerator: the plugin, mixed precision off, and our ``mesh`` of all ranks (without one, FSDP2 would
    put the ranks on the machine's GPUs, if it has any).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="no",
        torch_device_mesh=mesh,
        parallelism_config=SimpleNamespace(fsdp_dim_names=mesh.mesh_dim_names),
        is_main_process=dist.get_rank() == 0,
    )
    return fsdp2_prepare_model(accelerator, model)


def shard(model, layout: str, mp_policy=None, mesh=None):
    """Shard ``model`` in ``layout``. ``root``: :func:`shard_fused_simpo_model` (its own mesh from the process
    group). ``accelerate``: :func:`accelerate_fsdp2`. ``lm_head_unit``: lm_head alone in a unit resharded after
    forward (its weight is sharded whenever lm_head is not running). ``mesh``: the 1-D mesh of all ranks for the
    layouts built here (default: ``default_mesh`` of the process group, dimension ``dp_shard``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    if layout == "root":
        return shard_fused_simpo_model(model, mp_policy=mp_policy)
    mesh = default_mesh(mesh_dim_names=("dp_shard",)) if mesh is None else mesh
    if layout == "accelerate":
        return accelerate_fsdp2(model, mesh)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    return fully_shard(model, mesh=mesh)
