"""One SimPO training step of a Llama-3.2-1B-shaped model, with and without the fused-loss patch.

For growing sequence length (fixed number of pairs) it measures the peak GPU memory and the time of one
full step — forward, backward and AdamW update — and finds the largest tokens per step each variant fits.

* patched: ``apply_fused_simpo(model)``; ``model(..., labels=labels).loss`` never builds the logits.
* unpatched: ``simpo_loss_from_logits(model(...).logits, labels)``, the plain-PyTorch SimPO computation that
  ``python -m patches train --no-patch`` uses (TRL's ``CPOTrainer(loss_type="simpo")``, float32 log-softmax).

Random-init weights (no download), bf16 parameters and AdamW, random token ids, a quarter of each row
as prompt (labels -100). Writes ``training_memory.json``, ``training_memory.md`` and ``training_memory.png``
into ``--out``. Usage (GPU)::

    python benchmarks/bench_training_memory.py --out outputs/training_memory
"""
import argparse
import gc
import json
import subprocess
import time
from pathlib import Path

import torch

GIB = 1 << 30
#: Llama-3.2-1B's shape (its config.json), random init
LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
#: Llama-3.1-8B's shape (its config.json, without the long-context rope scaling), random init
LLAMA_3_1_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)


def build_model(gradient_checkpointing: bool, num_hidden_layers: int, device="cuda", dtype=torch.bfloat16,
                **config_overrides):
    """Llama-3.2-1B-shaped model (``config_overrides`` change the shape, e.g. for a CPU smoke run), train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_3_2_1B, "num_hidden_layers": num_hidden_layers, **config_overrides},
                         attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_batch(n_pairs: int, seq_len: int, vocab: int, device="cuda"):
    """``(input_ids, attention_mask, labels)`` of ``2 * n_pairs`` random rows, the first quarter prompt (-100)."""
    input_ids = torch.randint(3, vocab, (2 * n_pairs, seq_len), device=device)
    labels = input_ids.clone()
    labels[:, : seq_len // 4] = -100
    return input_ids, torch.ones_like(input_ids), labels


def step_loss(model, patched: bool, batch) -> torch.Tensor:
    """The forward of one SimPO step: the patched model's fused loss, or TRL's loss from the plain model's logits."""
    from patches.trainer import simpo_loss_from_logits

    input_ids, attention_mask, labels = batch
    if patched:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return simpo_loss_from_logits(logits, labels).loss


def training_step(model, optimizer, patched: bool, batch) -> float:
    loss = step_loss(model, patched, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure(model, optimizer, patched: bool, n_pairs: int, seq_len: int, repeats: int) -> dict:
    """Peak memory and median time of ``repeats`` steps after one warm-up step; ``{"oom": True}`` on OOM."""
    result = {"patched": patched, "seq_len": seq_len, "pairs": n_pairs, "tokens": 2 * n_pairs * seq_len}
    try:
        batch = make_batch(n_pairs, seq_len, model.config.vocab_size)
        training_step(model, optimizer, patched, batch)  # warm-up: allocator, kernels, autotune
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result["loss"] = training_step(model, optimizer, patched, batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result.update(oom=False, peak_gib=torch.cuda.max_memory_allocated() / GIB,
                      step_s=sorted(times)[len(times) // 2])
    except torch.OutOfMemoryError:
        result.update(oom=True)
    optimizer.zero_grad(set_to_none=True)
    batch = None
    gc.collect()
    torch.cuda.empty_cache()
    return result


def sweep(args, gradient_checkpointing: bool, deadline: float) -> list:
    from patches import apply_fused_simpo, revert_fused_simpo

    model = build_model(gradient_checkpointing, args.layers)
    # foreach=False: the multi-tensor AdamW would add a transient copy of all the states to the peak
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
    rows = []
    for patched in [variant == "patched" for variant in args.variants]:
        (apply_fused_simpo if patched else revert_fused_simpo)(model)
        for seq_len in args.seq_lens:
            if time.time() > deadline:
                print(f"time budget reached before patched={patched} T={seq_len}", flush=True)
                break
            row = measure(model, optimizer, patched, args.pairs, seq_len, args.repeats)
            row["gradient_checkpointing"] = gradient_checkpointing
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row["oom"]:
                break  # longer sequences only need more
    revert_fused_simpo(model)
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def largest_fit(rows, patched: bool, gradient_checkpointing: bool):
    fits = [r["tokens"] for r in rows if r["patched"] == patched and r["gradient_checkpointing"] ==
            gradient_checkpointing and not r["oom"]]
    return max(fits) if fits else 0


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        return commit or "unknown"
    except OSError:
        return "unknown"


def write_report(rows, out: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        f"Llama-3.2-1B shape (vocab 128256, hidden 2048, {meta['layers']} layers), random init, bf16 weights and "
        f"AdamW, {meta['pairs']} pairs per step; {meta['device']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, commit {meta['commit']}.",
        "",
        "| gradient checkpointing | seq len | tokens/step | unpatched peak GiB | unpatched step s | "
        "patched peak GiB | patched step s |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["gradient_checkpointing"], r["seq_len"]) for r in rows}, key=lambda k: (not k[0], k[1]))
    for gc_on, seq_len in keys:
        cells = []
        for patched in (False, True):
            match = [r for r in rows if r["gradient_checkpointing"] == gc_on and r["seq_len"] == seq_len
                     and r["patched"] == patched]
            if not match:
                cells += ["not run", "—"]
            elif match[0]["oom"]:
                cells += ["OOM", "—"]
            else:
                cells += [f"{match[0]['peak_gib']:.1f}", f"{match[0]['step_s']:.2f}"]
        tokens = 2 * meta["pairs"] * seq_len
        lines.append(f"| {'on' if gc_on else 'off'} | {seq_len} | {tokens} | " + " | ".join(cells) + " |")
    lines.append("")
    for gc_on in sorted({r["gradient_checkpointing"] for r in rows}, reverse=True):
        plain, fused = largest_fit(rows, False, gc_on), largest_fit(rows, True, gc_on)
        ratio = f"{fused / plain:.1f}×" if plain else "n/a"
        lines.append(f"- gradient checkpointing {'on' if gc_on else 'off'}: largest tokens per step that fit — "
                     f"unpatched {plain}, patched {fused} ({ratio}; 'fits' is a lower bound where the sweep "
                     f"stopped before an OOM).")
    (out / "training_memory.md").write_text("\n".join(lines) + "\n")

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for gc_on in sorted({r["gradient_checkpointing"] for r in rows}, reverse=True):
        for patched, color in ((False, "tab:red"), (True, "tab:blue")):
            ok = [r for r in rows if r["patched"] == patched and r["gradient_checkpointing"] == gc_on and not r["oom"]]
            if not ok:
                continue
            label = f"{'patched' if patched else 'unpatched'}, GC {'on' if gc_on else 'off'}"
            style = "-o" if gc_on else "--s"
            memory_axis.plot([r["tokens"] for r in ok], [r["peak_gib"] for r in ok], style, color=color, label=label)
            time_axis.plot([r["tokens"] for r in ok], [r["step_s"] for r in ok], style, color=color, label=label)
    memory_axis.axhline(meta["device_gib"], color="grey", linewidth=0.8, linestyle=":")
    for axis, title in ((memory_axis, "peak memory of one step (GiB)"), (time_axis, "step time (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokens per step (chosen + rejected)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"SimPO training step, Llama-3.2-1B shape, bf16 — {meta['device']}")
    figure.tight_layout()
    figure.savefig(out / "training_memory.png", dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/training_memory")
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x rows)")
    parser.add_argument("--seq-lens", type=int, nargs="+",
                        default=[512, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384])
    parser.add_argument("--variants", nargs="+", choices=("unpatched", "patched"), default=["unpatched", "patched"])
    parser.add_argument("--layers", type=int, default=LLAMA_3_2_1B["num_hidden_layers"])
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per config (after one warm-up)")
    parser.add_argument("--no-gc-sweep", action="store_true", help="also sweep without gradient checkpointing")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting configs after this long")
    parser.add_argument("--commit", help="commit measured (default: git rev-parse of the working tree)")
    args = parser.parse_args()
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    props = torch.cuda.get_device_properties(0)
    meta = dict(device=torch.cuda.get_device_name(0), device_gib=props.total_memory / GIB, torch=torch.__version__,
                transformers=transformers.__version__, commit=args.commit or git_commit(), pairs=args.pairs, layers=args.layers)
    rows = sweep(args, gradient_checkpointing=True, deadline=deadline)
    if args.no_gc_sweep:
        rows += sweep(args, gradient_checkpointing=False, deadline=deadline)
    (out / "training_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_report(rows, out, meta)
    print((out / "training_memory.md").read_text())


if __name__ == "__main__":
    main()
