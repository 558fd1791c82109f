"""FSDP2 + the fused SimPO loss on several GPUs: parity with one GPU, then per-GPU peak memory and tokens/s.

From the repository root, on one machine with 2 GPUs (NVLink multicast off, as the device's docs require)::

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    torchrun --nproc_per_node 2 benchmarks/multi_gpu_parity.py --out results/multi_gpu
    python3 benchmarks/multi_gpu_parity.py --check-checkpoint DIR    # reload a saved model on one GPU

Parity: a small random-init Llama (vocab 32000, hidden 512, 4 layers), patched (``compiled=True``), trained 3
SGD steps on a global batch of 8 pairs x 256 tokens, each rank on its 4 pairs (``local_pairs``). Rank 0 also
trains an unsharded copy on the whole global batch: the single-GPU run. Compared per step: the loss (all-reduced
mean over ranks) and the gathered gradients; at the end the weights. Layouts: ours (``shard_fused_simpo_model``),
the one ``accelerate launch`` builds, lm_head as its own unit; float32, and bf16 mixed precision (bf16 compute,
fp32 shards and reduction) judged against one GPU computing in plain bf16. The first model is also saved with
``save_full_model`` and reloaded.

Performance: a Llama-3.2-1B-shaped model (vocab 128256, tied), FSDP2 with bf16 mixed precision, AdamW;
one training step patched (fused loss) vs unpatched (SimPO from the full logits, ``simpo_loss_from_logits``) at
4 pairs per GPU and growing length: per-GPU peak memory (``max_memory_allocated``) and global tokens/s (median
of 5 steps after 2 warm-ups).

Writes ``multi_gpu_parity.json`` and ``multi_gpu_parity.md`` into ``--out``. ``--smoke`` runs tiny sizes
(CPU and gloo work) to check the script itself.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.bench_training_memory import LLAMA_3_2_1B  # noqa: E402
from patches import apply_fused_simpo, revert_fused_simpo  # noqa: E402
from patches.distributed import (  # noqa: E402
    full_gradients,
    full_state_dict,
    local_pairs,
    mean_over_ranks,
    mixed_precision_policy,
    save_full_model,
    shard_fused_simpo_model,
)
from patches.trainer import simpo_loss_from_logits  # noqa: E402
from tests.distributed import fsdp2_setup  # noqa: E402  (the model, batch and layouts of the CPU parity test)

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GIB = float(1 << 30)
PARITY_LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
                    initializer_range=0.05)
PARITY_BATCH = dict(n_pairs=8, seq_len=256)
#: name -> (tied embeddings, layout of fsdp2_setup.shard, bf16 mixed precision)
PARITY_RUNS = {
    "fp32, our layout": (False, "root", False),
    "fp32, our layout, tied": (True, "root", False),
    "fp32, accelerate's layout, tied": (True, "accelerate", False),
    "fp32, lm_head its own unit": (False, "lm_head_unit", False),
    "bf16 mixed precision, our layout, tied": (True, "root", True),
}
PARITY_STEPS = 3
#: float32: rounding only (different reduction orders); bf16: at most 1.5x the error of one GPU in plain bf16
FP32_LOSS_TOLERANCE = 1e-4
FP32_GRADIENT_TOLERANCE = 1e-4  # relative, ||g - g_ref|| / ||g_ref|| over all parameters
FP32_WEIGHT_TOLERANCE = 1e-5  # absolute
BF16_LOSS_TOLERANCE = 2e-2
PERF_PAIRS_PER_GPU = 4
PERF_SEQ_LENS = (512, 1024)
PERF_WARMUP, PERF_STEPS = 2, 5


def rank0_print(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)




def parity_model(tied: bool, device, dtype=torch.float32, smoke: bool = False):
    config = {} if smoke else PARITY_LLAMA
    model = fsdp2_setup.build_model(tied, dtype, **config).to(device)
    return apply_fused_simpo(model, **{**fsdp2_setup.SIMPO_OPTIONS, "compiled": True})


def single_device_run(tied: bool, dtype, batch, device, smoke: bool):
    model = parity_model(tied, device, dtype, smoke)
    run = fsdp2_setup.train(model, fsdp2_setup.sgd(model), batch, PARITY_STEPS, lambda loss: loss, full_gradients)
    return run, model


def parity(device, smoke: bool, checkpoint_dir: Path) -> dict:
    """Every PARITY_RUNS entry: FSDP2 on all ranks vs the single-device run on rank 0 (compared there)."""
    batch = {name: tensor.to(device) for name, tensor in fsdp2_setup.global_batch(
        **({} if smoke else dict(PARITY_BATCH, vocab_size=PARITY_LLAMA["vocab_size"]))).items()}
    rows = local_pairs(batch["input_ids"].shape[0] // 2).to(device)
    local_batch = {name: tensor[rows] for name, tensor in batch.items()}
    results = {}
    for name, (tied, layout, mixed_precision) in PARITY_RUNS.items():
        mp_policy = mixed_precision_policy() if mixed_precision else None
        model, optimizer = fsdp2_setup.shard(parity_model(tied, device, smoke=smoke), layout, mp_policy)
        sharded = fsdp2_setup.train(model, optimizer, local_batch, PARITY_STEPS, mean_over_ranks, full_gradients)
        trained = full_state_dict(model)
        if not results:
            save_full_model(model, checkpoint_dir)
        del model
        if dist.get_rank() == 0:
            reference, reference_model = single_device_run(tied, torch.float32, batch, device, smoke)
            entry = dict(
                layout=layout, tied=tied, mixed_precision=mixed_precision,
                losses=sharded["losses"], single_device_losses=reference["losses"],
                loss_difference=max(abs(a - b) for a, b in zip(sharded["losses"], reference["losses"])),
                gradient_relative_error=[fsdp2_setup.relative_error(g, r)
                                         for g, r in zip(sharded["gradients"], reference["gradients"])],
                gradient_dtypes=sharded["gradient_dtypes"],
            )
            if mixed_precision:
                plain_bf16, _ = single_device_run(tied, torch.bfloat16, batch, device, smoke)
                entry["single_device_bf16_gradient_relative_error"] = [
                    fsdp2_setup.relative_error(g, r) for g, r in zip(plain_bf16["gradients"], reference["gradients"])]
                entry["passed"] = entry["loss_difference"] <= BF16_LOSS_TOLERANCE and all(
                    error <= 1.5 * plain + 1e-3 for error, plain in
                    zip(entry["gradient_relative_error"], entry["single_device_bf16_gradient_relative_error"]))
            else:
                reference_state = reference_model.state_dict()
                entry["weight_max_difference"] = max(
                    (value.to(device) - reference_state[key]).abs().max().item() for key, value in trained.items())
                entry["passed"] = (entry["loss_difference"] <= FP32_LOSS_TOLERANCE
                                   and max(entry["gradient_relative_error"]) <= FP32_GRADIENT_TOLERANCE
                                   and entry["weight_max_difference"] <= FP32_WEIGHT_TOLERANCE)
            if name == next(iter(PARITY_RUNS)):
                entry["reloaded_checkpoint_equal"] = checkpoint_equals(checkpoint_dir, trained)
                entry["passed"] = entry["passed"] and entry["reloaded_checkpoint_equal"]
            results[name] = entry
            rank0_print(f"parity [{name}]: {'PASS' if entry['passed'] else 'FAIL'} "
                        f"loss diff {entry['loss_difference']:.2e}, grad rel err "
                        f"{max(entry['gradient_relative_error']):.2e}")
            del reference_model
        else:
            results[name] = {}
        dist.barrier()
    return results


def checkpoint_equals(checkpoint_dir: Path, state_dict) -> bool:
    """Whether ``from_pretrained(checkpoint_dir)`` holds exactly ``state_dict``'s tensors."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint_dir).state_dict()
    return all(torch.equal(reloaded[name], value) for name, value in state_dict.items())


def perf_model(device, smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(fsdp2_setup.TINY_LLAMA, tie_word_embeddings=True) if smoke else LLAMA_3_2_1B
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa", use_cache=False)).train()
    return shard_fused_simpo_model(model, mp_policy=mixed_precision_policy())


def training_step(model, optimizer, patched: bool, batch) -> torch.Tensor:
    if patched:
        loss = model(**batch).loss
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = simpo_loss_from_logits(logits, batch["labels"]).loss
        del logits
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def performance(device, smoke: bool) -> list:
    """Patched vs unpatched under FSDP2 + bf16 mixed precision at each length: peak GiB per rank, tokens/s."""
    model = perf_model(device, smoke)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab_size, world_size = model.config.vocab_size, dist.get_world_size()
    rows = []
    for seq_len in ((16, 32) if smoke else PERF_SEQ_LENS):
        batch = fsdp2_setup.global_batch(PERF_PAIRS_PER_GPU * world_size, seq_len, vocab_size)
        local_batch = {name: tensor[local_pairs(PERF_PAIRS_PER_GPU * world_size)].to(device)
                       for name, tensor in batch.items()}
        for patched in (True, False):
            if patched:
                apply_fused_simpo(model)
            else:
                revert_fused_simpo(model)
            for _ in range(PERF_WARMUP):
                training_step(model, optimizer, patched, local_batch)
            _synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(PERF_STEPS):
                start = time.perf_counter()
                loss = training_step(model, optimizer, patched, local_batch)
                _synchronize(device)
                times.append(time.perf_counter() - start)
            peak = torch.tensor([torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0],
                                device=device)
            peaks = [torch.zeros_like(peak) for _ in range(world_size)]
            dist.all_gather(peaks, peak)
            tokens = 2 * PERF_PAIRS_PER_GPU * seq_len * world_size
            row = dict(patched=patched, seq_len=seq_len, pairs_per_gpu=PERF_PAIRS_PER_GPU, global_tokens=tokens,
                       peak_gib_per_gpu=[round(p.item(), 2) for p in peaks], step_s=statistics.median(times),
                       tokens_per_s=tokens / statistics.median(times), loss=mean_over_ranks(loss).item())
            rows.append(row)
            rank0_print(f"perf: {'patched  ' if patched else 'unpatched'} seq {seq_len}: peak "
                        f"{row['peak_gib_per_gpu']} GiB/GPU, {row['tokens_per_s']:.0f} tokens/s")
    return rows


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']} x{report['world_size']}; torch {report['torch']}, "
             f"transformers {report['transformers']}, accelerate {report['accelerate']}; commit {report['commit']}", "",
             "| parity run | loss (step 1 → 3) | max loss diff | max grad rel err | weights max diff | result |",
             "|---|---|---|---|---|---|"]
    for name, entry in report["parity"].items():
        reference = entry.get("single_device_bf16_gradient_relative_error")
        gradient = f"{max(entry['gradient_relative_error']):.1e}" + (
            f" (1 GPU plain bf16: {max(reference):.1e})" if reference else "")
        weights = f"{entry['weight_max_difference']:.1e}" if "weight_max_difference" in entry else "—"
        lines.append(f"| {name} | {entry['losses'][0]:.4f} → {entry['losses'][-1]:.4f} | "
                     f"{entry['loss_difference']:.1e} | {gradient} | {weights} | "
                     f"{'pass' if entry['passed'] else 'FAIL'} |")
    lines += ["", "| loss | tokens/step (global) | seq len | peak GiB per GPU | step s | tokens/s |",
              "|---|---|---|---|---|---|"]
    for row in report["performance"]:
        lines.append(f"| {'fused (patched)' if row['patched'] else 'from logits (unpatched)'} | "
                     f"{row['global_tokens']} | {row['seq_len']} | {' / '.join(map(str, row['peak_gib_per_gpu']))} | "
                     f"{row['step_s']:.3f} | {row['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def check_checkpoint(path: str) -> None:
    """Reload a saved model on one device, patch it and run one SimPO forward (accelerate smoke run)."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = apply_fused_simpo(AutoModelForCausalLM.from_pretrained(path).to(device))
    batch = fsdp2_setup.global_batch(2, 64, model.config.vocab_size)
    loss = model(**{name: tensor.to(device) for name, tensor in batch.items()}).loss
    print(f"reloaded {type(model).__name__} from {path}: {sum(p.numel() for p in model.parameters())} "
          f"parameters, SimPO loss {loss.item():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/multi_gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script (CPU works)")
    parser.add_argument("--skip-performance", action="store_true")
    parser.add_argument("--check-checkpoint", help="reload this saved model on one device and exit")
    args = parser.parse_args()
    if args.check_checkpoint:
        return check_checkpoint(args.check_checkpoint)
    cuda = torch.cuda.is_available()
    if cuda and any(os.environ.get(name) != value for name, value in MULTICAST_OFF.items()):
        sys.exit(f"set {MULTICAST_OFF} first: NVLink multicast must stay off on this machine")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=180))
    import accelerate
    import transformers

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint_dir = Path(scratch) / "parity_checkpoint"  # written and read by rank 0
        report = dict(
            device=torch.cuda.get_device_name(device) if cuda else "cpu", world_size=dist.get_world_size(),
            torch=torch.__version__, transformers=transformers.__version__, accelerate=accelerate.__version__,
            commit=os.environ.get("GIT_COMMIT") or os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip(),
            parity=parity(device, args.smoke, checkpoint_dir),
        )
        dist.barrier()
    report["performance"] = [] if args.skip_performance else performance(device, args.smoke)
    if dist.get_rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "multi_gpu_parity.json").write_text(json.dumps(report, indent=2))
        (out / "multi_gpu_parity.md").write_text(markdown(report))
        print(markdown(report))
        print("ALL PARITY RUNS PASSED" if all(e["passed"] for e in report["parity"].values()) else "PARITY FAILED")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
