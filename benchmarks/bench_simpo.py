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

Where ours' time goes (``--breakdown-profile``, on by default): a few iterations of ours under ``torch.profiler``,
each one host call plus a device sync; per iteration, the summed time of the GEMM kernels (cuBLAS / cutlass / nvjet
names), of our Triton kernels (the ``@triton.jit`` functions of ``agent_code.liger_kernel``), of every other
kernel, and the host gap: the iteration's wall time minus the union of its kernels' intervals (the device idle,
waiting for the host). ``--dry-run`` prints the rows, their targets and a run-time estimate without CUDA.
"""
import argparse
import importlib
import json
import os
import pkgutil
import re
import statistics
import subprocess
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from agent_code.liger_kernel.chunked_loss import fused_linear_preference, logit_ops
from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction
from agent_code.liger_kernel.chunked_loss.reference import reference_simpo

GiB = float(1 << 30)
HIDDEN = 4096
VOCAB = 128256


@dataclass
class Config:
    """One benchmark row: shape, head, and the targets (time / GEMM floor, extra peak GiB) it must meet."""
    name: str
    pairs: int
    seq_len: int
    hidden: int = HIDDEN
    vocab: int = VOCAB
    frozen_weight: bool = False
    softcap: Optional[float] = None
    nll: bool = True  # SimPO with the NLL term (alpha 1), as TRL's CPOTrainer defaults to; False: pure SimPO
    target_ratio: Optional[float] = None
    target_gib: Optional[float] = None

    @property
    def tokens(self) -> int:
        return 2 * self.pairs * self.seq_len

    @property
    def floor_flop(self) -> float:
        """FLOPs of the floor's GEMMs (three, or two with a frozen weight)."""
        return 2.0 * self.tokens * self.hidden * self.vocab * (2 if self.frozen_weight else 3)


#: the rows and their performance targets on an H200 (bf16; the softcap row's floor is the same three GEMMs)
CONFIGS = [
    Config("2x512", 2, 512, target_ratio=1.05, target_gib=3.5),
    Config("4x1024", 4, 1024, target_ratio=1.05, target_gib=3.5),
    Config("8x1024", 8, 1024, target_ratio=1.05, target_gib=3.5),
    Config("1x8192", 1, 8192, target_ratio=1.10, target_gib=4.0),
    Config("1x32768", 1, 32768, target_ratio=1.10, target_gib=4.0),
    Config("8x1024 frozen W", 8, 1024, frozen_weight=True, target_ratio=1.05, target_gib=1.5),
    Config("4x1024 H8192", 4, 1024, hidden=8192, target_ratio=1.05, target_gib=6.5),
    Config("4x1024 Qwen2.5-7B", 4, 1024, hidden=3584, vocab=152064, target_ratio=1.05, target_gib=3.7),
    Config("4x1024 Gemma-2-9B softcap", 4, 1024, hidden=3584, vocab=256000, softcap=30.0, target_ratio=1.10,
           target_gib=5.7),
    Config("4x1024 Llama-3.2-1B", 4, 1024, hidden=2048, target_ratio=1.10, target_gib=2.5),
    # without the NLL term the single-pair token mode computes no logits twice (the rows' scales are tied)
    Config("1x8192 no NLL", 1, 8192, nll=False, target_ratio=1.10, target_gib=4.0),
    Config("1x32768 no NLL", 1, 32768, nll=False, target_ratio=1.10, target_gib=4.0),
]


def make_inputs(cfg: Config, dtype=torch.bfloat16, seed=0):
    """Random hidden states, LM head and targets (10% ignored, as prompt tokens would be)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(2 * cfg.pairs, cfg.seq_len, cfg.hidden, device="cuda", dtype=dtype, generator=gen)
    w = (torch.randn(cfg.vocab, cfg.hidden, device="cuda", dtype=torch.float32, generator=gen) * cfg.hidden**-0.5
         * 2).to(dtype)
    target = torch.randint(0, cfg.vocab, (2 * cfg.pairs, cfg.seq_len), device="cuda", generator=gen)
    target[:, : cfg.seq_len // 10] = -100
    x.requires_grad_()
    w.requires_grad_(not cfg.frozen_weight)
    return x, w, target


def run_ours(x, w, target, chunk_size=1, softcap=None, nll=True):
    loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, None, -100, 0.1, 1.0, 0.0, nll, True, 0.5, chunk_size,
                                                  softcap)
    loss.backward()


def run_naive(x, w, target, softcap=None, nll=True):
    loss, _ = reference_simpo(x, w, target, compute_nll_loss=nll, softcap=softcap, compute_dtype=None)
    loss.backward()


_compiled_reference = None


def run_compiled_naive(x, w, target, softcap=None, nll=True):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(reference_simpo, dynamic=False)
    loss, _ = _compiled_reference(x, w, target, compute_nll_loss=nll, softcap=softcap, compute_dtype=None)
    loss.backward()


def floor_gemms(cfg: Config, x, w):
    """The GEMMs of one fwd+bwd, full size, bf16 in and out: a closure timing exactly them."""
    x2d = x.detach().view(-1, cfg.hidden)
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


def bench_config(cfg: Config, variants: List[str], reps: int, chunk_size: int,
                 profile_iterations: int = 0) -> Dict[str, object]:
    x, w, target = make_inputs(cfg)

    def reset():
        x.grad = None
        w.grad = None

    row = {"config": asdict(cfg), "tokens": cfg.tokens}
    runners = {
        "ours": lambda: run_ours(x, w, target, chunk_size, cfg.softcap, cfg.nll),
        "naive": lambda: run_naive(x, w, target, cfg.softcap, cfg.nll),
        "compiled": lambda: run_compiled_naive(x, w, target, cfg.softcap, cfg.nll),
    }
    for name in variants:
        row[name] = measure(runners[name], reset, reps)
        print(f"  {cfg.name:18s} {name:9s} {row[name]}", flush=True)
    # the ratio that matters: ours and the floor timed in turns, in the same loop
    gemms = floor_gemms(cfg, x, w)
    turns = {"floor": gemms}
    ours_ran = "ours" in variants and not row["ours"].get("oom")
    if ours_ran:
        turns["ours"] = runners["ours"]
    interleaved = time_interleaved(turns, reset, reps=reps)
    # and the floor back to back with itself, to compare with ours alone (each in its own steady clock state)
    row["floor"] = {"ms": interleaved["floor"], "ms_alone": time_cuda(gemms, reset, reps=reps)}
    if "ours" in interleaved:
        row["ours"]["ms_alone"] = row["ours"]["ms"]
        row["ours"]["ms"] = interleaved["ours"]
    print(f"  {cfg.name:18s} interleaved {interleaved}", flush=True)
    del gemms
    torch.cuda.empty_cache()
    if ours_ran and profile_iterations > 0:
        breakdown = profile_breakdown(runners["ours"], reset, profile_iterations)
        # the same gap against the unprofiled event time (the profiler's own host overhead left out)
        breakdown["event_gap_ms"] = row["ours"]["ms_alone"] - breakdown["kernel_union_ms"]
        row["ours"]["breakdown"] = breakdown
        print(f"  {cfg.name:18s} breakdown {breakdown}", flush=True)
    return row


#: cuBLAS / cutlass kernel names: ``nvjet_*``, ``sm90_xmma_gemm_*``, ``cutlass3x_sm90_tensorop_gemm_*``, ...
GEMM_KERNEL_NAME = re.compile(r"gemm|cublas|cutlass|nvjet|xmma", re.IGNORECASE)


@dataclass(frozen=True)
class KernelSpan:
    """One device kernel (or memcpy/memset) on the profiler's clock, microseconds."""
    name: str
    start_us: float
    end_us: float


def classify_kernel(name: str, our_kernels: Iterable[str]) -> str:
    """``"triton"`` for one of our Triton kernels, ``"gemm"`` for a GEMM library kernel, else ``"other"``."""
    # older Triton versions append a specialisation suffix (``_kernel_0d1d2de``) to the launched name
    if any(name == ours or name.startswith(ours + "_") for ours in our_kernels):
        return "triton"
    return "gemm" if GEMM_KERNEL_NAME.search(name) else "other"


def union_length(intervals: Iterable[Tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals, overlaps counted once."""
    total, covered_to = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= covered_to:
            continue
        total += end - max(start, covered_to)
        covered_to = end
    return total


def time_breakdown(kernels: Iterable[KernelSpan], windows: Sequence[Tuple[float, float]],
                   our_kernels: Iterable[str], top: int = 3) -> Dict[str, object]:
    """Where the time of ``windows`` (one per iteration: start, end in us) goes; milliseconds per iteration.

    Each kernel counts (clipped) in the window it overlaps; kernels outside every window are ignored. Returns the
    mean per iteration of the wall time, the summed kernel time of each class (:func:`classify_kernel`), the union
    of all kernel intervals, the host gap (wall minus that union: the device idle), the kernel count, and the
    ``top`` other kernels by time (what the "other" column is made of).
    """
    if not windows:
        raise ValueError("time_breakdown: windows must hold at least one (start_us, end_us) iteration")
    our_kernels = tuple(our_kernels)
    sums = {"gemm": 0.0, "triton": 0.0, "other": 0.0}
    union = wall = 0.0
    count = 0
    other_by_name: Dict[str, float] = {}
    for begin, finish in windows:
        if finish < begin:
            raise ValueError(f"time_breakdown: window ({begin}, {finish}) ends before it starts")
        wall += finish - begin
        clipped = [(k.name, max(k.start_us, begin), min(k.end_us, finish)) for k in kernels
                   if k.end_us > begin and k.start_us < finish]
        for name, start, end in clipped:
            kind = classify_kernel(name, our_kernels)
            sums[kind] += end - start
            if kind == "other":
                other_by_name[name] = other_by_name.get(name, 0.0) + end - start
        union += union_length((start, end) for _, start, end in clipped)
        count += len(clipped)
    n = len(windows)
    per_iteration_ms = lambda us: us / n / 1e3  # noqa: E731
    return {
        "iterations": n,
        "wall_ms": per_iteration_ms(wall),
        "gemm_ms": per_iteration_ms(sums["gemm"]),
        "triton_ms": per_iteration_ms(sums["triton"]),
        "other_ms": per_iteration_ms(sums["other"]),
        "kernel_union_ms": per_iteration_ms(union),
        "host_gap_ms": per_iteration_ms(wall - union),
        "kernels_per_iteration": count / n,
        "other_top": [[name, per_iteration_ms(us)] for name, us in
                      sorted(other_by_name.items(), key=lambda item: -item[1])[:top]],
    }


def our_triton_kernel_names() -> List[str]:
    """Names of every ``@triton.jit`` function in ``agent_code.liger_kernel`` (autotuned ones unwrapped); none
    without triton, where none of them can run."""
    try:
        import triton
    except ImportError:
        return []

    import agent_code.liger_kernel as package

    jit_type = triton.runtime.jit.JITFunction
    names = set()
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        for value in vars(importlib.import_module(info.name)).values():
            for _ in range(4):  # Autotuner / Heuristics wrap the JITFunction in .fn, maybe twice
                if isinstance(value, jit_type) or not hasattr(value, "fn"):
                    break
                value = value.fn
            if isinstance(value, jit_type):
                names.add(value.__name__)
    return sorted(names)


PROFILE_LABEL = "bench_simpo_iteration"


def profile_breakdown(fn: Callable[[], None], reset: Callable[[], None], iterations: int,
                      cuda: bool = True) -> Dict[str, object]:
    """:func:`time_breakdown` of ``iterations`` calls of ``fn`` under ``torch.profiler`` (warm: call it after
    timing). Each iteration is one host call plus a device sync inside a labelled range: its wall time.
    ``cuda=False`` profiles the host alone (no kernels: all wall time is gap), for a CPU test of the plumbing."""
    from torch.profiler import ProfilerActivity, profile, record_function

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reset()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iterations):
            reset()
            with record_function(PROFILE_LABEL):
                fn()
                sync()
    reset()
    events = prof.events()
    windows = [(e.time_range.start, e.time_range.end) for e in events
               if e.name == PROFILE_LABEL and e.device_type == torch.autograd.DeviceType.CPU]
    # the label's own device-side annotation is no kernel
    kernels = [KernelSpan(e.name, e.time_range.start, e.time_range.end) for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and e.name != PROFILE_LABEL]
    return time_breakdown(kernels, windows, our_triton_kernel_names())


def accuracy_check(pairs=2, seq_len=300, vocab=VOCAB) -> Dict[str, Dict[str, float]]:
    """Relative error vs float64 of ours (bf16) and plain PyTorch bf16, for the loss, the aux and the grads."""
    cfg = Config("check", pairs, seq_len, vocab=vocab)
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
    x2d, wd, t1d = x.detach().view(-1, cfg.hidden), w.detach(), target.view(-1)
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
        run_ours(x, w, target, chunk_size, cfg.softcap, cfg.nll)
    x.grad = w.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_ours(x, w, target, chunk_size, cfg.softcap, cfg.nll)
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

    run = lambda: run_ours(x, w, target, chunk_size, cfg.softcap, cfg.nll)  # noqa: E731
    normal = time_cuda(run, reset, reps=reps)
    preloaded, host_fwd, host_bwd = [], [], []
    for _ in range(reps):
        reset()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of device time queued ahead of the timed region
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        t0 = time.perf_counter()
        loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, None, -100, 0.1, 1.0, 0.0, cfg.nll, True, 0.5,
                                                      chunk_size, cfg.softcap)
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


def target_verdict(cfg: Dict[str, object], ratio: Optional[float], ours: Optional[dict]) -> str:
    """``yes``, or which of time / memory missed; ``—`` without a target or a measurement of ours."""
    if cfg.get("target_ratio") is None or ratio is None or ours.get("peak_gib") is None:
        return "—"
    missed = [what for what, bad in (("time", ratio > cfg["target_ratio"]),
                                     ("memory", ours["peak_gib"] > cfg["target_gib"])) if bad]
    return "yes" if not missed else " ".join(missed) + " missed"


def fmt_breakdown(ours: Optional[dict]) -> List[str]:
    """The four "where ours' time goes" cells: GEMM, our Triton kernels, other kernels, host gap (ms/iteration)."""
    breakdown = (ours or {}).get("breakdown")
    if not breakdown:
        return [""] * 4
    return [f"{breakdown[key]:.2f}" for key in ("gemm_ms", "triton_ms", "other_ms", "host_gap_ms")]


def head_label(cfg: Dict[str, object]) -> str:
    softcap = f", softcap {cfg['softcap']:g}" if cfg.get("softcap") else ""
    return f"{cfg['hidden']}, {cfg['vocab']}{softcap}"


def markdown_lines(env: Dict[str, str], rows: List[dict], accuracy, chunk_size: int) -> List[str]:
    lines = [
        "# Benchmark: fused linear + SimPO loss, forward + backward",
        "",
        f"Card: **{env['card']}**; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}; commit "
        f"`{env['commit']}`. bf16, `compute_nll_loss=True` (rows marked *no NLL*: False), ours with `chunk_size={chunk_size}`, "
        f"fast-path logits dtype {logit_ops.FAST_PATH_LOGITS_DTYPE or 'bf16 (input dtype)'}. "
        "Written by `python3 -m benchmarks.bench_simpo` (see its docstring for what each column measures).",
        "",
        "Floor and ours are timed in turns (floor, ours, floor, ...) in one loop; *ours alone* is ours timed "
        "back to back with itself (the card runs ours' small-valued gradient GEMMs at higher clocks when no "
        "random-data GEMM precedes them); *alone ratio* is ours alone over the floor timed back to back with "
        "itself. The ratio and the verdict use the in-turns time. The floor is the "
        "three GEMMs X·Wᵀ, G·W, Gᵀ·X (two with a frozen weight), also for the softcap row.",
        "",
        "*Where ours' time goes*: ms per iteration under `torch.profiler` — GEMM kernels, our Triton kernels, "
        "other kernels (summed device time each), and the host gap (the iteration's wall time minus the union "
        "of its kernels: the device waiting for the host; the profiler's own host overhead included).",
        "",
        "| config (pairs×T) | head (H, V) | tokens | floor ms | ours ms | ours/floor | ours alone ms | alone ratio | naive ms | "
        "compiled ms | ours GiB | naive GiB | compiled GiB | target (time, GiB) | met | GEMM ms | our kernels ms | "
        "other ms | host gap ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cfg = row["config"]
        floor = row["floor"]["ms"]
        ours = row.get("ours")
        ratio = ours["ms"] / floor if ours and ours.get("ms") else None
        target = "" if cfg.get("target_ratio") is None else f"≤{cfg['target_ratio']}×, ≤{cfg['target_gib']}"
        alone = f"{ours['ms_alone']:.1f}" if ours and ours.get("ms_alone") is not None else ""
        floor_alone = row["floor"].get("ms_alone")
        alone_ratio = f"{ours['ms_alone'] / floor_alone:.3f}" if alone and floor_alone else ""
        lines.append(
            f"| {cfg['name']} | {head_label(cfg)} | {row['tokens']} | {floor:.1f} | {fmt_ms(ours)} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} | {alone} | {alone_ratio} | "
            f"{fmt_ms(row.get('naive'))} | {fmt_ms(row.get('compiled'))} | "
            f"{fmt_gib(ours)} | {fmt_gib(row.get('naive'))} | {fmt_gib(row.get('compiled'))} | "
            f"{target} | {target_verdict(cfg, ratio, ours)} | " + " | ".join(fmt_breakdown(ours)) + " |"
        )
    reused = sorted({e["reused_from"] for row in rows for e in row.values() if isinstance(e, dict) and
                     e.get("reused_from")})
    if reused:
        lines += ["", f"\\* copied from the earlier run at commit {', '.join(f'`{c}`' for c in reused)} on the same card "
                  "model (`--reuse`): those variants (naive eager and its `torch.compile`) do not run our code."]
    if accuracy:
        lines += ["", f"Relative error ‖out − ref‖/‖ref‖ against float64 (2 pairs × 300 tokens, H={HIDDEN}, "
                  f"V={VOCAB}, bf16 inputs):", "", "| quantity | ours | plain PyTorch bf16 |", "|---|---|---|"]
        for key in accuracy["ours"]:
            lines.append(f"| {key} | {accuracy['ours'][key]:.2e} | {accuracy['plain_bf16'][key]:.2e} |")
    lines += ["", "![time and memory vs tokens](benchmarks.png)", ""]
    return lines + TRAINING_STEP_SECTION


def write_markdown(path: str, env: Dict[str, str], rows: List[dict], accuracy, chunk_size: int) -> None:
    with open(path, "w") as f:
        f.write("\n".join(markdown_lines(env, rows, accuracy, chunk_size)))


def write_plot(path: str, env: Dict[str, str], rows: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["config"]["vocab"] == VOCAB and r["config"].get("hidden", HIDDEN) == HIDDEN
            and not r["config"]["frozen_weight"] and not r["config"].get("softcap") and r["config"].get("nll", True)]
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


#: for --dry-run's run-time estimate: bf16 GEMM throughput an H200 reaches on the floor's shapes, and each
#: variant's time relative to the floor (measured on H100/H200: ours and naive 1.0-1.3x the floor)
ASSUMED_TFLOPS = 650.0
ASSUMED_RATIO = {"ours": 1.25, "naive": 1.3, "compiled": 1.25}
#: seconds per row for inputs, allocator and kernel warm-up; torch.compile's per-shape compile for "compiled"
ROW_SETUP_S, COMPILE_S = 2.0, 60.0


def plan(configs: Sequence[Config], variants: Sequence[str], reps: int, profile_iterations: int,
         warmup: int = 2) -> Tuple[List[str], float]:
    """The rows with their targets and an estimated run time each (seconds), without CUDA; and the total.

    Calls per row: each variant once for memory plus ``warmup + reps`` timed; floor and ours ``warmup + reps``
    more in turns; the floor ``warmup + reps`` alone; ours ``profile_iterations`` under the profiler.
    """
    lines, total = [], 0.0
    for cfg in configs:
        floor_s = cfg.floor_flop / (ASSUMED_TFLOPS * 1e12)
        seconds = ROW_SETUP_S + 2 * (warmup + reps) * floor_s
        for variant in variants:
            calls = 1 + warmup + reps
            if variant == "ours":
                calls += warmup + reps + profile_iterations
            seconds += calls * ASSUMED_RATIO[variant] * floor_s + (COMPILE_S if variant == "compiled" else 0.0)
        total += seconds
        target = "none" if cfg.target_ratio is None else f"<= {cfg.target_ratio}x floor, <= {cfg.target_gib} GiB"
        lines.append(f"{cfg.name:26s} {cfg.pairs}x{cfg.seq_len} ({cfg.tokens} tokens) H {cfg.hidden} V {cfg.vocab}"
                     f"{' softcap %g' % cfg.softcap if cfg.softcap else ''}{' frozen W' if cfg.frozen_weight else ''}"
                     f" | floor {cfg.floor_flop / 1e12:.1f} TFLOP ~{floor_s * 1e3:.0f} ms | target {target}"
                     f" | ~{seconds:.0f} s")
    return lines, total


def select_configs(names: Optional[Sequence[str]]) -> List[Config]:
    if names is None:
        return list(CONFIGS)
    known = {cfg.name for cfg in CONFIGS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; expected names among {sorted(known)}")
    return [cfg for cfg in CONFIGS if cfg.name in names]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="directory for benchmarks.md/.png/.json")
    parser.add_argument("--configs", nargs="*", default=None, help="config names (default: all)")
    parser.add_argument("--variants", nargs="*", default=["ours", "naive", "compiled"],
                        choices=["ours", "naive", "compiled"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--chunk-size", type=int, default=1)
    parser.add_argument("--logits-fp32", action="store_true", help="fast path keeps fp32 logits")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--breakdown", action="store_true", help="also time each step of one chunk")
    parser.add_argument("--breakdown-profile", action=argparse.BooleanOptionalAction, default=True,
                        help="per row, where ours' time goes (GEMMs / our kernels / other / host gap), profiled")
    parser.add_argument("--profile-iterations", type=int, default=3,
                        help="iterations of ours under the profiler for --breakdown-profile")
    parser.add_argument("--profile", nargs="*", default=[], help="config names to profile (kernel table)")
    parser.add_argument("--reuse", default=None, metavar="JSON",
                        help="take naive/compiled entries not measured now from this earlier benchmarks.json")
    parser.add_argument("--no-deferred-scale", action="store_true",
                        help="single-pair token mode recomputes both rows' logits (the scheme before DEFER_CHOSEN_SCALE)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the rows, their targets and an estimated run time; no CUDA needed")
    args = parser.parse_args(argv)
    configs = select_configs(args.configs)
    profile_iterations = args.profile_iterations if args.breakdown_profile else 0
    if args.dry_run:
        lines, total = plan(configs, args.variants, args.reps, profile_iterations)
        print("\n".join(lines))
        print(f"estimated total ~{total:.0f} s for variants {args.variants} (at {ASSUMED_TFLOPS:g} TFLOP/s, "
              f"without the accuracy check and start-up)")
        return lines
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
    rows = []
    for cfg in configs:
        rows.append(bench_config(cfg, args.variants, args.reps, args.chunk_size, profile_iterations))
        torch.cuda.empty_cache()
    if args.reuse:
        reuse_baselines(rows, args.reuse, args.variants, env)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmarks.json"), "w") as f:
        json.dump({"env": env, "rows": rows, "accuracy": accuracy, "chunk_size": args.chunk_size}, f, indent=1)
    write_markdown(os.path.join(args.out, "benchmarks.md"), env, rows, accuracy, args.chunk_size)
    write_plot(os.path.join(args.out, "benchmarks.png"), env, rows)
    print(open(os.path.join(args.out, "benchmarks.md")).read())
    return rows


if __name__ == "__main__":
    main()
