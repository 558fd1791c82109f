"""FSDP2 side of the CPU parity test, run under torchrun (gloo): ``fsdp2_worker.py OUTPUT_DIR``.

For every scenario of ``scenarios.SCENARIOS``: build the model, shard it, train each rank on its pairs of the
global batch, and record the all-reduced loss and the gathered gradients per step and the final full state
dict. Rank 0 writes them to ``OUTPUT_DIR/results.pt``; the trained models of ``scenarios.SAVED`` are saved as HF
checkpoints under ``OUTPUT_DIR/<scenario>``.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from patches.distributed import (  # noqa: E402
    default_mesh,
    full_gradients,
    full_state_dict,
    local_pairs,
    mean_over_ranks,
    mixed_precision_policy,
    save_full_model,
)
from tests.distributed import fsdp2_setup, scenarios  # noqa: E402
from tests.distributed.launcher import end_worker  # noqa: E402


def main(output_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    batch = fsdp2_setup.global_batch()
    rows = local_pairs(fsdp2_setup.N_PAIRS)
    local_batch = {name: tensor[rows] for name, tensor in batch.items()}
    mesh = default_mesh(mesh_dim_names=("dp_shard",))  # gloo: CPU, also on a machine with fewer GPUs than ranks
    results = {}
    for name, (tied, layout, mixed_precision, steps) in scenarios.SCENARIOS.items():
        model = fsdp2_setup.build_model(tied)
        model, optimizer = fsdp2_setup.shard(model, layout, mixed_precision_policy() if mixed_precision else None,
                                             mesh)
        run = fsdp2_setup.train(model, optimizer, local_batch, steps, mean_over_ranks, full_gradients)
        run["state_dict"] = full_state_dict(model)
        run["lm_head_unit"] = isinstance(model.lm_head, FSDPModule)  # sharded outside its own call
        run["accelerate_prepared"] = getattr(model, "_is_accelerate_prepared", False)  # by Accelerator.prepare
        run["tie_kept"] = model.lm_head.weight is model.model.embed_tokens.weight
        run["parameter_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
        results[name] = run
        if name in scenarios.SAVED:
            save_full_model(model, output_dir / name)
    if dist.get_rank() == 0:
        torch.save(results, output_dir / "results.pt")
    end_worker()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
