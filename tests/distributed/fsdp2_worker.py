"""FSDP2 side of the CPU parity test, run under torchrun (gloo): ``fsdp2_worker.py OUTPUT_DIR``.

For every scenario of ``scenarios.SCENARIOS``: build the model, shard it, train each rank on its pairs of the
global batch, and record the all-reduced loss and the gathered gradients per step and the final full state
dict. Rank 0 writes them to ``OUTPUT_DIR/results.pt``; the trained models of ``scenarios.SAVED`` are saved as HF
checkpoints under ``OUTPUT_DIR/<scenario>``.
"""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `patches` and `tests`

from patches.distributed import (  # noqa: E402
    decoder_layers,
    default_mesh,
    full_gradients,
    full_state_dict,
    local_pairs,
    mean_over_ranks,
    mixed_precision_policy,
    save_full_model,
    shard_fused_simpo_model,
)
from tests.distributed import scenarios  # noqa: E402


def accelerate_fsdp2(model, mesh):
    """The sharding ``accelerate launch`` with FSDP2 applies (its own ``fsdp2_prepare_model``; accelerate 1.15:
    a unit per decoder layer, a ``[norm, (embed,) lm_head]`` unit never resharded after forward, the root).

    accelerate sets FSDP up on GPUs only; its preparation function itself runs on CPU, given what it reads of
    the Accelerator: the plugin, mixed precision off, and our CPU ``mesh`` of all ranks (without one, FSDP2
    would put the ranks on the machine's GPUs, if it has any).
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


def shard(model, layout: str, mp_policy, mesh):
    """``root``: :func:`shard_fused_simpo_model` (its own mesh from the gloo group). ``accelerate``:
    :func:`accelerate_fsdp2`. ``lm_head_unit``: lm_head alone in a unit resharded after forward (its weight is
    sharded whenever lm_head is not running). ``mesh``: the CPU mesh of all ranks, for the layouts built here."""
    if layout == "root":
        return shard_fused_simpo_model(model, mp_policy=mp_policy)
    if layout == "accelerate":
        return accelerate_fsdp2(model, mesh)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def main(output_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    batch = scenarios.global_batch()
    rows = local_pairs(scenarios.N_PAIRS)
    local_batch = {name: tensor[rows] for name, tensor in batch.items()}
    mesh = default_mesh(mesh_dim_names=("dp_shard",))  # gloo: CPU, also on a machine with fewer GPUs than ranks
    results = {}
    for name, (tied, layout, mixed_precision, steps) in scenarios.SCENARIOS.items():
        model = scenarios.build_model(tied)
        model = shard(model, layout, mixed_precision_policy() if mixed_precision else None, mesh)
        run = scenarios.train(model, local_batch, steps, mean_over_ranks, full_gradients)
        run["state_dict"] = full_state_dict(model)
        run["lm_head_unit"] = isinstance(model.lm_head, FSDPModule)  # sharded outside its own call
        run["tie_kept"] = model.lm_head.weight is model.model.embed_tokens.weight
        run["parameter_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
        results[name] = run
        if name in scenarios.SAVED:
            save_full_model(model, output_dir / name)
    if dist.get_rank() == 0:
        torch.save(results, output_dir / "results.pt")
    dist.barrier()
    # Everything is written and every rank is past its last collective. Under CPU load, gloo's threads
    # sometimes abort the interpreter's teardown ("terminate called without an active exception", about
    # one run in six on 2 busy cores), failing a run whose results are complete: leave without teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
