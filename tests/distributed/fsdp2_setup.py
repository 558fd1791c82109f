"""What every FSDP2 parity run shares: model, global batch, SimPO options, training loop and sharding layouts.

Used by the CPU parity test ``tests/distributed`` (2 processes, gloo), by ``tests/helpers.py`` (the batch) and by
``benchmarks/multi_gpu_parity.py`` (GPUs, NCCL). The sharded run and its single-process reference build the same
random-init Llama from the same seed and train it on the same global batch, so every difference comes from the
sharding.
"""
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from patches import apply_fused_simpo
from patches.distributed import (
    accelerate_fsdp2_plugin,
    decoder_layers,
    default_mesh,
    mesh_device_type,
    shard_fused_simpo_model,
    shard_with_accelerate,
)

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


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of every run: SGD with momentum over ``model``'s parameters."""
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Dict[str, torch.Tensor],
    steps: int,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    gradients_of: Callable[[torch.nn.Module], Dict[str, torch.Tensor]],
) -> Dict[str, List]:
    """``steps`` steps of ``optimizer`` (:func:`sgd`) on ``batch``: per step the (global) loss and every gradient
    before the update, and the dtypes the gradients had."""
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


@functools.lru_cache(maxsize=None)
def fsdp2_accelerator():
    """The ``Accelerator`` of the ``accelerate`` layout, one per process (accelerate's state is process-wide):
    ``Accelerator(fsdp_plugin=accelerate_fsdp2_plugin())`` as ``accelerate launch`` builds it on GPUs; over a gloo
    process group, :func:`cpu_fsdp2_accelerator`."""
    if mesh_device_type(dist.get_backend()) == "cpu":
        return cpu_fsdp2_accelerator()
    from accelerate import Accelerator

    return Accelerator(fsdp_plugin=accelerate_fsdp2_plugin())


def cpu_fsdp2_accelerator():
    """A real ``Accelerator(cpu=True, fsdp_plugin=accelerate_fsdp2_plugin())`` whose state is switched to what it
    would be on GPUs: FSDP with that plugin, and a ``dp_shard`` mesh of all ranks (here on CPU). Needs a gloo
    process group.

    accelerate sets FSDP up on accelerators only: on CPU its state stays ``MULTI_CPU`` (the plugin is ignored and
    a ``ParallelismConfig`` refused), and its ``prepare`` would not shard. Its FSDP2 code itself runs on CPU, so
    after this switch ``accelerator.prepare`` shards through accelerate's own FSDP2 path, as under
    ``accelerate launch`` on GPUs. The switch writes attributes ``AcceleratorState.__init__`` and
    ``Accelerator.__init__`` set on GPUs: the distributed type (in both process-wide states, as accelerate does;
    a later ``AcceleratorState()`` copies ``PartialState``'s over its own), the plugin, the parallelism config and
    its mesh.
    """
    from accelerate import Accelerator, ParallelismConfig
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    plugin = accelerate_fsdp2_plugin()
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    for state in (PartialState(), accelerator.state):
        state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.parallelism_config = ParallelismConfig(dp_shard_size=dist.get_world_size())
    accelerator.state.device_mesh = accelerator.parallelism_config.get_device_mesh("cpu")
    if not (accelerator.is_fsdp2 and accelerator.torch_device_mesh.device_type == "cpu"):
        raise RuntimeError(f"this accelerate release did not take the switch to FSDP2 on CPU: {accelerator.state}")
    return accelerator


def shard(model, layout: str, mp_policy=None, mesh=None) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Shard ``model`` in ``layout``; returns it and its :func:`sgd` optimizer over the shards. ``root``:
    :func:`shard_fused_simpo_model` (its own mesh from the process group). ``accelerate``:
    :func:`shard_with_accelerate` with :func:`fsdp2_accelerator` (a unit per decoder layer, a ``[norm, (embed,)
    lm_head]`` unit, the root; float32 only). ``lm_head_unit``: lm_head alone in a unit resharded after forward
    (its weight is sharded whenever lm_head is not running). ``mesh``: the 1-D mesh of all ranks for
    ``lm_head_unit`` (default: ``default_mesh`` of the process group, dimension ``dp_shard``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    if layout == "accelerate":
        if mp_policy is not None:
            raise ValueError("the accelerate layout runs without mixed precision here")
        return shard_with_accelerate(model, sgd(model), fsdp2_accelerator())
    if layout == "root":
        model = shard_fused_simpo_model(model, mp_policy=mp_policy)
        return model, sgd(model)
    mesh = default_mesh(mesh_dim_names=("dp_shard",)) if mesh is None else mesh
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    model = fully_shard(model, mesh=mesh)
    return model, sgd(model)
