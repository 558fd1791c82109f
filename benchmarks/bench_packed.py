"""Padding-free (packed) SimPO training against padded training, on a stream of distinct batches.

Random-init Llama shapes (no downloads), bf16 weights and AdamW, gradient checkpointing; each step a full forward,
backward and AdamW update. Preference pairs drawn from a long-tailed distribution like UltraFeedback's
(:data:`LENGTHS`: lognormal prompts and answers, chosen and rejected answers drawn independently).

Parts (``--parts``, all by default):

* ``stream`` — per shape (``--shapes``: ``1b`` = Llama-3.2-1B, ``8b`` = Llama-3-8B dims with ``--layers-8b``
  layers), per variant, a **stream** of ``--steps`` (>= 20) distinct batches of ``--pairs`` pairs, every batch a new
  packed length, each run once: no warm-up pass over the timed batches; the warm-up (``--warmup`` steps) runs
  on separate batches whose lengths the stream never has. The first two timed steps are reported apart from the
  steady state (steps 3 and on). Variants:

  - ``plain-padded``: the unpatched model's logits + ``patches.trainer.simpo_loss_from_logits`` (TRL's
    ``CPOTrainer(loss_type="simpo")`` computation), padded ``[chosen; rejected]`` batch, sdpa;
  - ``patched-padded``: ``apply_fused_simpo(model)``, the same padded batches, sdpa;
  - ``patched-packed``: ``apply_fused_simpo(model)``, ``PreferenceCollator(padding_free=True)`` batches, the model on
    sdpa: the patched forward runs them through variable-length attention (``patches.varlen``);
  - ``patched-packed-flex``: the same with the model on flex_attention (which the patched forward routes to the
    same path rather than compiling a kernel per packed length), on a stream of its own new lengths (1b only).

  Each row says which attention served the packed batches (FlashAttention's varlen kernel or the per-sequence
  fallback) and how often per step.
* ``agree`` — packed against padded on the GPU, same batches, same weights, no optimizer step: loss, log-probs
  and the gradient norm of each.
* ``fit`` — the largest batch of real tokens each of ``plain-padded``, ``patched-padded`` and ``patched-packed``
  fits, doubling the pairs from ``--pairs`` until it runs out of memory, ``--max-pairs`` or the time budget.
* ``long`` — one pair of ``--long-tokens`` + ``--long-tokens`` tokens (default 32k + 32k) trains packed.

Writes ``packed.json``, ``packed.md`` and ``packed.png`` into ``--out`` and prints the table. About 6 minutes on
an H200 for everything at the defaults (``--budget-s`` stops starting new fit steps)::

    python benchmarks/bench_packed.py --out outputs/packed

``--smoke`` runs a tiny float32 model on the CPU (the per-sequence path) through every part, in seconds.
"""
import argparse
import contextlib
import gc
import json
import math
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `patches`, `benchmarks`

import torch  # noqa: E402

from benchmarks.bench_training_memory import GIB, LLAMA_3_1_8B, LLAMA_3_2_1B, build_model, git_commit  # noqa: E402

VARIANTS = ("plain-padded", "patched-padded", "patched-packed", "patched-packed-flex")
FIT_VARIANTS = ("plain-padded", "patched-padded", "patched-packed")
PARTS = ("stream", "agree", "fit", "long")
#: Llama-3-8B's dimensions (Llama-3.1-8B's config without its long-context rope scaling)
SHAPES = {"1b": LLAMA_3_2_1B, "8b": LLAMA_3_1_8B}
SHAPE_NAMES = {"1b": "Llama-3.2-1B", "8b": "Llama-3-8B"}
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


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


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


def real_tokens(pairs) -> int:
    return sum(2 * len(p["prompt_input_ids"]) + len(p["chosen_input_ids"]) + len(p["rejected_input_ids"])
               for p in pairs)


def padded_tokens(pairs) -> int:
    return 2 * len(pairs) * max(len(p["prompt_input_ids"]) + max(len(p["chosen_input_ids"]),
                                                                   len(p["rejected_input_ids"])) for p in pairs)


def draw_stream(n_batches, n_pairs, vocab, first_seed, lengths, taken: set) -> list:
    """``n_batches`` batches of ``n_pairs`` pairs, each of a packed length (real tokens) not in ``taken`` nor
    drawn before (``taken`` is updated): every batch is a length the packed path has not seen."""
    batches, seed = [], first_seed
    while len(batches) < n_batches:
        pairs = draw_pairs(n_pairs, vocab, seed, lengths)
        seed += 1
        if real_tokens(pairs) not in taken:
            taken.add(real_tokens(pairs))
            batches.append(pairs)
    return batches


def collate(pairs, packed: bool, device):
    from patches.collator import PreferenceCollator

    collator = PreferenceCollator(TOKENIZER, max_length=1 << 30, padding_free=packed)
    return {key: value.to(device) for key, value in collator(pairs).items()}


# ---------------------------------------------------------------------------------------------------------------
# one training step
# ---------------------------------------------------------------------------------------------------------------


def set_attention(model, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


def configure(model, variant: str) -> None:
    from patches import apply_fused_simpo, revert_fused_simpo

    (revert_fused_simpo if variant == "plain-padded" else apply_fused_simpo)(model)
    set_attention(model, "flex_attention" if variant == "patched-packed-flex" else "sdpa")


def is_packed(variant: str) -> bool:
    return "packed" in variant


def training_step(model, optimizer, variant: str, batch) -> float:
    from patches.trainer import simpo_loss_from_logits

    if variant == "plain-padded":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = simpo_loss_from_logits(logits, batch["labels"]).loss
        del logits
    else:  # padded or packed: the batch's keys say which
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


class Device:
    """Synchronisation and peak memory on CUDA; plain timing on the CPU (no peak memory there)."""

    def __init__(self, device: torch.device):
        self.device = device
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


@contextlib.contextmanager
def attention_paths():
    """Counts, while active, the packed attention calls served by the varlen kernel and by the per-sequence path."""
    from patches import varlen_kernel

    counts = {"kernel": 0, "per_sequence": 0}
    originals = {name: getattr(varlen_kernel, name) for name in ("_call_kernel", "_per_sequence")}

    def counted(name, key):
        def call(*args, **kwargs):
            counts[key] += 1
            return originals[name](*args, **kwargs)
        return call

    varlen_kernel._call_kernel = counted("_call_kernel", "kernel")
    varlen_kernel._per_sequence = counted("_per_sequence", "per_sequence")
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(varlen_kernel, name, original)


def failure(row, error) -> dict:
    if isinstance(error, torch.OutOfMemoryError):
        row.update(oom=True)
    else:  # e.g. an attention kernel the GPU image lacks: reported, the other variants still run
        row.update(oom=False, error=repr(error)[:500])
    return row


# ---------------------------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------------------------


def stream(model, optimizer, variant, warmup_batches, batches, dev: Device, shape: str) -> dict:
    """Warm-up steps on ``warmup_batches``, then each batch of the stream once, timed step by step."""
    packed = is_packed(variant)
    row = {"part": "stream", "shape": shape, "variant": variant, "steps": len(batches),
           "real_tokens": [real_tokens(b) for b in batches], "padded_tokens": [padded_tokens(b) for b in batches],
           "warmup_real_tokens": [real_tokens(b) for b in warmup_batches]}
    try:
        for pairs in warmup_batches:
            training_step(model, optimizer, variant, collate(pairs, packed, dev.device))
        dev.reset_peak()
        seconds, losses = [], []
        with attention_paths() as paths:
            for pairs in batches:
                batch = collate(pairs, packed, dev.device)
                dev.sync()
                start = time.perf_counter()
                losses.append(training_step(model, optimizer, variant, batch))
                dev.sync()
                seconds.append(time.perf_counter() - start)
        steady = slice(2, None)
        tokens = row["real_tokens"]
        row.update(oom=False, seconds=seconds, losses=losses, peak_gib=dev.peak_gib(),
                   first_two_s=seconds[:2], steady_tokens_per_s=sum(tokens[steady]) / sum(seconds[steady]),
                   steady_step_s=sum(seconds[steady]) / len(seconds[steady]),
                   attention_calls_per_step={k: v / len(batches) for k, v in paths.items()})
    except Exception as error:  # noqa: BLE001 - reported in the row
        failure(row, error)
    optimizer.zero_grad(set_to_none=True)
    dev.free()
    return row


def agreement(model, batches, dev: Device, shape: str) -> list:
    """Packed against padded (both patched, sdpa) on the same batches and weights: loss, log-probs, gradients."""
    configure(model, "patched-padded")
    rows = []
    for index, pairs in enumerate(batches):
        results = {}
        for packed in (False, True):
            model.zero_grad(set_to_none=True)
            output = model(**collate(pairs, packed, dev.device), use_cache=False)
            output.loss.backward()
            grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
            results[packed] = (output.loss.detach().float(), output.chosen_logps.detach().float(),
                               output.rejected_logps.detach().float(), grads)
        (loss, chosen, rejected, grads), (p_loss, p_chosen, p_rejected, p_grads) = results[False], results[True]
        logps, p_logps = torch.cat([chosen, rejected]), torch.cat([p_chosen, p_rejected])
        rows.append({"part": "agree", "shape": shape, "batch": index, "real_tokens": real_tokens(pairs),
                     "loss_padded": loss.item(), "loss_packed": p_loss.item(),
                     "loss_rel_diff": (abs(p_loss - loss) / abs(loss).clamp(min=1e-30)).item(),
                     "logps_max_abs_diff": (p_logps - logps).abs().max().item(),
                     "grad_rel_diff": ((p_grads - grads).norm() / grads.norm().clamp(min=1e-30)).item()})
        del grads, p_grads
    model.zero_grad(set_to_none=True)
    dev.free()
    return rows


def fit_search(model, optimizer, dev: Device, args, lengths, vocab, deadline: float, shape: str) -> list:
    rows = []
    for variant in FIT_VARIANTS:
        configure(model, variant)
        pairs = args.pairs
        while pairs <= args.max_pairs:
            if time.time() > deadline:
                print(f"time budget reached before fit {variant} with {pairs} pairs", flush=True)
                break
            records = draw_pairs(pairs, vocab, 100_000 + pairs, lengths)
            row = {"part": "fit", "shape": shape, "variant": variant, "pairs": pairs,
                   "real_tokens": real_tokens(records), "padded_tokens": padded_tokens(records)}
            try:
                batch = collate(records, is_packed(variant), dev.device)
                dev.reset_peak()
                start = time.perf_counter()
                training_step(model, optimizer, variant, batch)
                dev.sync()
                row.update(oom=False, step_s=time.perf_counter() - start, peak_gib=dev.peak_gib())
            except Exception as error:  # noqa: BLE001 - reported in the row
                failure(row, error)
            batch = None
            optimizer.zero_grad(set_to_none=True)
            dev.free()
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not succeeded(row):
                break
            pairs *= 2
    return rows


def long_pair(model, optimizer, dev: Device, tokens: int, vocab: int, shape: str) -> dict:
    """One pair whose chosen and rejected sequences have ``tokens`` tokens each, trained packed."""
    prompt = max(2, tokens // 32)
    generator = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    pairs = [{"prompt_input_ids": [1] + ids(prompt - 1), "chosen_input_ids": ids(tokens - prompt),
              "rejected_input_ids": ids(tokens - prompt)}]
    configure(model, "patched-packed")
    row = {"part": "long", "shape": shape, "variant": "patched-packed", "sequence_tokens": tokens,
           "real_tokens": real_tokens(pairs),
           # what the block-diagonal boolean mask of transformers' sdpa would take for this packed row
           "dense_mask_gib": real_tokens(pairs) ** 2 / GIB}
    try:
        batch = collate(pairs, True, dev.device)
        dev.reset_peak()
        start = time.perf_counter()
        with attention_paths() as paths:
            loss = training_step(model, optimizer, "patched-packed", batch)
        dev.sync()
        row.update(oom=False, step_s=time.perf_counter() - start, peak_gib=dev.peak_gib(), loss=loss,
                   attention_calls=dict(paths))
    except Exception as error:  # noqa: BLE001 - reported in the row
        failure(row, error)
    optimizer.zero_grad(set_to_none=True)
    dev.free()
    return row


def run(args) -> dict:
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    lengths = SMOKE_LENGTHS if smoke else LENGTHS
    deadline = time.time() + args.budget_s
    dev = Device(device)
    rows, samples, layers = [], {}, {}
    for shape in args.shapes:
        config = dict(SHAPES[shape], **(SMOKE_SHAPE if smoke else {}))
        layers[shape] = config["num_hidden_layers"] if smoke else (args.layers if shape == "1b" else args.layers_8b)
        config["num_hidden_layers"] = layers[shape]
        model = build_model(True, device=device, dtype=dtype, **config)
        vocab = model.config.vocab_size
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, foreach=False)
        taken = set()
        batches = draw_stream(args.steps, args.pairs, vocab, 0, lengths, taken)
        samples[shape] = sample_stats(batches)
        if "stream" in args.parts:
            for variant in args.variants:
                if variant == "patched-packed-flex" and shape != "1b":
                    continue
                configure(model, variant)
                # a packed variant that runs after another one gets its own new lengths, timed and warm-up alike
                own = variant == "patched-packed-flex"
                timed = draw_stream(args.steps, args.pairs, vocab, 50_000, lengths, taken) if own else batches
                warmup = draw_stream(args.warmup, args.pairs, vocab, 10_000 + 1_000 * len(rows), lengths, taken)
                row = stream(model, optimizer, variant, warmup, timed, dev, shape)
                row["own_stream"] = own
                rows.append(row)
                hidden = ("losses", "seconds", "real_tokens", "padded_tokens", "warmup_real_tokens")
                print(json.dumps({k: v for k, v in row.items() if k not in hidden}), flush=True)
        if "agree" in args.parts:
            agree_rows = agreement(model, batches[: args.agree_batches], dev, shape)
            rows += agree_rows
            for row in agree_rows:
                print(json.dumps(row), flush=True)
        if shape == "1b" and "fit" in args.parts:
            rows += fit_search(model, optimizer, dev, args, lengths, vocab, deadline, shape)
        if shape == "1b" and "long" in args.parts:
            row = long_pair(model, optimizer, dev, args.long_tokens, vocab, shape)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, optimizer
        dev.free()

    import transformers

    from patches import varlen_kernel

    meta = dict(
        device=torch.cuda.get_device_name(0) if dev.cuda else "cpu (smoke)", torch=torch.__version__,
        transformers=transformers.__version__, commit=args.commit or git_commit(), pairs=args.pairs,
        steps=args.steps, warmup=args.warmup, layers=layers, dtype=str(dtype), lengths=lengths,
        gradient_checkpointing=True, samples=samples,
        varlen_kernel=None if varlen_kernel.KERNEL is None else sorted(varlen_kernel.kernel_parameters(varlen_kernel.KERNEL)),
    )
    result = {"meta": meta, "rows": rows}
    write_report(result, Path(args.out))
    return result


def sample_stats(batches) -> dict:
    pairs = [p for batch in batches for p in batch]
    answers = [len(p[k]) for p in pairs for k in ("chosen_input_ids", "rejected_input_ids")]
    real, padded = sum(map(real_tokens, batches)), sum(map(padded_tokens, batches))
    return dict(real_tokens=real, padded_tokens=padded, padding_share=1 - real / padded,
                prompt_mean=sum(len(p["prompt_input_ids"]) for p in pairs) / len(pairs),
                answer_mean=sum(answers) / len(answers), answer_max=max(answers),
                packed_length_min=min(map(real_tokens, batches)), packed_length_max=max(map(real_tokens, batches)))


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


def succeeded(row) -> bool:
    return not row["oom"] and "error" not in row


def largest_fit(rows, variant):
    ok = [r for r in rows if r["part"] == "fit" and r["variant"] == variant and succeeded(r)]
    return max(ok, key=lambda r: r["real_tokens"]) if ok else None


def _outcome(row) -> str:
    return "OOM" if row["oom"] else "error"


def write_report(result, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "packed.json").write_text(json.dumps(result, indent=2))
    meta, rows = result["meta"], result["rows"]
    lengths = meta["lengths"]
    lines = [
        f"SimPO training steps, {meta['dtype']}, gradient checkpointing, AdamW; {meta['device']}, torch "
        f"{meta['torch']}, transformers {meta['transformers']}, commit {meta['commit']}; varlen_attn "
        f"{'parameters ' + ', '.join(meta['varlen_kernel']) if meta['varlen_kernel'] else 'missing'}.",
        "",
        f"Lengths: lognormal, prompt median {lengths['prompt_median']} (σ {lengths['prompt_sigma']}, max "
        f"{lengths['prompt_max']}), answers median {lengths['answer_median']} (σ {lengths['answer_sigma']}, max "
        f"{lengths['answer_max']}). Stream: {meta['steps']} distinct batches of {meta['pairs']} pairs, each a new "
        f"packed length, each run once after {meta['warmup']} warm-up steps on other lengths.",
    ]
    for shape, sample in meta["samples"].items():
        lines.append(f"- {SHAPE_NAMES[shape]} shape, {meta['layers'][shape]} layers: prompt mean "
                     f"{sample['prompt_mean']:.0f}, answer mean {sample['answer_mean']:.0f}, answer max "
                     f"{sample['answer_max']}; packed lengths {sample['packed_length_min']}–"
                     f"{sample['packed_length_max']} tokens; padding is {100 * sample['padding_share']:.0f}% of the "
                     f"padded batches' tokens.")
    streamed = [r for r in rows if r["part"] == "stream"]
    if streamed:
        lines += ["", "| shape | variant | steady real tokens/s | steady step s | first two steps s | peak GiB | "
                      "packed attention calls per step |", "|---|---|---|---|---|---|---|"]
        for row in streamed:
            if not succeeded(row):
                lines.append(f"| {row['shape']} | {row['variant']} | {_outcome(row)} | | | | |")
                continue
            peak = "—" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
            calls = ", ".join(f"{k} {v:g}" for k, v in row["attention_calls_per_step"].items() if v) or "—"
            first = " / ".join(f"{s:.2f}" for s in row["first_two_s"])
            lines.append(f"| {row['shape']} | {row['variant']}{' (own stream)' if row.get('own_stream') else ''} | "
                         f"{row['steady_tokens_per_s']:.0f} | {row['steady_step_s']:.3f} | {first} | {peak} | "
                         f"{calls} |")
        lines.append("")
        for shape in meta["samples"]:
            speeds = {r["variant"]: r["steady_tokens_per_s"] for r in streamed if r["shape"] == shape and succeeded(r)}
            for base in ("patched-padded", "plain-padded"):
                if speeds.get("patched-packed") and speeds.get(base):
                    lines.append(f"- {shape}: patched-packed / {base} steady real-token throughput: "
                                 f"{speeds['patched-packed'] / speeds[base]:.2f}×")
    agree = [r for r in rows if r["part"] == "agree"]
    if agree:
        lines += ["", "| shape | batch | loss padded | loss packed | loss rel. diff | max abs diff log-probs | "
                      "grad rel. diff |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['batch']} | {r['loss_padded']:.5f} | {r['loss_packed']:.5f} | "
                  f"{r['loss_rel_diff']:.2e} | {r['logps_max_abs_diff']:.2e} | {r['grad_rel_diff']:.2e} |"
                  for r in agree]
    fits = [r for r in rows if r["part"] == "fit"]
    if fits:
        lines += ["", "| variant | largest real tokens per step that fit (pairs) | step s | peak GiB |",
                  "|---|---|---|---|"]
        for variant in FIT_VARIANTS:
            best = largest_fit(rows, variant)
            stopped = any(r["part"] == "fit" and r["variant"] == variant and not succeeded(r) for r in rows)
            if best is None:
                lines.append(f"| {variant} | none | | |")
                continue
            bound = "" if stopped else " (no OOM reached: a lower bound)"
            peak = "—" if best["peak_gib"] is None else f"{best['peak_gib']:.1f}"
            lines.append(f"| {variant} | {best['real_tokens']} ({best['pairs']}){bound} | {best['step_s']:.2f} | "
                         f"{peak} |")
        plain, packed = largest_fit(rows, "plain-padded"), largest_fit(rows, "patched-packed")
        if plain and packed:
            lines.append(f"\n- largest real tokens per step, patched-packed / plain-padded: "
                         f"{packed['real_tokens'] / plain['real_tokens']:.1f}×")
    for row in (r for r in rows if r["part"] == "long"):
        if succeeded(row):
            peak = "" if row["peak_gib"] is None else f", peak {row['peak_gib']:.1f} GiB"
            lines.append(f"\n- one pair of {row['sequence_tokens']} + {row['sequence_tokens']} tokens, packed: trained "
                         f"in {row['step_s']:.2f} s{peak} (attention calls {row['attention_calls']}; a dense "
                         f"block-diagonal mask alone would be {row['dense_mask_gib']:.1f} GiB)")
        else:
            lines.append(f"\n- one pair of {row['sequence_tokens']} + {row['sequence_tokens']} tokens, packed: "
                         f"{_outcome(row)} {row.get('error', '')}")
    (out / "packed.md").write_text("\n".join(lines) + "\n")
    plot(result, out / "packed.png")


def plot(result, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    streamed = [r for r in rows if r["part"] == "stream" and succeeded(r)]
    fits = [v for v in FIT_VARIANTS if largest_fit(rows, v)]
    panels = [p for p, present in (("speed", streamed), ("steps", streamed), ("fit", fits)) if present]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    colors = dict(zip(VARIANTS, ["tab:red", "tab:orange", "tab:blue", "tab:cyan"]))
    if "speed" in axes:
        labels = [f"{r['shape']}\n{r['variant'].replace('patched-', 'p-')}" for r in streamed]
        axes["speed"].bar(labels, [r["steady_tokens_per_s"] for r in streamed],
                          color=[colors[r["variant"]] for r in streamed])
        axes["speed"].set_title("steady real tokens / s")
        axes["speed"].tick_params(axis="x", labelsize=7)
    if "steps" in axes:
        for r in streamed:
            axes["steps"].plot(range(1, len(r["seconds"]) + 1), r["seconds"], marker=".", color=colors[r["variant"]],
                               linestyle="-" if r["shape"] == "1b" else "--", label=f"{r['shape']} {r['variant']}")
        axes["steps"].set_yscale("log")
        axes["steps"].set_xlabel("step of the stream (each a new length)")
        axes["steps"].set_title("seconds per step")
        axes["steps"].legend(fontsize=6)
    if "fit" in axes:
        axes["fit"].bar(fits, [largest_fit(rows, v)["real_tokens"] for v in fits], color=[colors[v] for v in fits])
        axes["fit"].set_title("largest real tokens per step that fit (1b)")
        axes["fit"].tick_params(axis="x", labelsize=7)
    for axis in axes.values():
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(f"SimPO, packed vs padded, {result['meta']['dtype']}, GC — {result['meta']['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/packed")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 model on the CPU, every part, seconds")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["1b", "8b"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step of the stream (and the first fit step)")
    parser.add_argument("--steps", type=int, default=20, help="distinct batches of the stream, each run once")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant, on batches of other lengths")
    parser.add_argument("--layers", type=int, default=LLAMA_3_2_1B["num_hidden_layers"], help="layers of the 1b shape")
    parser.add_argument("--layers-8b", type=int, default=8,
                        help="layers of the 8b shape (Llama-3-8B has 32; 8 keeps the run within its time)")
    parser.add_argument("--agree-batches", type=int, default=3, help="batches of the agreement check")
    parser.add_argument("--max-pairs", type=int, default=1024, help="largest batch the fit search tries")
    parser.add_argument("--long-tokens", type=int, default=32768, help="tokens of each sequence of the long pair")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop starting fit steps after this long")
    parser.add_argument("--commit", help="commit measured (default: git rev-parse of the working tree)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.steps, args.warmup = min(args.pairs, 3), min(args.steps, 4), min(args.warmup, 1)
        args.max_pairs, args.long_tokens, args.shapes = min(args.max_pairs, 6), min(args.long_tokens, 96), ["1b"]
        args.agree_batches = min(args.agree_batches, 2)
    elif args.steps < 3:
        parser.error("--steps must be at least 3: the first two steps are reported apart from the steady state")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print((Path(args.out) / "packed.md").read_text())
    return result


if __name__ == "__main__":
    main()
