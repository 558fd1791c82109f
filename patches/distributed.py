"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models patched with :func:`patches.apply_fused_simpo`.

Sharding layout of :func:`shard_fused_simpo_model` (what ``fully_shard`` gets):

* each decoder layer (the classes in the model's ``_no_split_modules``) is its own FSDP unit: all-gathered for its
  forward, freed after (``reshard_after_forward``), all-gathered again for its backward;
* the root unit holds everything else: the embedding, the final norm and ``lm_head``. The root is all-gathered when
  the model's forward starts and stays unsharded until its gradients are reduce-scattered at the end of backward,
  so the fused loss sees the whole ``lm_head.weight`` (and a tied embedding stays one parameter in one unit).

The patched forward calls the fused loss *through* ``lm_head``'s module call, so other layouts work too: an
``lm_head`` that is its own unit (``fully_shard(model.lm_head)``) or accelerate's ``[norm, lm_head]`` unit are
all-gathered by their pre-forward hook and reduce-scattered by their post-backward hook like any ``nn.Linear``.

Data parallelism: each rank takes its own pairs of the ``[chosen; rejected]`` global batch
(:func:`local_pairs`). Every rank's loss is the mean over its pairs and FSDP averages the gradients over ranks,
so equal pair counts per rank give exactly the gradient of the global batch's mean loss.

With accelerate (a training loop of your own under ``accelerate launch``): :func:`shard_with_accelerate` shards
through ``Accelerator.prepare`` with :func:`accelerate_fsdp2_plugin`, the layout the ``[norm, lm_head]`` paragraph
above describes.
"""
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from patches.apply import unwrap_peft


def end_distributed_run() -> None:
    """Under torchrun/accelerate: wait for every rank, then close the process group (nothing otherwise). Rank 0
    writes its files after the others have finished training; a rank that exits with its group still open
    aborts its process ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def mixed_precision_policy(
    param_dtype: torch.dtype = torch.bfloat16, reduce_dtype: torch.dtype = torch.float32
) -> MixedPrecisionPolicy:
    """bf16 compute, fp32 gradient reduction: the sharded parameters (and the optimizer) stay in their dtype.

    Forward and backward run on ``param_dtype`` copies gathered for the purpose; gradients are reduce-scattered in
    ``reduce_dtype`` into the shards' dtype.
    """
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The transformer blocks of ``model``: modules whose class is in the HF model's ``_no_split_modules``."""
    layer_class_names = set(getattr(unwrap_peft(model), "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in layer_class_names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no decoder layer found (its _no_split_modules is {sorted(layer_class_names)}); "
            "shard it with fully_shard yourself, lm_head in the root unit"
        )
    return layers


def _embeddings_tied(model: torch.nn.Module) -> bool:
    hf_model = unwrap_peft(model)
    output_embeddings = hf_model.get_output_embeddings()
    return output_embeddings is not None and output_embeddings.weight is hf_model.get_input_embeddings().weight


#: communication backend -> the device type its collectives run on (the inverse of torch's
#: ``Backend.default_device_backend_map`` for the backends that name one device type)
_BACKEND_DEVICE_TYPES = {"gloo": "cpu", "nccl": "cuda", "xccl": "xpu"}


def mesh_device_type(backend: str) -> str:
    """The device type a mesh over a process group with ``backend`` must have: gloo -> cpu, nccl -> cuda.

    A multi-device backend string (``"cpu:gloo,cuda:nccl"``) gives its accelerator, if it names one.
    """
    device_backends = [part.split(":", 1) for part in str(backend).lower().split(",") if ":" in part]
    if device_backends:
        device_types = [device_type.strip() for device_type, _ in device_backends]
        accelerators = [device_type for device_type in device_types if device_type != "cpu"]
        return (accelerators or device_types)[0]
    try:
        return _BACKEND_DEVICE_TYPES[str(backend).lower()]
    except KeyError:
        raise ValueError(
            f"process group backend {backend!r}: no known device type for it (known: "
            f"{sorted(_BACKEND_DEVICE_TYPES)}); pass mesh=init_device_mesh(<device type>, (world_size,))"
        ) from None


def default_mesh(mesh_dim_names: Optional[Tuple[str]] = None) -> DeviceMesh:
    """A 1-D mesh of all ranks on the device type of the default process group's backend (dimension named
    ``mesh_dim_names``, if given, e.g. for accelerate).

    ``fully_shard`` without a mesh puts every rank on the machine's accelerator (``cuda:<rank>``) whatever the
    backend, so a gloo group of more processes than GPUs fails (``invalid device ordinal``); a gloo group gets a
    CPU mesh here instead.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "shard_fused_simpo_model needs a process group: call torch.distributed.init_process_group first "
            "(torchrun sets up its environment), or pass mesh="
        )
    return init_device_mesh(
        mesh_device_type(dist.get_backend()), (dist.get_world_size(),), mesh_dim_names=mesh_dim_names
    )


def shard_fused_simpo_model(
    model: torch.nn.Module,
    mesh: Optional[DeviceMesh] = None,
    mp_policy: Optional[MixedPrecisionPolicy] = None,
    reshard_after_forward: bool = True,
) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2 (one unit per decoder layer, the rest in the root); returns it.

    ``mesh``: a 1-D ``DeviceMesh``, used as given (default: :func:`default_mesh`, all ranks on the device type
    of the process group's backend: gloo -> CPU, nccl -> the current CUDA device of each rank). ``mp_policy``: e.g.
    :func:`mixed_precision_policy` for bf16 compute with fp32 reduction (default: compute in the parameters' dtype).
    ``reshard_after_forward`` applies to the decoder layers (the root is never resharded after forward).
    Call it before building the optimizer; patching with :func:`patches.apply_fused_simpo` may come before or after.
    """
    tied = _embeddings_tied(model)
    options = dict(mesh=default_mesh() if mesh is None else mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)
    if tied and not _embeddings_tied(model):
        raise RuntimeError("fully_shard untied lm_head from the input embedding")  # both must stay in the root
    return model


def accelerate_fsdp2_plugin(**options):
    """accelerate's ``FullyShardedDataParallelPlugin`` for FSDP2 with a unit per decoder layer
    (``transformer_based_wrap`` over the model's ``_no_split_modules``), as ``configs/accelerate_fsdp2.yaml`` sets
    it; ``options`` are further plugin arguments and override these two."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    options = {"fsdp_version": 2, "auto_wrap_policy": "transformer_based_wrap", **options}
    return FullyShardedDataParallelPlugin(**options)


def shard_with_accelerate(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, accelerator=None):
    """Shard ``model`` (and its ``optimizer``) with accelerate's FSDP2, through its public API:
    ``accelerator.prepare(model, optimizer)``. Returns the prepared ``(model, optimizer)`` (``optimizer`` None if
    none was given).

    ``accelerator``: an ``accelerate.Accelerator`` set up for FSDP2 (default: a new
    ``Accelerator(fsdp_plugin=accelerate_fsdp2_plugin())``, its mixed precision from ``accelerate launch`` or the
    environment; accelerate's state is one per process, so pass yours if you have one). Build the optimizer over
    the unsharded model first: accelerate swaps its parameters for the shards. Patching with
    :func:`patches.apply_fused_simpo` may come before or after.

    Raises ``RuntimeError`` if the accelerator does not use FSDP2: accelerate sets FSDP up on accelerators (GPUs)
    only, and on CPU or in one process it ignores the plugin, so ``prepare`` would not shard at all.
    """
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(fsdp_plugin=accelerate_fsdp2_plugin())
    if not accelerator.is_fsdp2:
        raise RuntimeError(
            f"this Accelerator does not use FSDP2 (distributed type {accelerator.distributed_type}): accelerate sets "
            "FSDP up on GPUs under `accelerate launch`/torchrun only; elsewhere shard with shard_fused_simpo_model"
        )
    tied = _embeddings_tied(model)
    if optimizer is None:
        model = accelerator.prepare(model)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if tied and not _embeddings_tied(model):
        raise RuntimeError("accelerate's FSDP2 untied lm_head from the input embedding")
    return model, optimizer


def local_pairs(n_pairs: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> torch.Tensor:
    """Row indices of this rank's share of a ``[chosen; rejected]`` batch of ``n_pairs`` pairs.

    Rank ``r`` takes pairs ``[r·k, (r+1)·k)`` with ``k = n_pairs / world_size``: their chosen rows, then their
    rejected rows, so its local batch is again ``[chosen; rejected]``. Index a global batch's tensors with it.
    """
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    if n_pairs % world_size:
        raise ValueError(
            f"{n_pairs} pairs do not split evenly over {world_size} ranks: the averaged gradients would no longer "
            "be those of the global batch's mean loss"
        )
    per_rank = n_pairs // world_size
    pairs = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    return torch.cat([pairs, n_pairs + pairs])


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """All-reduced mean of a tensor over the ranks (e.g. each rank's loss: the global batch's loss)."""
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_gradients(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: whole gradient}`` of every parameter that has one, gathered from the shards (collective); an
    unsharded model's gradients are copied as they are."""
    return {
        name: _full(parameter.grad).detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The whole state dict as CPU tensors on rank 0 (``{}`` on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_full_model(model: torch.nn.Module, output_dir: Union[str, Path], tokenizer=None) -> None:
    """Save a sharded model as a plain HF checkpoint (safetensors) that ``from_pretrained`` reloads anywhere.

    Collective: every rank gathers its shards into rank 0's full state dict; rank 0 writes. The patch is not
    saved (it lives on the instance): reload, then call :func:`patches.apply_fused_simpo` again.
    """
    state_dict = full_state_dict(model)
    if dist.get_rank() == 0:
        # save_pretrained drops the tied lm_head.weight itself and names the class without FSDP's prefix
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    dist.barrier()


__all__ = [
    "mixed_precision_policy",
    "decoder_layers",
    "mesh_device_type",
    "default_mesh",
    "shard_fused_simpo_model",
    "accelerate_fsdp2_plugin",
    "shard_with_accelerate",
    "local_pairs",
    "mean_over_ranks",
    "full_gradients",
    "full_state_dict",
    "save_full_model",
]
