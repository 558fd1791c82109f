"""One training step (forward + backward, no optimizer) of Llama-shaped models, with and without the fused loss.

* patched: ``apply_fused_simpo(model)``; ``model(..., labels=labels).loss`` never builds the logits.
* plain: ``simpo_loss_from_logits(model(...).logits, labels)``: TRL's ``CPOTrainer(loss_type="simpo")`` loss
  from the full logits (float32 log-softmax), as ``python -m patches train --no-patch`` computes it.

Llama-3.2-1B and Llama-3.1-8B shapes (random init, no download), bf16, gradient checkpointing, SDPA; 8 pairs x
1024 and x 4096 tokens (random ids, a quarter of each row prompt). Per config: one warm-up step, then the median
time of ``--repeats`` steps (host clock around the step, device synchronised) and the peak allocated memory of
those steps (weights and gradients included; gradients are dropped between steps). Writes ``step.json`` and
``step.md`` into ``--out``. Usage::

    python3 -m benchmarks.bench_step --out outputs/step      # GPU, ~2-3 minutes
    python3 -m benchmarks.bench_step --smoke --out /tmp/step  # CPU, tiny float32 models, seconds
"""
import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.bench_training_memory import GIB, LLAMA_3_1_8B, LLAMA_3_2_1B, build_model, git_commit, make_batch, \
    step_loss

MODELS = {"Llama-3.2-1B": LLAMA_3_2_1B, "Llama-3.1-8B": LLAMA_3_1_8B}
#: --smoke: each model's shape shrunk to seconds on a CPU (tied / untied head kept)
SMOKE_SHAPE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)
VARIANTS = ("plain", "patched")


def timed_steps(model, patched: bool, batch, repeats: int, cuda: bool) -> Dict[str, object]:
    """One warm-up step, then ``repeats`` timed ones: median seconds, peak GiB (CUDA), the losses."""
    losses, times = [], []
    for index in range(1 + repeats):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            if index == 1:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = step_loss(model, patched, batch)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if index > 0:
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    model.zero_grad(set_to_none=True)
    return {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
            "losses": losses}


def measure(model, patched: bool, batch, repeats: int, cuda: bool) -> Dict[str, object]:
    """:func:`timed_steps`, or ``{"status": "oom"}`` when the step does not fit."""
    try:
        return {"status": "ok", **timed_steps(model, patched, batch, repeats, cuda)}
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    finally:
        model.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def run(args, cuda: bool) -> List[dict]:
    """Every (model, T, variant) in order; a config that would start past ``--budget-s`` is recorded as skipped."""
    from patches import apply_fused_simpo, revert_fused_simpo

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    deadline = time.time() + args.budget_s
    rows = []
    for name in args.models:
        shape = {**MODELS[name], **(SMOKE_SHAPE if args.smoke else {})}
        layers = shape.pop("num_hidden_layers")
        model = None
        for seq_len in args.seq_lens:
            batch = None
            for variant in VARIANTS:
                row = {"model": name, "pairs": args.pairs, "seq_len": seq_len, "tokens": 2 * args.pairs * seq_len,
                       "variant": variant}
                if time.time() > deadline:
                    rows.append({**row, "status": "skipped: time budget"})
                    continue
                if model is None:
                    model = build_model(True, layers, device=device, dtype=dtype, **shape)
                patched = variant == "patched"
                (apply_fused_simpo if patched else revert_fused_simpo)(model)
                if batch is None:  # the same batch for both variants: their losses must agree
                    torch.manual_seed(seq_len)
                    batch = make_batch(args.pairs, seq_len, shape["vocab_size"], device=device)
                row.update(measure(model, patched, batch, args.repeats, cuda))
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model, batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def markdown(rows: List[dict], meta: Dict[str, object]) -> str:
    """The table: per model and T, each variant's step time and peak memory, and patched / plain time."""
    lines = [
        f"One training step (forward + backward, no optimizer), {meta['dtype']}, gradient checkpointing, SDPA, "
        f"random init; {meta['pairs']} pairs per step, median of {meta['repeats']} steps after one warm-up; "
        f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, commit `{meta['commit']}`"
        f"{' (CPU smoke run: tiny shapes)' if meta['smoke'] else ''}. Plain: the model's logits and TRL's SimPO loss "
        "from them; patched: `apply_fused_simpo`. Peak: max allocated, weights and gradients included.",
        "",
        "| model | pairs × T | tokens | plain step s | patched step s | patched / plain | plain peak GiB | "
        "patched peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = []
    for row in rows:
        if (row["model"], row["seq_len"]) not in keys:
            keys.append((row["model"], row["seq_len"]))
    for model, seq_len in keys:
        by_variant = {r["variant"]: r for r in rows if r["model"] == model and r["seq_len"] == seq_len}

        def cell(variant: str, key: str, digits: int) -> str:
            row = by_variant.get(variant)
            if row is None:
                return "not run"
            if row["status"] != "ok":
                return {"oom": "OOM"}.get(row["status"], "not run (time)")
            return "n/a" if row[key] is None else f"{row[key]:.{digits}f}"

        plain, patched = by_variant.get("plain", {}), by_variant.get("patched", {})
        ratio = (f"{patched['step_s'] / plain['step_s']:.3f}"
                 if plain.get("status") == patched.get("status") == "ok" else "—")
        tokens = 2 * meta["pairs"] * seq_len
        lines.append(f"| {model} | {meta['pairs']} × {seq_len} | {tokens} | {cell('plain', 'step_s', 3)} | "
                     f"{cell('patched', 'step_s', 3)} | {ratio} | {cell('plain', 'peak_gib', 1)} | "
                     f"{cell('patched', 'peak_gib', 1)} |")
    return "\n".join(lines) + "\n"


def parse_arguments(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/step")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x rows)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per config (after one warm-up)")
    parser.add_argument("--budget-s", type=float, default=210.0, help="start no config after this many seconds")
    parser.add_argument("--commit", help="commit measured (default: git rev-parse of the working tree)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, float32, tiny shapes, 2 pairs x 32 and x 64 tokens, 2 repeats")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.seq_lens, args.repeats = 2, [32, 64], 2
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    import transformers

    args = parse_arguments(argv)
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_step needs a CUDA device (or --smoke for the CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(0) if cuda else "CPU", torch=torch.__version__,
                transformers=transformers.__version__, commit=args.commit or git_commit(), pairs=args.pairs,
                repeats=args.repeats, dtype="bf16" if cuda else "float32", smoke=args.smoke)
    rows = run(args, cuda)
    result = {"meta": meta, "rows": rows}
    (out / "step.json").write_text(json.dumps(result, indent=2))
    (out / "step.md").write_text(markdown(rows, meta))
    print((out / "step.md").read_text())
    return result


if __name__ == "__main__":
    main()
