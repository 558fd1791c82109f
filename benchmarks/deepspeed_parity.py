"""DeepSpeed ZeRO-2/3 + the fused SimPO loss: loss, gradients and trained weights against the run without DeepSpeed.

Run from the repository root (one process; add ``torchrun --nproc_per_node N`` for N GPUs or CPU processes)::

    python3 benchmarks/deepspeed_parity.py --stage 3 --out results/deepspeed
    torchrun --nproc_per_node 2 benchmarks/deepspeed_parity.py --stage 3 --out results/deepspeed

A random-init Llama (float32), patched with ``apply_fused_simpo``, is trained ``--steps`` AdamW steps (gradient
clipping 1.0) on one global batch of pairs, each rank on its share (``local_pairs``), through
``deepspeed.initialize`` with ZeRO stage ``--stage``. Under ZeRO-3 ``lm_head.weight`` is an empty placeholder
outside lm_head's call; the patched forward reads it inside that call, where DeepSpeed's hooks have gathered it.
Rank 0 also trains an unwrapped copy on the whole global batch with ``torch.optim.AdamW``: the run without
DeepSpeed. Compared: each step's loss (mean over ranks), every parameter's full gradient at the first step
(``deepspeed.utils.safe_get_full_grad``) and the final weights (``safe_get_full_fp32_param``).
Writes ``deepspeed_zero<stage>_ws<world>.json`` into ``--out``; exits 1 if a tolerance is exceeded.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from patches import apply_fused_simpo  # noqa: E402
from patches.distributed import local_pairs  # noqa: E402

LLAMA = dict(vocab_size=4099, hidden_size=96, intermediate_size=208, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24, max_position_embeddings=256, pad_token_id=0, initializer_range=0.1)
SIMPO_OPTIONS = dict(beta=2.5, gamma=0.7, label_smoothing=0.1)
LEARNING_RATE = 1e-3
MAX_GRAD_NORM = 1.0
#: float32 on both sides; only the order of reductions differs (and the gradient all-reduce over ranks)
TOLERANCE = dict(loss=1e-5, grad=1e-4, update=1e-3)


def build_model(device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=False)).to(device)
    return apply_fused_simpo(model, **SIMPO_OPTIONS)


def global_batch(n_pairs: int, seq_len: int, device: torch.device) -> dict:
    """``[chosen; rejected]`` rows: random ids, per-row prompt (-100 in labels) and right padding."""
    generator = torch.Generator().manual_seed(99)
    rows = 2 * n_pairs
    input_ids = torch.randint(1, LLAMA["vocab_size"], (rows, seq_len), generator=generator)
    attention_mask = torch.ones(rows, seq_len, dtype=torch.long)
    labels = input_ids.clone()
    for row in range(rows):
        prompt = int(torch.randint(2, seq_len // 3, (1,), generator=generator))
        length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=generator))
        labels[row, :prompt] = -100
        labels[row, length:] = -100
        attention_mask[row, length:] = 0
        input_ids[row, length:] = 0
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=attention_mask,
                                                labels=labels).items()}


def deepspeed_config(stage: int, micro_batch_rows: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_rows,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": MAX_GRAD_NORM,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
    }


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def run_reference(batch: dict, steps: int, device: torch.device):
    """The run without DeepSpeed: the whole global batch in one process."""
    model = build_model(device)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    losses, first_grads = [], None
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        if first_grads is None:
            first_grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses, first_grads, {name: p.detach().clone() for name, p in model.named_parameters()}, initial


def run_deepspeed(batch: dict, stage: int, steps: int, device: torch.device):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    rows = local_pairs(batch["labels"].shape[0] // 2).to(device)
    local = {k: v[rows] for k, v in batch.items()}
    model = build_model(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(stage, local["labels"].shape[0]))
    losses, first_grads = [], None
    for _ in range(steps):
        loss = engine(**local).loss
        engine.backward(loss)
        if first_grads is None:
            first_grads = {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()}
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    weights = {name: safe_get_full_fp32_param(p).detach().clone() for name, p in engine.module.named_parameters()}
    return losses, first_grads, weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", type=int, choices=(2, 3), required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=4, help="pairs in the global batch (divisible by the ranks)")
    parser.add_argument("--seq-len", type=int, default=61)
    parser.add_argument("--out", default="results/deepspeed")
    args = parser.parse_args()

    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        # exact float32 on both sides
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        device = torch.device("cpu")
    batch = global_batch(args.pairs, args.seq_len, device)
    ds_losses, ds_grads, ds_weights = run_deepspeed(batch, args.stage, args.steps, device)
    rank, world = dist.get_rank(), dist.get_world_size()
    status = 0
    if rank == 0:
        ref_losses, ref_grads, ref_weights, initial = run_reference(batch, args.steps, device)
        result = {
            "stage": args.stage, "world_size": world, "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "steps": args.steps, "pairs": args.pairs, "seq_len": args.seq_len,
            "loss_deepspeed": ds_losses, "loss_reference": ref_losses,
            "loss_max_abs_diff": max(abs(a - b) for a, b in zip(ds_losses, ref_losses)),
            "grad_max_rel_err": max(relative_error(ds_grads[n], ref_grads[n]) for n in ref_grads),
            "lm_head_grad_rel_err": relative_error(ds_grads["lm_head.weight"], ref_grads["lm_head.weight"]),
            # the change of each weight over training, DeepSpeed vs reference (the weights themselves barely move)
            "update_max_rel_err": max(relative_error(ds_weights[n] - initial[n], ref_weights[n] - initial[n])
                                      for n in ref_weights),
            "tolerance": TOLERANCE,
        }
        checks = {"loss": result["loss_max_abs_diff"], "grad": result["grad_max_rel_err"],
                  "update": result["update_max_rel_err"]}
        result["passed"] = all(checks[k] <= TOLERANCE[k] for k in checks)
        status = 0 if result["passed"] else 1
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"deepspeed_zero{args.stage}_ws{world}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k not in ("loss_deepspeed", "loss_reference")}))
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
