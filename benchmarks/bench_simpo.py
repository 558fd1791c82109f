"""GPU benchmark of the fused linear + SimPO loss (fwd+bwd): ours vs naive eager vs torch.compile vs GEMM floor.

Run on a CUDA machine from the repository root::

    python3 -m benchmarks.bench_simpo --out docs            # writes docs/benchmarks.md, .png, .json

* ours   -- ``LigerFusedLinearSimPOFunction.apply(..., compiled=True)`` (cuBLAS GEMMs + Triton kernels)
* naive  -- full (2B, T, V) logits, the SimPO math of docs/interface.md in plain PyTorch bf16 (as TRL computes
            it): the reference in tests/chunked_loss/reference.py with ``compute_dtype=None``
* compiled naive -- ``torch.compile`` of that same function
* floor  -- the three cuBLAS GEMMs of one fwd+bwd at the same shapes, bf16 in/out, all tokens at once:
            ``X·Wᵀ``, ``G·W``, ``Gᵀ·X`` (two GEMMs with a frozen weight)

Time: median of CUDA-event timings after warm-up. Memory: ``max_memory_allocated`` during one fwd+bwd minus
``memory_allocated`` before it (the returned gradients included).
"""
import argparse
import json
import os
import statistics
import subprocess
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from agent_code.liger_kernel.chunked_loss import fused_linear_preference, logit_ops
from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction
from agent_code.liger_kernel.chunked_loss.reference import reference_simpo

GiB = float(1 << 30)
HIDDEN = 4096
VOCAB = 128256


@dataclass
class Config:
    name: str
    pairs: int
    seq_len: int
    vocab: int = VOCAB
    frozen_weight: bool = False

    @property
    def tokens(self) -> int:
        return 2 * self.pairs * self.seq_len


CONFIGS = [
    Config("2x512", 2, 512),
    Config("4x1024", 4, 1024),
    Config("8x1024", 8, 1024),
    Config("1x8192", 1, 8192),
    Config("1x32768", 1, 32768),
    Config("8x1024 frozen W", 8, 1024, frozen_weight=True),
    Config("8x1024 V=32000", 8, 1024, vocab=32000),
]

#: the project's performance targets per config: (time / GEMM floor, extra peak GiB); where each stands:
#: docs/gpu_notes.md, "Final run and target status"
TARGETS = {"2x512": (1.10, 3.5), "4x1024": (1.10, 3.5), "8x1024": (1.10, 3.5), "1x8192": (1.40, 4.0),
           "1x32768": (1.40, 4.0), "8x1024 frozen W": (1.10, 2.5)}


def make_inputs(cfg: Config, dtype=torch.bfloat16, seed=0):
    """Random hidden states, LM head and targets (10% ignored, as prompt tokens would be)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(2 * cfg.pairs, cfg.seq_len, HIDDEN, device="cuda", dtype=dtype, generator=gen)
    w = (torch.randn(cfg.vocab, HIDDEN, device="cuda", dtype=torch.float32, generator=gen) * HIDDEN**-0.5 * 2).to(dtype)
    target = torch.randint(0, cfg.vocab, (2 * cfg.pairs, cfg.seq_len), device="cuda", generator=gen)
    target[:, : cfg.seq_len // 10] = -100
    x.requires_grad_()
    w.requires_grad_(not cfg.frozen_weight)
    return x, w, target


def run_ours(x, w, target, chunk_size=1):
    loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, None, -100, 0.1, 1.0, 0.0, True, True, 0.5, chunk_size)
    loss.backward()


def run_naive(x, w, target):
    loss, _ = reference_simpo(x, w, target, compute_nll_loss=True, compute_dtype=None)
    loss.backward()


_compiled_reference = None


def run_compiled_naive(x, w, target):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(reference_simpo, dynamic=False)
    loss, _ = _compiled_reference(x, w, target, compute_nll_loss=True, compute_dtype=None)
    loss.backward()


def floor_gemms(cfg: Config, x, w):
    """The GEMMs of one fwd+bwd, full size, bf16 in and out: a closure timing exactly them."""
    x2d = x.detach().view(-1, HIDDEN)
    wd = w.detach()
    logits = torch.empty(cfg.tokens, cfg.vocab, device="cuda", dtype=x.dtype)
    grad_x = torch.empty_like(x2d)
    grad_w = torch.empty_like(wd)
    torch.mm(x2d, wd.t(), out=logits)
    logits.normal_()  # the "gradient" operand: random, never zeros

    def gemms():
        torch.mm(x2d, wd.t(), out=logits)
        torch.mm(logits, wd, out=grad_x)
        if not cfg.frozen_weight:
            torch.mm(logits.t(), x2d, out=grad_w)

    return gemms


def time_interleaved(runs: Dict[str, Callable[[], None]], reset: Callable[[], None], warmup=2, reps=7):
    """Median milliseconds of each run, timed in turns (A B A B ...) so clock drift hits all alike."""
    times = {name: [] for name in runs}
    for i in range(warmup + reps):
        for name, fn in runs.items():
            reset()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(begin.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def time_cuda(fn: Callable[[], None], reset: Callable[[], None], warmup=2, reps=7) -> float:
    """Median milliseconds of ``fn`` (CUDA events), ``reset`` run untimed before each call."""
    return time_interleaved({"fn": fn}, reset, warmup, reps)["fn"]


def extra_peak_gib(fn: Callable[[], None], reset: Callable[[], None]) -> float:
    reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / GiB


def measure(fn, reset, reps) -> Dict[str, object]:
    try:
        peak = extra_peak_gib(fn, reset)
        ms = time_cuda(fn, reset, reps=reps)
        return {"ms": ms, "peak_gib": peak}
    except torch.cuda.OutOfMemoryError:
        return {"ms": None, "peak_gib": None, "oom": True}
    finally:
        reset()
        torch.cuda.empty_cache()


def bench_config(cfg: Config, variants: List[str], reps: int, chunk_size: int) -> Dict[str, object]:
    x, w, target = make_inputs(cfg)

    def reset():
        x.grad = None
        w.grad = None

    row = {"config": asdict(cfg), "tokens": cfg.tokens}
    runners = {
        "ours": lambda: run_ours(x, w, target, chunk_size),
        "naive": lambda: run_naive(x, w, target),
        "compiled": lambda: run_compiled_naive(x, w, target),
    }
    for name in variants:
        row[name] = measure(runners[name], reset, reps)
        print(f"  {cfg.name:18s} {name:9s} {row[name]}", flush=True)
    # the ratio that matters: ours and the floor timed in turns, in the same loop
    gemms = floor_gemms(cfg, x, w)
    turns = {"floor": gemms}
    if "ours" in variants and not row["ours"].get("oom"):
        turns["ours"] = runners["ours"]
    interleaved = time_interleaved(turns, reset, reps=reps)
    row["floor"] = {"ms": interleaved["floor"]}
    if "ours" in interleaved:
        row["ours"]["ms_alone"] = row["ours"]["ms"]
        row["ours"]["ms"] = interleaved["ours"]
    print(f"  {cfg.name:18s} interleaved {interleaved}", flush=True)
    del gemms
    torch.cuda.empty_cache()
    return row


def accuracy_check(pairs=2, seq_len=300, vocab=VOCAB) -> Dict[str, Dict[str, float]]:
    """Relative error vs float64 of ours (bf16) and plain PyTorch bf16, for the loss, the aux and the grads."""
    cfg = Config("check", pairs, seq_len, vocab)
    x, w, target = make_inputs(cfg, seed=1)
    results = {}
    for name, fn in (
        ("ours", lambda a, b: LigerFusedLinearSimPOFunction.apply(a, b, target, None, -100, 0.1, 1.0, 0.0, True)),
        ("plain_bf16", lambda a, b: reference_simpo(a, b, target, compute_nll_loss=True, compute_dtype=None)),
        ("float64", lambda a, b: reference_simpo(a, b, target, compute_nll_loss=True)),
    ):
        a, b = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss, aux = fn(a, b)
        loss.backward()
        results[name] = [loss.detach(), *aux, a.grad, b.grad]
    names = ["loss", "chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll",
             "chosen_rewards", "rejected_rewards", "grad_input", "grad_weight"]
    errors = {}
    for variant in ("ours", "plain_bf16"):
        errors[variant] = {
            n: ((v.double() - r.double()).norm() / r.double().norm().clamp(min=1e-30)).item()
            for n, v, r in zip(names, results[variant], results["float64"])
        }
    return errors


def chunk_breakdown(tokens: int, logits_dtype: torch.dtype, reps: int = 10) -> Dict[str, float]:
    """Milliseconds of each step of one pair-mode chunk of ``tokens`` tokens, plus the kernels' GB/s."""
    from agent_code.liger_kernel.chunked_loss.triton_logit_gradient import triton_logit_gradient_
    from agent_code.liger_kernel.chunked_loss.triton_logit_statistics import triton_logit_statistics

    cfg = Config("breakdown", 1, tokens // 2)
    x, w, target = make_inputs(cfg)
    x2d, wd, t1d = x.detach().view(-1, HIDDEN), w.detach(), target.view(-1)
    acc = torch.zeros(wd.shape, dtype=torch.float32, device="cuda")
    logits = torch.mm(x2d, wd.t(), out_dtype=logits_dtype)
    lse, _, _ = triton_logit_statistics(logits, t1d, -100)
    coef = torch.rand(tokens, device="cuda") * 1e-3
    grad = triton_logit_gradient_(logits.clone(), lse, t1d, coef, x.dtype)
    fresh = logits.clone()
    steps = {
        "gemm_logits": lambda: torch.mm(x2d, wd.t(), out_dtype=logits_dtype, out=logits),
        "statistics_kernel": lambda: triton_logit_statistics(logits, t1d, -100),
        "gradient_kernel": lambda: triton_logit_gradient_(logits, lse, t1d, coef, x.dtype),
        "gemm_grad_input": lambda: torch.mm(grad, wd),
        "addmm_grad_weight_fp32": lambda: torch.addmm(acc, grad.t(), x2d, out_dtype=torch.float32, out=acc),
        "mm_grad_weight_bf16": lambda: torch.mm(grad.t(), x2d),
    }
    try:  # can cuBLAS round a float32 accumulator straight into a bf16 result? (saves a conversion pass)
        torch.addmm(acc, grad.t(), x2d, out_dtype=x.dtype)
        steps["addmm_fp32_acc_to_bf16"] = lambda: torch.addmm(acc, grad.t(), x2d, out_dtype=x.dtype)
    except (RuntimeError, TypeError) as error:
        print("addmm fp32 acc -> bf16 out unsupported:", str(error).splitlines()[0], flush=True)
    out = {}
    for name, fn in steps.items():
        reset = (lambda: logits.copy_(fresh)) if name == "gradient_kernel" else (lambda: None)
        out[name] = time_cuda(fn, reset, reps=reps)
    logit_bytes = logits.numel() * logits.element_size()
    out["statistics_GBps"] = logit_bytes / out["statistics_kernel"] / 1e6
    out["gradient_GBps"] = (logit_bytes + grad.numel() * grad.element_size()) / out["gradient_kernel"] / 1e6
    for block, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)):
        out[f"statistics_{block}_{warps}"] = time_cuda(
            lambda: triton_logit_statistics(logits, t1d, -100, block=block, num_warps=warps), lambda: None, reps=reps)
        out[f"gradient_{block}_{warps}"] = time_cuda(
            lambda: triton_logit_gradient_(logits, lse, t1d, coef, x.dtype, block=block, num_warps=warps),
            lambda: logits.copy_(fresh), reps=reps)
    return out


def profile_ours(cfg: Config, chunk_size: int = 1, rows: int = 22) -> str:
    """Kernel table of one fwd+bwd of ours, plus GPU busy time vs the event-timed wall time."""
    from torch.profiler import ProfilerActivity, profile

    x, w, target = make_inputs(cfg)
    for _ in range(2):
        x.grad = w.grad = None
        run_ours(x, w, target, chunk_size)
    x.grad = w.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_ours(x, w, target, chunk_size)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in events) / 1e3
    span = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) / 1e3
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    # timeline: when each GPU kernel ran relative to the start of the host call (gaps = GPU waiting for host)
    origin = min(e.time_range.start for e in prof.events() if e.name == "LigerFusedLinearSimPOFunction")
    timeline, last_end = [], origin
    for e in sorted(events, key=lambda e: e.time_range.start):
        gap = (e.time_range.start - last_end) / 1e3
        if gap > 0.02 or e.device_time > 100:
            timeline.append(f"    +{(e.time_range.start - origin) / 1e3:8.3f} ms  gap {gap:6.3f}  "
                            f"{e.device_time / 1e3:7.3f} ms  {e.name[:60]}")
        last_end = max(last_end, e.time_range.end)
    # host side: the slowest CPU operations of the call (where the host spends its time before/between launches)
    cpu = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU
                  and e.time_range.elapsed_us() > 40), key=lambda e: e.time_range.start)
    host = [f"    host +{(e.time_range.start - origin) / 1e3:8.3f} ms  {e.time_range.elapsed_us() / 1e3:7.3f} ms  "
            f"{e.name[:70]}" for e in cpu[:60]]
    return (f"{cfg.name}: GPU busy {busy:.2f} ms over a {span:.2f} ms span\n{table}\n" + "\n".join(timeline)
            + "\n" + "\n".join(host))


def host_overhead(cfg: Config, chunk_size: int = 1, reps: int = 5) -> Dict[str, float]:
    """How much of ours' time is the host's: event time with the device pre-loaded by a sleep kernel (host
    launches hide behind it) vs normal event time, and the host's own time for forward and backward."""
    import time

    x, w, target = make_inputs(cfg)

    def reset():
        x.grad = w.grad = None

    run = lambda: run_ours(x, w, target, chunk_size)  # noqa: E731
    normal = time_cuda(run, reset, reps=reps)
    preloaded, host_fwd, host_bwd = [], [], []
    for _ in range(reps):
        reset()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of device time queued ahead of the timed region
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        t0 = time.perf_counter()
        loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, None, -100, 0.1, 1.0, 0.0, True, True, 0.5,
                                                      chunk_size)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        preloaded.append(begin.elapsed_time(end))
        host_fwd.append((t1 - t0) * 1e3)
        host_bwd.append((t2 - t1) * 1e3)
    return {"event_ms": normal, "event_ms_device_preloaded": statistics.median(preloaded),
            "host_forward_ms": statistics.median(host_fwd), "host_backward_ms_incl_wait": statistics.median(host_bwd)}


def reuse_baselines(rows: List[dict], path: str, variants: List[str], env: Dict[str, str]) -> Optional[str]:
    """Fill the naive/compiled entries not measured in this run from an earlier run's JSON on the same card model
    (their code does not depend on ours); each copied entry records the commit of the run it came from."""
    with open(path) as f:
        earlier = json.load(f)
    if earlier["env"]["card"] != env["card"]:
        raise SystemExit(f"--reuse: {path} was measured on {earlier['env']['card']}, this run on {env['card']}")
    by_name = {row["config"]["name"]: row for row in earlier["rows"]}
    for row in rows:
        old = by_name.get(row["config"]["name"], {})
        for name in ("naive", "compiled"):
            if name not in variants and old.get(name) is not None:
                row[name] = dict(old[name], reused_from=old[name].get("reused_from", earlier["env"]["commit"]))
    return earlier["env"]["commit"]


def environment(commit: Optional[str]) -> Dict[str, str]:
    import triton

    if commit is None:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda), "commit": commit}


def fmt_entry(entry, key: str, digits: int) -> str:
    """A table cell; ``*`` marks a value copied from an earlier run (``--reuse``)."""
    if entry is None:
        return "not run"
    if entry.get("oom"):
        return "OOM"
    return f"{entry[key]:.{digits}f}{'*' if entry.get('reused_from') else ''}"


def fmt_ms(entry):
    return fmt_entry(entry, "ms", 1)


def fmt_gib(entry):
    return fmt_entry(entry, "peak_gib", 2)


#: The model-level results live in their own generated file (benchmarks/bench_training_memory.py); linked here so
#: that this page covers the loss and the training step.
TRAINING_STEP_SECTION = [
    "## A whole training step (Llama-3.2-1B shape)",
    "",
    "Peak memory and step time of one SimPO training step with and without `apply_fused_simpo`, and the largest",
    "tokens per step each fits (8.0x more with the patch under gradient checkpointing): table and method in",
    "[training_memory.md](training_memory.md), written by `benchmarks/bench_training_memory.py`.",
    "",
    "![training-step memory and time vs tokens](training_memory.png)",
    "",
]


def write_markdown(path: str, env: Dict[str, str], rows: List[dict], accuracy, chunk_size: int) -> None:
    lines = [
        "# Benchmark: fused linear + SimPO loss, forward + backward",
        "",
        f"Card: **{env['card']}**; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}; commit "
        f"`{env['commit']}`. H={HIDDEN}, bf16, `compute_nll_loss=True`, ours with `chunk_size={chunk_size}`, "
        f"fast-path logits dtype {logit_ops.FAST_PATH_LOGITS_DTYPE or 'bf16 (input dtype)'}. "
        "Written by `python3 -m benchmarks.bench_simpo` (see its docstring for what each column measures).",
        "",
        "Floor and ours are timed in turns (floor, ours, floor, ...) in one loop; *ours alone* is ours timed "
        "back to back with itself (the card runs ours' small-valued gradient GEMMs at higher clocks when no "
        "random-data GEMM precedes them). The ratio and the verdict use the in-turns time.",
        "",
        "| config (pairs×T) | tokens | floor ms | ours ms | ours/floor | ours alone ms | naive ms | compiled ms | "
        "ours GiB | naive GiB | compiled GiB | target (time, GiB) | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = row["config"]["name"]
        floor = row["floor"]["ms"]
        ours = row.get("ours")
        ratio = ours["ms"] / floor if ours and ours.get("ms") else None
        target = TARGETS.get(name)
        met = "—"
        if target and ratio is not None:
            met = "yes" if (ratio <= target[0] and ours["peak_gib"] <= target[1]) else (
                f"{'time' if ratio > target[0] else ''}{' ' if ratio > target[0] and ours['peak_gib'] > target[1] else ''}"
                f"{'memory' if ours['peak_gib'] > target[1] else ''} missed")
        alone = f"{ours['ms_alone']:.1f}" if ours and ours.get("ms_alone") is not None else ""
        lines.append(
            f"| {name} | {row['tokens']} | {floor:.1f} | {fmt_ms(ours)} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} | "
            f"{alone} | "
            f"{fmt_ms(row.get('naive'))} | {fmt_ms(row.get('compiled'))} | "
            f"{fmt_gib(ours)} | {fmt_gib(row.get('naive'))} | {fmt_gib(row.get('compiled'))} | "
            f"{'' if target is None else f'≤{target[0]}×, ≤{target[1]}'} | {met} |"
        )
    reused = sorted({e["reused_from"] for row in rows for e in row.values() if isinstance(e, dict) and
                     e.get("reused_from")})
    if reused:
        lines += ["", f"\\* copied from the earlier run at commit {', '.join(f'`{c}`' for c in reused)} on the same card "
                  "model (`--reuse`): those variants (naive eager and its `torch.compile`) do not run our code."]
    if accuracy:
        lines += ["", "Relative error ‖out − ref‖/‖ref‖ against float64 (2 pairs × 300 tokens, V=128256, bf16 inputs):",
                  "", "| quantity | ours | plain PyTorch bf16 |", "|---|---|---|"]
        for key in accuracy["ours"]:
            lines.append(f"| {key} | {accuracy['ours'][key]:.2e} | {accuracy['plain_bf16'][key]:.2e} |")
    lines += ["", "![time and memory vs tokens](benchmarks.png)", ""]
    lines += TRAINING_STEP_SECTION
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, env: Dict[str, str], rows: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["config"]["vocab"] == VOCAB and not r["config"]["frozen_weight"]]
    labels = [f"{r['config']['name']}\n{r['tokens']} tok" for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, style in (("ours", "o-"), ("naive", "s--"), ("compiled", "^:"), ("floor", "k.-")):
        times = [r.get(variant, {}).get("ms") if r.get(variant) else None for r in rows]
        ax_t.plot(labels, [t if t is not None else float("nan") for t in times], style, label=variant)
        if variant != "floor":
            mems = [r.get(variant, {}).get("peak_gib") if r.get(variant) else None for r in rows]
            ax_m.plot(labels, [m if m is not None else float("nan") for m in mems], style, label=variant)
    ax_t.set_ylabel("fwd+bwd time, ms (median)")
    ax_m.set_ylabel("extra peak memory, GiB")
    for ax in (ax_t, ax_m):
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"fused linear + SimPO, H={HIDDEN}, V={VOCAB}, bf16 — {env['card']}, commit {env['commit']} "
                 "(missing points: OOM or not run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="directory for benchmarks.md/.png/.json")
    parser.add_argument("--configs", nargs="*", default=None, help="config names (default: all)")
    parser.add_argument("--variants", nargs="*", default=["ours", "naive", "compiled"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--chunk-size", type=int, default=1)
    parser.add_argument("--logits-fp32", action="store_true", help="fast path keeps fp32 logits")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--breakdown", action="store_true", help="also time each step of one chunk")
    parser.add_argument("--profile", nargs="*", default=[], help="config names to profile (kernel table)")
    parser.add_argument("--reuse", default=None, metavar="JSON",
                        help="take naive/compiled entries not measured now from this earlier benchmarks.json")
    parser.add_argument("--no-deferred-scale", action="store_true",
                        help="single-pair token mode recomputes both rows' logits (the scheme before DEFER_CHOSEN_SCALE)")
    args = parser.parse_args(argv)
    if args.logits_fp32:
        logit_ops.FAST_PATH_LOGITS_DTYPE = torch.float32
    if args.no_deferred_scale:
        fused_linear_preference.DEFER_CHOSEN_SCALE = False
    env = environment(args.commit)
    print(env, flush=True)
    accuracy = None if args.no_accuracy else accuracy_check()
    print("accuracy", json.dumps(accuracy, indent=1), flush=True)
    if args.breakdown:
        for tokens in (2048, 4096):
            for dtype in (torch.bfloat16, torch.float32):
                print("breakdown", tokens, dtype, json.dumps(chunk_breakdown(tokens, dtype)), flush=True)
    for cfg in CONFIGS:
        if cfg.name in args.profile:
            print(profile_ours(cfg, args.chunk_size), flush=True)
            print(cfg.name, "host overhead", host_overhead(cfg, args.chunk_size), flush=True)
    configs = [c for c in CONFIGS if args.configs is None or c.name in args.configs]
    rows = []
    for cfg in configs:
        rows.append(bench_config(cfg, args.variants, args.reps, args.chunk_size))
        torch.cuda.empty_cache()
    if args.reuse:
        reuse_baselines(rows, args.reuse, args.variants, env)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmarks.json"), "w") as f:
        json.dump({"env": env, "rows": rows, "accuracy": accuracy, "chunk_size": args.chunk_size}, f, indent=1)
    write_markdown(os.path.join(args.out, "benchmarks.md"), env, rows, accuracy, args.chunk_size)
    write_plot(os.path.join(args.out, "benchmarks.png"), env, rows)
    print(open(os.path.join(args.out, "benchmarks.md")).read())


if __name__ == "__main__":
    main()
