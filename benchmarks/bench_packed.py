"""Padding-free (packed) SimPO batches against padded ones: real-token throughput and the largest batch that fits.

Llama-3.2-1B shape (random init, bf16 weights and AdamW, gradient checkpointing), preference pairs whose lengths
follow a long-tailed distribution like UltraFeedback's (see :func:`draw_pairs`). Three variants, all on the same
pairs, each step a full forward, backward and AdamW update:

* ``plain-padded``: the unpatched model's logits + ``patches.trainer.simpo_loss_from_logits`` (TRL's
  ``CPOTrainer(loss_type="simpo")`` computation), padded ``[chosen; rejected]`` batch, SDPA;
* ``patched-padded``: ``apply_fused_simpo(model)``, the same padded batch, SDPA;
* ``patched-packed``: ``apply_fused_simpo(model)``, ``PreferenceCollator(padding_free=True)`` batches (one row,
  ``position_ids`` restarting at each sequence), ``--packed-attn`` (default flex_attention: a dense
  block-diagonal SDPA mask grows with N²).

Phase 1: real tokens per second and peak memory over ``--steps`` batches of ``--pairs`` pairs (each batch run once
as warm-up, compiling what needs it, then timed). Phase 2: the largest batch of real tokens each variant fits,
doubling the number of pairs until it runs out of memory, ``--max-pairs`` or the time budget ``--budget-s``.
Writes ``packed.json``, ``packed.md`` and ``packed.png`` into ``--out``. Usage (GPU, about 6 minutes on an H200)::

    python benchmarks/bench_packed.py --out outputs/packed

``--smoke`` runs a tiny float32 model on the CPU (SDPA for the packed batches) and checks the three variants
compute the same loss.
"""
import argparse
import gc
import json
import math
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `patches`, `benchmarks`

import torch  # noqa: E402

from benchmarks.bench_training_memory import GIB, LLAMA_3_2_1B, build_model, git_commit  # noqa: E402

VARIANTS = ("plain-padded", "patched-padded", "patched-packed")
#: Lengths in tokens (Llama-3 tokenizer scale): lognormal with these medians and log-space sigmas, clipped.
#: Means: prompt 120·e^(0.9²/2) ≈ 180, answer 250·e^(0.75²/2) ≈ 330, close to UltraFeedback's (prompts of a few
#: hundred tokens at most for most rows, answers mostly 100-600 with a tail past 2000). Chosen and rejected answers
#: are drawn independently, so a pair's two rows differ in length as they do in the data.
LENGTHS = dict(prompt_median=120, prompt_sigma=0.9, prompt_max=2048, answer_median=250, answer_sigma=0.75,
               answer_max=2048)
SMOKE_LENGTHS = dict(prompt_median=6, prompt_sigma=0.6, prompt_max=24, answer_median=10, answer_sigma=0.6,
                     answer_max=32)
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
#: token ids of the synthetic tokenizer the collator is given
TOKENIZER = types.SimpleNamespace(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def lognormal_lengths(generator, n, median, sigma, maximum, minimum=1):
    values = torch.exp(math.log(median) + sigma * torch.randn(n, generator=generator, dtype=torch.float64))
    return values.round().clamp(minimum, maximum).long().tolist()


def draw_pairs(n_pairs, vocab, seed, lengths=LENGTHS):
    """``n_pairs`` tokenized preference records (``PreferenceCollator.tokenize``'s format), random token ids, the
    prompt starting with BOS; lengths from :data:`LENGTHS`."""
    generator = torch.Generator().manual_seed(seed)
    prompts = lognormal_lengths(generator, n_pairs, lengths["prompt_median"], lengths["prompt_sigma"],
                                lengths["prompt_max"], minimum=2)
    answers = [lognormal_lengths(generator, n_pairs, lengths["answer_median"], lengths["answer_sigma"],
                                 lengths["answer_max"]) for _ in range(2)]
    ids = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    return [{"prompt_input_ids": [1] + ids(p - 1), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)}
            for p, c, r in zip(prompts, *answers)]


def collate(pairs, packed: bool, device):
    from patches.collator import PreferenceCollator

    collator = PreferenceCollator(TOKENIZER, max_length=1 << 30, padding_free=packed)
    return {key: value.to(device) for key, value in collator(pairs).items()}


def real_tokens(pairs) -> int:
    return sum(2 * len(p["prompt_input_ids"]) + len(p["chosen_input_ids"]) + len(p["rejected_input_ids"])
               for p in pairs)


def set_attention(model, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


def configure(model, variant: str, packed_attn: str) -> None:
    from patches import apply_fused_simpo, revert_fused_simpo

    (revert_fused_simpo if variant == "plain-padded" else apply_fused_simpo)(model)
    set_attention(model, packed_attn if variant == "patched-packed" else "sdpa")


def training_step(model, optimizer, variant: str, batch) -> float:
    from patches.trainer import simpo_loss_from_logits

    if variant == "plain-padded":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = simpo_loss_from_logits(logits, batch["labels"]).loss
        del logits
    else:  # padded or packed: the batch's keys say which
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


class Device:
    """Synchronisation and peak memory on CUDA; plain timing on the CPU (no peak memory there)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return torch.cuda.max_memory_allocated() / GIB if self.cuda else None

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def throughput(model, optimizer, variant, batches, tokens, device: Device) -> dict:
    """Warm-up pass over ``batches``, then a timed one: real tokens per second, peak memory, losses."""
    row = {"variant": variant, "phase": "throughput", "real_tokens": tokens}
    try:
        for batch in batches:
            training_step(model, optimizer, variant, batch)
        device.reset_peak()
        start, losses = time.perf_counter(), []
        for batch in batches:
            losses.append(training_step(model, optimizer, variant, batch))
        device.sync()
        elapsed = time.perf_counter() - start
        row.update(oom=False, seconds=elapsed, tokens_per_s=tokens / elapsed, peak_gib=device.peak_gib(),
                   losses=losses)
    except torch.OutOfMemoryError:
        row.update(oom=True)
    except Exception as error:  # e.g. an attention kernel the GPU image lacks: reported, the other variants still run
        row.update(oom=False, error=repr(error)[:500])
    optimizer.zero_grad(set_to_none=True)
    device.free()
    return row


def fits(model, optimizer, variant, batch, pairs, tokens, padded_tokens, device: Device) -> dict:
    row = {"variant": variant, "phase": "fit", "pairs": pairs, "real_tokens": tokens, "padded_tokens": padded_tokens}
    try:
        device.reset_peak()
        start = time.perf_counter()
        training_step(model, optimizer, variant, batch)
        device.sync()
        row.update(oom=False, step_s=time.perf_counter() - start, peak_gib=device.peak_gib())
    except torch.OutOfMemoryError:
        row.update(oom=True)
    except Exception as error:
        row.update(oom=False, error=repr(error)[:500])
    optimizer.zero_grad(set_to_none=True)
    device.free()
    return row


def run(args) -> dict:
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    lengths = SMOKE_LENGTHS if smoke else LENGTHS
    packed_attn = "sdpa" if smoke else args.packed_attn
    torch._dynamo.config.recompile_limit = 64  # flex attention compiles per packed length until it goes dynamic
    deadline = time.time() + args.budget_s
    shape = SMOKE_SHAPE if smoke else {}
    model = build_model(True, shape.get("num_hidden_layers", args.layers), device=device, dtype=dtype,
                        **{k: v for k, v in shape.items() if k != "num_hidden_layers"})
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, foreach=False)
    dev = Device(device)

    step_pairs = [draw_pairs(args.pairs, vocab, seed, lengths) for seed in range(args.steps)]
    tokens = sum(real_tokens(pairs) for pairs in step_pairs)
    all_pairs = [p for pairs in step_pairs for p in pairs]
    answer_lengths = [len(p[k]) for p in all_pairs for k in ("chosen_input_ids", "rejected_input_ids")]
    padded_tokens = sum(2 * len(pairs) * max(len(p["prompt_input_ids"]) + max(len(p["chosen_input_ids"]),
                        len(p["rejected_input_ids"])) for p in pairs) for pairs in step_pairs)
    rows = []
    for variant in args.variants:
        configure(model, variant, packed_attn)
        batches = [collate(pairs, variant == "patched-packed", device) for pairs in step_pairs]
        row = throughput(model, optimizer, variant, batches, tokens, dev)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del batches

    for variant in args.variants:
        configure(model, variant, packed_attn)
        pairs = args.pairs
        while pairs <= args.max_pairs:
            if time.time() > deadline:
                print(f"time budget reached before {variant} with {pairs} pairs", flush=True)
                break
            records = draw_pairs(pairs, vocab, 1000 + pairs, lengths)
            lengths_of = [len(p["prompt_input_ids"]) + max(len(p["chosen_input_ids"]), len(p["rejected_input_ids"]))
                          for p in records]
            batch = collate(records, variant == "patched-packed", device)
            row = fits(model, optimizer, variant, batch, pairs, real_tokens(records), 2 * pairs * max(lengths_of), dev)
            del batch
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row["oom"] or "error" in row:
                break
            pairs *= 2
    import transformers

    meta = dict(
        device=torch.cuda.get_device_name(0) if dev.cuda else "cpu (smoke)", torch=torch.__version__,
        transformers=transformers.__version__, commit=args.commit or git_commit(), pairs=args.pairs,
        steps=args.steps, layers=model.config.num_hidden_layers, vocab=vocab, dtype=str(dtype),
        packed_attention=packed_attn, lengths=lengths, gradient_checkpointing=True,
        sample=dict(real_tokens=tokens, padded_tokens=padded_tokens, padding_share=1 - tokens / padded_tokens,
                    prompt_mean=sum(len(p["prompt_input_ids"]) for p in all_pairs) / len(all_pairs),
                    answer_mean=sum(answer_lengths) / len(answer_lengths), answer_max=max(answer_lengths)),
    )
    result = {"meta": meta, "rows": rows}
    write_report(result, Path(args.out))
    return result


def succeeded(row) -> bool:
    return not row["oom"] and "error" not in row


def largest_fit(rows, variant):
    ok = [r["real_tokens"] for r in rows if r["variant"] == variant and r["phase"] == "fit" and succeeded(r)]
    return max(ok) if ok else 0


def write_report(result, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "packed.json").write_text(json.dumps(result, indent=2))
    meta, rows = result["meta"], result["rows"]
    sample = meta["sample"]
    lines = [
        f"SimPO training step, Llama-3.2-1B shape ({meta['layers']} layers, vocab {meta['vocab']}), {meta['dtype']}, "
        f"gradient checkpointing, AdamW; {meta['device']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, commit {meta['commit']}. Packed attention: {meta['packed_attention']}.",
        "",
        f"Lengths: lognormal, prompt median {meta['lengths']['prompt_median']} (σ {meta['lengths']['prompt_sigma']}, "
        f"max {meta['lengths']['prompt_max']}), answers median {meta['lengths']['answer_median']} "
        f"(σ {meta['lengths']['answer_sigma']}, max {meta['lengths']['answer_max']}); in the {meta['steps']} "
        f"timed batches of {meta['pairs']} pairs: prompt mean {sample['prompt_mean']:.0f}, answer mean "
        f"{sample['answer_mean']:.0f}, answer max {sample['answer_max']}; padding is "
        f"{100 * sample['padding_share']:.0f}% of the padded batches' tokens.",
        "",
        "| variant | real tokens/s | peak GiB | largest real tokens per step that fit (pairs) |",
        "|---|---|---|---|",
    ]
    for variant in VARIANTS:
        timed = [r for r in rows if r["variant"] == variant and r["phase"] == "throughput"]
        if not timed:
            continue
        fit_rows = [r for r in rows if r["variant"] == variant and r["phase"] == "fit" and succeeded(r)]
        best = max(fit_rows, key=lambda r: r["real_tokens"]) if fit_rows else None
        stopped = any(r["variant"] == variant and r["phase"] == "fit" and r["oom"] for r in rows)
        fit = f"{best['real_tokens']} ({best['pairs']})" if best else "none"
        fit += "" if stopped else " (no OOM reached: a lower bound)"
        row = timed[0]
        speed = "OOM" if row["oom"] else "error" if "error" in row else f"{row['tokens_per_s']:.0f}"
        peak = "—" if not succeeded(row) or row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        lines.append(f"| {variant} | {speed} | {peak} | {fit} |")
    speeds = {r["variant"]: r["tokens_per_s"] for r in rows if r["phase"] == "throughput" and succeeded(r)}
    lines.append("")
    if speeds.get("patched-packed") and speeds.get("patched-padded"):
        lines.append(f"- packed / padded real-token throughput (patched): "
                     f"{speeds['patched-packed'] / speeds['patched-padded']:.2f}×")
    plain_fit, packed_fit = largest_fit(rows, "plain-padded"), largest_fit(rows, "patched-packed")
    if plain_fit and packed_fit:
        lines.append(f"- largest real tokens per step, patched-packed / plain-padded: {packed_fit / plain_fit:.1f}×")
    (out / "packed.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [v for v in VARIANTS if v in speeds]
    figure, (speed_axis, fit_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    speed_axis.bar(shown, [speeds[v] for v in shown], color=["tab:red", "tab:orange", "tab:blue"][: len(shown)])
    speed_axis.set_title(f"real tokens / s ({meta['pairs']} pairs per step)")
    fit_axis.bar(shown, [largest_fit(rows, v) for v in shown], color=["tab:red", "tab:orange", "tab:blue"][: len(shown)])
    fit_axis.set_title("largest real tokens per step that fit")
    for axis in (speed_axis, fit_axis):
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(f"SimPO, Llama-3.2-1B shape, {meta['dtype']}, GC — {meta['device']}")
    figure.tight_layout()
    figure.savefig(out / "packed.png", dpi=110)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/packed")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 model on the CPU")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step of the throughput phase")
    parser.add_argument("--steps", type=int, default=4, help="distinct batches of the throughput phase")
    parser.add_argument("--max-pairs", type=int, default=4096, help="largest batch the fit search tries")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--packed-attn", default="flex_attention",
                        help="attention of the packed batches (GPU): flex_attention, sdpa, flash_attention_2, ...")
    parser.add_argument("--layers", type=int, default=LLAMA_3_2_1B["num_hidden_layers"])
    parser.add_argument("--budget-s", type=float, default=360.0, help="stop starting fit steps after this long")
    parser.add_argument("--commit", help="commit measured (default: git rev-parse of the working tree)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.steps, args.max_pairs = min(args.pairs, 3), min(args.steps, 2), min(args.max_pairs, 12)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print((Path(args.out) / "packed.md").read_text())
    return result


if __name__ == "__main__":
    main()
