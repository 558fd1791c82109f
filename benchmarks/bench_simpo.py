"""GPU benchmark of the fused linear + SimPO loss (fwd+bwd) against the honest GEMM floor and Cut Cross-Entropy.

Run on a CUDA machine from the repository root (``--dry-run``: the rows and a run-time estimate, no GPU;
``--smoke``: every row at a tiny shape, the whole pipeline in seconds, also on the CPU)::

    python3 -m benchmarks.bench_simpo            # writes docs/measurements/benchmarks_<card>.md, .png, .json

Variants, all fed the same inputs in the same loop:

* floor  -- the three GEMMs of one fwd+bwd, ``X·Wᵀ``, ``G·W``, ``Gᵀ·X`` (two with a frozen weight), cuBLAS, bf16
            in and out, all tokens at once; ``G`` is the real gradient of the logits, ``(softmax − onehot)/N``
            (times the softcap's derivative on the softcap row), prepared untimed (benchmarks/simpo_baselines.py)
* ours   -- ``LigerFusedLinearSimPOFunction.apply(..., compiled=True)``, SimPO with the chosen NLL (alpha 1)
* cce    -- SimPO on Apple's Cut Cross-Entropy (optional ``cut-cross-entropy``): per-token losses from
            ``linear_cross_entropy(..., reduction="none")`` with its default ``filter_eps="high"`` (skips backward
            blocks of small softmax gradient: not exact), the SimPO math in plain PyTorch
* cce_exact -- the same with ``filter_eps=None`` (every block computed)
* naive / compiled (``--variants``, off by default) -- full logits in plain PyTorch bf16 (the reference of
            agent_code/liger_kernel/chunked_loss/reference.py with ``compute_dtype=None``), and its ``torch.compile``

Time: ``warmup + reps`` turns; turn ``i`` times each variant once, in the order above, on input set ``i``
(distinct hidden states and targets per turn, one weight as in training), so no timed call sees an input a
warm-up (or any earlier) call saw. Each call is bracketed by CUDA events after a device sync (untimed resets
and the floor's ``G`` finish before the window opens). Reported: the median over the timed turns, and each
ratio as the median of the per-turn ratios. Memory: ``max_memory_allocated`` during one fwd+bwd (after the
turns, on a warm-up input) minus ``memory_allocated`` before it, the returned gradients included.

Where ours' time goes (``--breakdown-profile``, on by default): a few iterations of ours under ``torch.profiler``,
each one host call plus a device sync; per iteration, the summed time of the GEMM kernels (cuBLAS / cutlass / nvjet
names), of our Triton kernels (the ``@triton.jit`` functions of ``agent_code.liger_kernel``), of every other
kernel, and the host gap: the iteration's wall time minus the union of its kernels' intervals (the device idle,
waiting for the host).
"""
import argparse
import importlib
import itertools
import json
import math
import os
import pkgutil
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from agent_code.liger_kernel.chunked_loss import fused_linear_preference, logit_ops
from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction
from agent_code.liger_kernel.chunked_loss.reference import reference_simpo
from benchmarks.simpo_baselines import CCE_EXACT, CCE_FILTERED, FloorGemms, cce_simpo, load_linear_cross_entropy

GiB = float(1 << 30)
HIDDEN = 4096
VOCAB = 128256
IGNORE_INDEX = -100
#: the SimPO options every variant computes (TRL's CPOTrainer defaults for loss_type="simpo", NLL term alpha 1)
SIMPO_OPTIONS = dict(beta=0.1, gamma=0.5, label_smoothing=0.0, alpha=1.0)
DEFAULT_OUT = os.path.join("docs", "measurements")


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


#: the rows and their targets on an H200 (bf16): ours within 1.10x the floor (1.05x on the 8-pair rows) and
#: within the extra peak GiB; besides, ours must beat CCE's default (filtered) variant on every row
CONFIGS = [
    Config("2x512", 2, 512, target_ratio=1.10, target_gib=3.5),
    Config("4x1024", 4, 1024, target_ratio=1.10, target_gib=3.5),
    Config("8x1024", 8, 1024, target_ratio=1.05, target_gib=3.5),
    Config("1x8192", 1, 8192, target_ratio=1.10, target_gib=4.0),
    Config("1x32768", 1, 32768, target_ratio=1.10, target_gib=4.0),
    Config("8x1024 frozen W", 8, 1024, frozen_weight=True, target_ratio=1.05, target_gib=1.5),
    Config("4x1024 H8192", 4, 1024, hidden=8192, target_ratio=1.10, target_gib=6.5),
    Config("4x1024 Qwen2.5-7B", 4, 1024, hidden=3584, vocab=152064, target_ratio=1.10, target_gib=3.7),
    Config("4x1024 Gemma-2-9B softcap", 4, 1024, hidden=3584, vocab=256000, softcap=30.0, target_ratio=1.10,
           target_gib=5.7),
    Config("4x1024 Llama-3.2-1B", 4, 1024, hidden=2048, target_ratio=1.10, target_gib=2.5),
    # without the NLL term the single-pair token mode computes no logits twice (the rows' scales are tied)
    Config("1x8192 no NLL", 1, 8192, nll=False, target_ratio=1.10, target_gib=4.0),
    Config("1x32768 no NLL", 1, 32768, nll=False, target_ratio=1.10, target_gib=4.0),
]

#: ``--smoke``: every row at this tiny shape (its head flags kept), the accuracy check at SMOKE_ACCURACY
SMOKE_SHAPE = dict(seq_len=24, hidden=64, vocab=320)
SMOKE_ACCURACY = dict(pairs=2, seq_len=20, hidden=64, vocab=320)


def smoke_config(cfg: Config) -> Config:
    return replace(cfg, pairs=min(cfg.pairs, 2), **SMOKE_SHAPE)


def make_input_sets(cfg: Config, count: int, device="cuda", dtype=torch.bfloat16, seed=0, logit_std=2.0,
                    target_boost: Optional[Tuple[float, float]] = None):
    """One weight ``(V, H)`` and ``count`` distinct ``(x (2P, T, H), target (2P, T))`` sets: random hidden
    states, logits of standard deviation ~``logit_std``, uniform targets with the first 10% of each row ignored
    (as prompt tokens would be). ``x`` requires grad; the weight too unless frozen.

    ``target_boost = (lo, hi)``: a peaked softmax, as a trained model's: each token's hidden state gets
    ``b * w_t / |w_t|^2`` added (``b`` uniform in ``[lo, hi)``, ``t`` its target, a random id where ignored), so its
    target logit is ``b`` above the random rest (``(10, 20)`` at V 128k: mean target log-prob about -1 nat, most
    of the vocabulary's probabilities below 1e-4). None: a diffuse softmax (every probability near ``1/V``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = (torch.randn(cfg.vocab, cfg.hidden, device=device, dtype=torch.float32, generator=gen)
              * (logit_std * cfg.hidden**-0.5)).to(dtype)
    weight.requires_grad_(not cfg.frozen_weight)
    sets = []
    for _ in range(count):
        x = torch.randn(2 * cfg.pairs, cfg.seq_len, cfg.hidden, device=device, dtype=torch.float32, generator=gen)
        target = torch.randint(0, cfg.vocab, (2 * cfg.pairs, cfg.seq_len), device=device, generator=gen)
        if target_boost is not None:
            low, high = target_boost
            boost = low + (high - low) * torch.rand(target.shape, device=device, generator=gen)
            direction = weight.detach()[target].float()  # the ignored positions keep their random id here
            x += (boost / direction.square().sum(-1)).unsqueeze(-1) * direction
            del direction
        target[:, : cfg.seq_len // 10] = IGNORE_INDEX
        sets.append((x.to(dtype).requires_grad_(), target))
    return weight, sets


def make_inputs(cfg: Config, dtype=torch.bfloat16, seed=0, device="cuda"):
    """One ``(x, w, target)`` of :func:`make_input_sets`."""
    weight, [(x, target)] = make_input_sets(cfg, 1, device, dtype, seed)
    return x, weight, target


def run_ours(x, w, target, chunk_size=1, softcap=None, nll=True):
    o = SIMPO_OPTIONS
    loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, None, IGNORE_INDEX, o["beta"], o["alpha"],
                                                  o["label_smoothing"], nll, True, o["gamma"], chunk_size, softcap)
    loss.backward()


#: the threshold of ours' opt-in gradient filter in the ``ours_filtered`` variant: Cut Cross-Entropy's default for
#: bf16 (``filter_eps="high"``: bf16's eps / 32)
OURS_FILTER_EPS = 2.0**-12


def filtered_call(fn: Callable):
    """``fn()`` with ours' opt-in gradient filter on (``fused_linear_preference.GRADIENT_FILTER_EPS``)."""
    previous, fused_linear_preference.GRADIENT_FILTER_EPS = fused_linear_preference.GRADIENT_FILTER_EPS, OURS_FILTER_EPS
    try:
        return fn()
    finally:
        fused_linear_preference.GRADIENT_FILTER_EPS = previous


def run_ours_filtered(x, w, target, chunk_size=1, softcap=None, nll=True):
    filtered_call(lambda: run_ours(x, w, target, chunk_size, softcap, nll))


def run_cce(linear_cross_entropy, x, w, target, softcap=None, nll=True, filter_eps=CCE_FILTERED):
    loss, _ = cce_simpo(linear_cross_entropy, x, w, target, compute_nll_loss=nll, ignore_index=IGNORE_INDEX,
                        softcap=softcap, filter_eps=filter_eps, **SIMPO_OPTIONS)
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


#: every variant but the floor, in their order within a turn; CCE's need ``cut_cross_entropy``
VARIANTS = ("ours", "ours_filtered", "cce", "cce_exact", "naive", "compiled")
CCE_VARIANTS = {"cce": CCE_FILTERED, "cce_exact": CCE_EXACT}
DEFAULT_VARIANTS = ["ours", "cce", "cce_exact"]
#: the variants whose failure (other than OOM) is recorded in their row instead of ending the run: code of a
#: peer's package or of torch.compile, which may not build on a given card and software stack
FRAGILE_VARIANTS = ("cce", "cce_exact", "compiled")


def variant_runners(cfg: Config, variants: Sequence[str], chunk_size: int = 1,
                    linear_cross_entropy: Optional[Callable] = None) -> Dict[str, Callable]:
    """``{name: fn(x, w, target)}`` (one fwd+bwd each) for the requested variants, in :data:`VARIANTS` order;
    the CCE ones only with ``linear_cross_entropy``."""
    runners = {
        "ours": lambda x, w, t: run_ours(x, w, t, chunk_size, cfg.softcap, cfg.nll),
        "ours_filtered": lambda x, w, t: run_ours_filtered(x, w, t, chunk_size, cfg.softcap, cfg.nll),
        "naive": lambda x, w, t: run_naive(x, w, t, cfg.softcap, cfg.nll),
        "compiled": lambda x, w, t: run_compiled_naive(x, w, t, cfg.softcap, cfg.nll),
    }
    if linear_cross_entropy is not None:
        for name, eps in CCE_VARIANTS.items():
            runners[name] = (lambda x, w, t, eps=eps:
                             run_cce(linear_cross_entropy, x, w, t, cfg.softcap, cfg.nll, eps))
    return {name: runners[name] for name in VARIANTS if name in variants and name in runners}


class Clock:
    """Times calls and their peak memory on one device: CUDA events and the caching allocator's peak on a GPU;
    ``time.perf_counter`` and no memory figure (None) on the CPU, where the tests run the whole pipeline."""

    def __init__(self, device="cuda"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def time_ms(self, fn: Callable[[], None]) -> float:
        """Milliseconds of ``fn``; what was queued before (a reset, the floor's ``G``) finishes untimed."""
        self.synchronize()
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)

    def extra_peak_gib(self, fn: Callable[[], None]) -> Optional[float]:
        """Peak allocated memory during ``fn`` beyond what was allocated before it, GiB (None on the CPU)."""
        if not self.cuda:
            fn()
            return None
        self.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        self.synchronize()
        return (torch.cuda.max_memory_allocated(self.device) - before) / GiB


def failure_note(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def time_in_turns(runs: Dict[str, Callable[[int], None]], reset: Callable[[str, int], None], clock: Clock,
                  warmup: int = 2, reps: int = 7,
                  fragile: Iterable[str] = ()
                  ) -> Tuple[Dict[str, List[float]], Dict[str, str], Dict[str, List[float]]]:
    """``warmup + reps`` turns; turn ``i`` times each run once, in the dict's order, as ``fn(i)`` after an
    untimed ``reset(name, i)``: every run of a turn sees input set ``i`` and no call sees a set an earlier turn
    used, so the timed turns never reuse a warm-up input. Clock drift and the card's thermal state hit all
    runs alike. Returns each run's ``reps`` timed milliseconds (turn order), its ``warmup`` first-turn
    milliseconds apart (the first calls: kernel compilation, autotuning, allocator growth), and ``{name: why}`` for the runs
    that failed: ran out of memory (``"OOM"``), or, for the ``fragile`` ones (a peer's package, whose kernels
    may not build here), raised anything (:func:`failure_note`); dropped from then on, the others go on."""
    fragile = set(fragile)
    times: Dict[str, List[float]] = {name: [] for name in runs}
    first: Dict[str, List[float]] = {name: [] for name in runs}
    failed: Dict[str, str] = {}
    for i in range(warmup + reps):
        for name, fn in runs.items():
            if name in failed:
                continue
            reset(name, i)
            try:
                ms = clock.time_ms(lambda: fn(i))
            except Exception as error:  # noqa: BLE001 - sorted out just below
                if not isinstance(error, torch.OutOfMemoryError) and name not in fragile:
                    raise
                failed[name] = "OOM" if isinstance(error, torch.OutOfMemoryError) else failure_note(error)
                print(f"  {name} failed in turn {i}: {failed[name]}", flush=True)
                del times[name], first[name]
                clock.empty_cache()
                continue
            (times if i >= warmup else first)[name].append(ms)
    return times, failed, first


def time_cuda(fn: Callable[[], None], reset: Callable[[], None], warmup=2, reps=7) -> float:
    """Median milliseconds of ``fn`` called back to back (CUDA events), ``reset`` run untimed before each call
    (the kernel-level studies ``--breakdown`` and ``--profile``; the rows use :func:`time_in_turns`)."""
    times, _, _ = time_in_turns({"fn": lambda _: fn()}, lambda *_: reset(), Clock("cuda"), warmup, reps)
    return statistics.median(times["fn"])


def summarize(times: List[float], reference: Optional[List[float]] = None,
              first: Sequence[float] = ()) -> Dict[str, object]:
    """Median, min, max and every timed milliseconds, the warm-up turns' apart (``first``); with ``reference``
    (the same turns' floor times) also the median of the per-turn ratios ``times[i] / reference[i]``."""
    entry: Dict[str, object] = {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
                                "ms_all": list(times), "ms_first_turns": list(first)}
    if reference is not None:
        entry["ratio_to_floor"] = statistics.median(t / r for t, r in zip(times, reference))
    return entry


def paired_ratio(row: dict, name: str, other: str) -> Optional[float]:
    """Median over the turns of ``row[name]``'s time over ``row[other]``'s (None unless both were timed)."""
    a, b = (row.get(key) or {} for key in (name, other))
    if not a.get("ms_all") or not b.get("ms_all"):
        return None
    return statistics.median(x / y for x, y in zip(a["ms_all"], b["ms_all"]))


def bench_config(cfg: Config, variants: Sequence[str], reps: int, chunk_size: int = 1, profile_iterations: int = 0,
                 device="cuda", warmup: int = 2, linear_cross_entropy: Optional[Callable] = None,
                 logit_std: float = 2.0, target_boost: Optional[Tuple[float, float]] = None) -> Dict[str, object]:
    """One row: the floor and each variant timed in turns (:func:`time_in_turns`), each variant's extra peak
    memory, and where ours' time goes (``profile_iterations`` > 0)."""
    clock = Clock(device)
    weight, sets = make_input_sets(cfg, warmup + reps, device, logit_std=logit_std, target_boost=target_boost)
    floor = FloorGemms(weight, cfg.tokens, cfg.frozen_weight, IGNORE_INDEX, cfg.softcap)
    runners = variant_runners(cfg, variants, chunk_size, linear_cross_entropy)
    runs = {"floor": lambda i: floor(sets[i][0])}
    runs.update({name: (lambda i, run=run: run(sets[i][0], weight, sets[i][1])) for name, run in runners.items()})

    def reset(name: str, i: int) -> None:
        x, target = sets[i]
        x.grad = weight.grad = None
        if name == "floor":
            floor.prepare(x, target)

    times, failed, first = time_in_turns(runs, reset, clock, warmup, reps, fragile=FRAGILE_VARIANTS)
    row: Dict[str, object] = {"config": asdict(cfg), "tokens": cfg.tokens}
    row["floor"] = {"ms": None, "oom": True} if "floor" in failed else summarize(times["floor"], first=first["floor"])
    floor = None  # frees its two (tokens, V) buffers before the memory probes (the turns are over)
    clock.empty_cache()
    for name, run in runners.items():
        if name in failed:
            row[name] = ({"ms": None, "peak_gib": None, "oom": True} if failed[name] == "OOM"
                         else {"ms": None, "peak_gib": None, "error": failed[name]})
            continue
        row[name] = summarize(times[name], times.get("floor"), first[name])
        reset(name, 0)
        try:
            row[name]["peak_gib"] = clock.extra_peak_gib(lambda: run(sets[0][0], weight, sets[0][1]))
        except torch.OutOfMemoryError:
            row[name]["peak_gib"] = None
        reset(name, 0)
        clock.empty_cache()
        print(f"  {cfg.name:26s} {name:9s} {row[name]['ms']:9.3f} ms  x{row[name].get('ratio_to_floor', 0):.3f} "
              f"floor  {row[name]['peak_gib']} GiB", flush=True)
    if "ours" in times and profile_iterations > 0:
        timed_inputs = itertools.cycle(range(warmup, warmup + reps))
        current = [warmup]

        def next_input() -> None:
            current[0] = next(timed_inputs)
            reset("ours", current[0])

        breakdown = profile_breakdown(lambda: runners["ours"](sets[current[0]][0], weight, sets[current[0]][1]),
                                      next_input, profile_iterations, cuda=clock.cuda)
        # the same gap against the unprofiled event time (the profiler's own host overhead left out)
        breakdown["event_gap_ms"] = row["ours"]["ms"] - breakdown["kernel_union_ms"]
        row["ours"]["breakdown"] = breakdown
        print(f"  {cfg.name:26s} breakdown {breakdown}", flush=True)
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



#: the quantities the accuracy check compares, and their positions in ours' / the reference's aux outputs
ACCURACY_QUANTITIES = ("loss", "chosen_logps", "rejected_logps", "nll", "grad_input", "grad_weight")
_AUX_INDEX = {"chosen_logps": 0, "rejected_logps": 1, "nll": 4}
_CCE_AUX_INDEX = {"chosen_logps": 0, "rejected_logps": 1, "nll": 2}


def accuracy_check(pairs=2, seq_len=300, hidden=HIDDEN, vocab=VOCAB, device="cuda",
                   linear_cross_entropy: Optional[Callable] = None, seed=1, logit_std=2.0,
                   target_boost: Optional[Tuple[float, float]] = None, filtered: bool = False
                   ) -> Dict[str, Dict[str, float]]:
    """Relative error ‖out − ref‖/‖ref‖ against float64 (:func:`reference_simpo`) of ours, plain PyTorch bf16 and,
    with ``linear_cross_entropy``, SimPO on CCE filtered and exact, all from the same bf16 inputs:
    ``{variant: {quantity: error}}`` for :data:`ACCURACY_QUANTITIES`; ``{variant: {"error": why}}`` for a CCE
    variant that failed."""
    cfg = Config("accuracy", pairs, seq_len, hidden=hidden, vocab=vocab)
    w, [(x, target)] = make_input_sets(cfg, 1, device, seed=seed, logit_std=logit_std, target_boost=target_boost)
    o = SIMPO_OPTIONS
    reference_options = dict(compute_nll_loss=True, **o)
    variants = {
        "float64": (lambda a, b: reference_simpo(a, b, target, **reference_options), _AUX_INDEX),
        "ours": (lambda a, b: LigerFusedLinearSimPOFunction.apply(
            a, b, target, None, IGNORE_INDEX, o["beta"], o["alpha"], o["label_smoothing"], True, True, o["gamma"]),
            _AUX_INDEX),
        "plain_bf16": (lambda a, b: reference_simpo(a, b, target, compute_dtype=None, **reference_options),
                       _AUX_INDEX),
    }
    if filtered:
        variants["ours_filtered"] = (lambda a, b: filtered_call(lambda: variants["ours"][0](a, b)), _AUX_INDEX)
    if linear_cross_entropy is not None:
        for name, eps in CCE_VARIANTS.items():
            variants[name] = ((lambda a, b, eps=eps: cce_simpo(linear_cross_entropy, a, b, target,
                                                               ignore_index=IGNORE_INDEX, filter_eps=eps, **o)),
                              _CCE_AUX_INDEX)
    results, failed = {}, {}
    for name, (fn, aux_index) in variants.items():
        # the truth's leaves in float64 (the bf16 values, exactly): its gradients are not rounded back to bf16
        dtype = torch.float64 if name == "float64" else x.dtype
        a, b = (t.detach().to(dtype).requires_grad_() for t in (x, w))
        try:
            loss, aux = fn(a, b)
            loss.backward()
        except Exception as error:  # noqa: BLE001 - only a peer's failure is recorded, ours ends the run
            if name not in FRAGILE_VARIANTS:
                raise
            failed[name] = {"error": failure_note(error)}
            print(f"  accuracy: {name} failed: {failed[name]['error']}", flush=True)
            continue
        results[name] = dict(loss=loss.detach(), grad_input=a.grad, grad_weight=b.grad,
                             **{key: aux[index] for key, index in aux_index.items()})
    truth = results.pop("float64")
    errors = {name: {key: ((values[key].double() - truth[key].double()).norm()
                           / truth[key].double().norm().clamp(min=1e-30)).item() for key in ACCURACY_QUANTITIES}
              for name, values in results.items()}
    return {**errors, **failed}


def chunk_breakdown(tokens: int, logits_dtype: torch.dtype, reps: int = 10) -> Dict[str, float]:
    """Milliseconds of each step of one pair-mode chunk of ``tokens`` tokens, plus the kernels' GB/s."""
    from agent_code.liger_kernel.chunked_loss.triton_logit_ops import triton_logit_gradient_
    from agent_code.liger_kernel.chunked_loss.triton_logit_ops import triton_logit_statistics

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



def card_name(device) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


def output_stem(card: str) -> str:
    """``benchmarks_<model>`` from the card's name: ``NVIDIA H200`` -> ``benchmarks_h200``, the CPU ->
    ``benchmarks_cpu``."""
    match = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", card)
    slug = match.group(1) if match else re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
    return f"benchmarks_{slug.lower()}"


def environment(commit: Optional[str], device="cuda", cce: str = "not requested") -> Dict[str, str]:
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                             stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"card": card_name(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": str(torch.version.cuda), "commit": commit, "cut_cross_entropy": cce}


def fmt_entry(entry, key: str, digits: int) -> str:
    """A table cell; ``*`` marks a value copied from an earlier run (``--reuse``)."""
    if entry is None:
        return "not run"
    if entry.get("oom"):
        return "OOM"
    if entry.get("error"):
        return "failed"
    if entry.get(key) is None:
        return "—"
    return f"{entry[key]:.{digits}f}{'*' if entry.get('reused_from') else ''}"


def fmt_first_call(entry) -> str:
    """The first warm-up turn's milliseconds (the row's first call: compilation and autotuning included)."""
    first = (entry or {}).get("ms_first_turns") or []
    return f"{first[0]:.1f}" if first else ""


def fmt_ms(entry):
    return fmt_entry(entry, "ms", 1)


def fmt_gib(entry):
    return fmt_entry(entry, "peak_gib", 2)


def fmt_ratio(ratio: Optional[float]) -> str:
    return "" if ratio is None else f"{ratio:.3f}"


def verdicts(row: dict) -> List[str]:
    """The three verdict cells of a row: ours/floor within its target, ours' extra peak within its target,
    ours faster than CCE's default (filtered) variant; each ``yes``, ``no`` or ``—`` (no target or no measure)."""
    cfg, ours = row["config"], row.get("ours") or {}
    ratio, vs_cce = paired_ratio(row, "ours", "floor"), paired_ratio(row, "ours", "cce")
    peak = ours.get("peak_gib")

    def cell(ok: Optional[bool]) -> str:
        return "—" if ok is None else ("yes" if ok else "no")

    return [cell(None if cfg.get("target_ratio") is None or ratio is None else ratio <= cfg["target_ratio"]),
            cell(None if cfg.get("target_gib") is None or peak is None else peak <= cfg["target_gib"]),
            cell(None if vs_cce is None else vs_cce < 1.0)]


def fmt_breakdown(ours: Optional[dict]) -> List[str]:
    """The four "where ours' time goes" cells: GEMM, our Triton kernels, other kernels, host gap (ms/iteration)."""
    breakdown = (ours or {}).get("breakdown")
    if not breakdown:
        return [""] * 4
    return [f"{breakdown[key]:.2f}" for key in ("gemm_ms", "triton_ms", "other_ms", "host_gap_ms")]


def head_label(cfg: Dict[str, object]) -> str:
    softcap = f", softcap {cfg['softcap']:g}" if cfg.get("softcap") else ""
    frozen = ", frozen W" if cfg.get("frozen_weight") else ""
    return f"{cfg['hidden']}, {cfg['vocab']}{softcap}{frozen}"


def softmax_description(target_boost) -> str:
    if not target_boost:
        return "a diffuse softmax (every probability near 1/V)"
    low, high = target_boost
    return (f"a peaked softmax (each target logit raised by a uniform draw in [{low:g}, {high:g}) above the rest, "
            "as a trained model's)")


def markdown_lines(env: Dict[str, str], rows: List[dict], accuracy, chunk_size: int, stem: str = "benchmarks",
                   settings: Optional[Dict[str, object]] = None) -> List[str]:
    settings = settings or {}
    baselines = [name for name in ("naive", "compiled") if any(row.get(name) for row in rows)]
    profiled = any((row.get("ours") or {}).get("breakdown") for row in rows)
    filtered = any(row.get("ours_filtered") for row in rows)
    logits_dtype = getattr(logit_ops, "FAST_PATH_LOGITS_DTYPE", None)
    lines = [
        "# Benchmark: fused linear + SimPO loss, forward + backward",
        "",
        *(["**Smoke run (`--smoke`): every row at a tiny shape, to check the pipeline; its times mean nothing.**",
           ""] if settings.get("smoke") else []),
        f"Card: **{env['card']}**; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"cut-cross-entropy {env.get('cut_cross_entropy', 'not requested')}; commit `{env['commit']}`. bf16, "
        f"SimPO beta {SIMPO_OPTIONS['beta']}, gamma {SIMPO_OPTIONS['gamma']}, with the chosen NLL (alpha "
        f"{SIMPO_OPTIONS['alpha']}; rows marked *no NLL*: without), ours with `chunk_size={chunk_size}`, fast-path "
        f"logits dtype {logits_dtype or 'bf16 (input dtype)'}; {settings.get('warmup', 2)} warm-up + "
        f"{settings.get('reps', 7)} timed turns, logits std ~{settings.get('logit_std', 2.0)}, "
        f"{softmax_description(settings.get('target_boost'))}. Written by "
        "`python3 -m benchmarks.bench_simpo` (its docstring says what each variant computes).",
        "",
        "Each turn times floor, ours, CCE, CCE exact once each, in that order, on the turn's own inputs (no timed "
        "call sees an input a warm-up saw). *ours 1st call*: the row's first (warm-up) call, apart from the "
        "medians: kernel compilation and autotuning included (the JSON keeps every warm-up turn of every variant). "
        "*floor*: the GEMMs X·Wᵀ, G·W, Gᵀ·X (two with a frozen weight) with "
        "G the real logits gradient (softmax − onehot)/N, prepared untimed. *ours/floor*, *ours/CCE*: medians of "
        "the per-turn ratios (the ms columns are medians of the times). *CCE*: SimPO on "
        "`cut_cross_entropy.linear_cross_entropy(..., reduction=\"none\")` with its default `filter_eps=\"high\"` "
        "(skips backward blocks of small softmax gradient: not exact); *CCE exact*: `filter_eps=None`. "
        "*GiB*: extra peak memory of one fwd+bwd, returned gradients included. Verdicts: ours/floor within the "
        "row's target, ours' GiB within its target, ours faster than CCE (filtered). Inputs are random"
        + (": on a diffuse softmax CCE's filter skips few blocks; `--target-boost` makes it peaked, as a trained "
           "model's." if not settings.get("target_boost") else ", the softmax peaked by `--target-boost`.")
        + (f" *ours filtered*: ours with its opt-in gradient filter at CCE's threshold ({OURS_FILTER_EPS:.3g}; "
           "not exact: it skips the same kind of blocks CCE's filter does; loss and log-probs stay exact)."
           if filtered else ""),
        "",
    ]
    if profiled:
        lines += ["*Where ours' time goes*: ms per iteration under `torch.profiler` — GEMM kernels, our Triton "
                  "kernels, other kernels (summed device time each), and the host gap (the iteration's wall time "
                  "minus the union of its kernels: the device waiting for the host; the profiler's own host "
                  "overhead included).", ""]
    header = ["config (pairs×T)", "head (H, V)", "tokens", "floor ms", "ours ms", "ours 1st call ms", "ours/floor",
              "CCE ms",
              "CCE exact ms", "ours/CCE", "ours GiB", "CCE GiB", "CCE exact GiB", "target (×floor, GiB)",
              "time met", "memory met", "beats CCE"]
    header += [f"{name} ms" for name in baselines] + [f"{name} GiB" for name in baselines]
    if filtered:
        header += ["ours filtered ms", "ours filtered/floor", "ours filtered/CCE", "ours filtered GiB"]
    if profiled:
        header += ["GEMM ms", "our kernels ms", "other ms", "host gap ms"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cfg, ours = row["config"], row.get("ours")
        target = "" if cfg.get("target_ratio") is None else f"≤{cfg['target_ratio']}×, ≤{cfg['target_gib']}"
        cells = [cfg["name"], head_label(cfg), str(row["tokens"]), fmt_ms(row.get("floor")), fmt_ms(ours),
                 fmt_first_call(ours), fmt_ratio(paired_ratio(row, "ours", "floor")), fmt_ms(row.get("cce")), fmt_ms(row.get("cce_exact")),
                 fmt_ratio(paired_ratio(row, "ours", "cce")), fmt_gib(ours), fmt_gib(row.get("cce")),
                 fmt_gib(row.get("cce_exact")), target, *verdicts(row)]
        cells += [fmt_ms(row.get(name)) for name in baselines] + [fmt_gib(row.get(name)) for name in baselines]
        if filtered:
            cells += [fmt_ms(row.get("ours_filtered")), fmt_ratio(paired_ratio(row, "ours_filtered", "floor")),
                      fmt_ratio(paired_ratio(row, "ours_filtered", "cce")), fmt_gib(row.get("ours_filtered"))]
        if profiled:
            cells += fmt_breakdown(ours)
        lines.append("| " + " | ".join(cells) + " |")
    failures = [f"{row['config']['name']} {name}: `{entry['error']}`" for row in rows for name, entry in row.items()
                if isinstance(entry, dict) and entry.get("error")]
    if failures:
        lines += ["", "*failed*: " + "; ".join(failures)]
    reused = sorted({e["reused_from"] for row in rows for e in row.values() if isinstance(e, dict) and
                     e.get("reused_from")})
    if reused:
        commits = ", ".join(f"`{c}`" for c in reused)
        lines += ["", f"\\* copied from the earlier run at commit {commits} on the same card "
                  "model (`--reuse`): those variants (naive eager and its `torch.compile`) do not run our code."]
    if accuracy:
        shape = settings.get("accuracy_shape", {})
        names = [name for name in ("ours", "ours_filtered", "plain_bf16", "cce", "cce_exact")
                 if name in accuracy and "error" not in accuracy[name]]
        labels = {"ours": "ours", "ours_filtered": "ours filtered", "plain_bf16": "plain PyTorch bf16",
                  "cce": "CCE (filtered)", "cce_exact": "CCE exact"}
        lines += ["", f"Relative error ‖out − ref‖/‖ref‖ against float64 ({shape.get('pairs', '?')} pairs × "
                  f"{shape.get('seq_len', '?')} tokens, H={shape.get('hidden', '?')}, V={shape.get('vocab', '?')}, "
                  "bf16 inputs; ours returns its loss and log-probs in the input dtype, bf16, unless given "
                  "`output_dtype`; CCE's per-token losses are float32):", "", "| quantity | " + " | ".join(labels[n] for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for key in ACCURACY_QUANTITIES:
            lines.append(f"| {key} | " + " | ".join(f"{accuracy[n][key]:.2e}" for n in names) + " |")
        lines += [f"\n{labels[n]} failed: `{accuracy[n]['error']}`" for n in accuracy if "error" in accuracy[n]]
    lines += ["", f"![time over the floor and extra memory per row]({stem}.png)", ""]
    return lines + TRAINING_STEP_SECTION


def write_markdown(path: str, env: Dict[str, str], rows: List[dict], accuracy, chunk_size: int,
                   settings: Optional[Dict[str, object]] = None) -> None:
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(path, "w") as f:
        f.write("\n".join(markdown_lines(env, rows, accuracy, chunk_size, stem, settings)))


PLOT_STYLE = {"ours": "tab:blue", "ours_filtered": "tab:cyan", "cce": "tab:orange", "cce_exact": "tab:red",
              "naive": "tab:gray", "compiled": "tab:olive"}


def plot_series(rows: List[dict]) -> Tuple[List[str], Dict[str, List[float]], Dict[str, List[float]]]:
    """Row labels, and per variant (in :data:`VARIANTS` order, those measured on some row) its per-turn-median
    time over the floor and its extra peak GiB, NaN where not measured."""
    nan = float("nan")
    labels = [row["config"]["name"] for row in rows]
    present = [name for name in VARIANTS if any(row.get(name) for row in rows)]
    ratios = {name: [paired_ratio(row, name, "floor") or nan for row in rows] for name in present}
    gib = {name: [(row.get(name) or {}).get("peak_gib") or nan for row in rows] for name in present}
    return labels, ratios, gib


def write_plot(path: str, env: Dict[str, str], rows: List[dict]):
    """Two panels of grouped bars per row: time over the floor (lines at the 1.05x and 1.10x targets) and
    extra peak memory (log scale). Returns :func:`plot_series`' data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ratios, gib = plot_series(rows)
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(8.0, 1.1 * len(rows)), 8.5), sharex=True)
    width = 0.8 / max(1, len(ratios))
    for k, name in enumerate(ratios):
        offsets = [i + (k - (len(ratios) - 1) / 2) * width for i in range(len(rows))]
        ax_t.bar(offsets, ratios[name], width, label=name, color=PLOT_STYLE[name])
        ax_m.bar(offsets, gib[name], width, label=name, color=PLOT_STYLE[name])
    for level, style in ((1.0, "-"), (1.05, "--"), (1.10, ":")):
        ax_t.axhline(level, color="black", linestyle=style, linewidth=0.8)
    ax_t.set_ylabel("fwd+bwd time / GEMM floor (median of turns)")
    ax_m.set_ylabel("extra peak memory, GiB")
    if any(value > 0 for values in gib.values() for value in values):  # NaN compares False: none on the CPU
        ax_m.set_yscale("log")
    ax_m.set_xticks(range(len(rows)))
    ax_m.set_xticklabels(labels, rotation=30, ha="right")
    for ax in (ax_t, ax_m):
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle(f"fused linear + SimPO vs GEMM floor and Cut Cross-Entropy, bf16\n{env['card']}, commit "
                 f"{env['commit']} (missing bars: OOM or not run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return labels, ratios, gib


#: for --dry-run's run-time estimate: bf16 GEMM throughput an H200 reaches on the floor's shapes (measured:
#: ~700 TFLOP/s), and each variant's time relative to the floor (ours measured 1.05-1.3x; CCE's kernels recompute
#: the logits in the backward and run Triton GEMMs: guesses, on the safe side)
ASSUMED_TFLOPS = 650.0
ASSUMED_RATIO = {"ours": 1.25, "ours_filtered": 1.25, "cce": 1.8, "cce_exact": 2.2, "naive": 1.3, "compiled": 1.25}
#: the floor's untimed G per call (one logits GEMM and a softmax pass), in floors
FLOOR_PREPARE_RATIO = 0.6
#: seconds per row for inputs, allocator and per-shape kernel compiles; torch.compile's per-shape compile for
#: "compiled"; once per run: imports, CUDA start-up, the accuracy check (CCE's first calls compile its Triton
#: kernels and its torch.compile'd vocabulary sort) and the outputs
ROW_SETUP_S, COMPILE_S, START_S = 5.0, 60.0, 45.0


def plan(configs: Sequence[Config], variants: Sequence[str], reps: int, profile_iterations: int,
         warmup: int = 2) -> Tuple[List[str], float]:
    """The rows with their targets and an estimated run time each (seconds), without CUDA; and the total
    (:data:`START_S` included).

    Calls per row: the floor ``warmup + reps`` (each after its untimed ``G``); each variant ``warmup + reps`` in
    the turns plus one memory probe; ours ``profile_iterations`` more under the profiler.
    """
    lines, total = [], START_S
    turns = warmup + reps
    for cfg in configs:
        floor_s = cfg.floor_flop / (ASSUMED_TFLOPS * 1e12)
        seconds = ROW_SETUP_S + turns * (1 + FLOOR_PREPARE_RATIO) * floor_s
        for variant in variants:
            calls = turns + 1 + (profile_iterations if variant == "ours" else 0)
            seconds += calls * ASSUMED_RATIO[variant] * floor_s + (COMPILE_S if variant == "compiled" else 0.0)
        total += seconds
        target = "none" if cfg.target_ratio is None else f"<= {cfg.target_ratio}x floor, <= {cfg.target_gib} GiB"
        lines.append(f"{cfg.name:26s} {cfg.pairs}x{cfg.seq_len} ({cfg.tokens} tokens) H {cfg.hidden} V {cfg.vocab}"
                     f"{' softcap %g' % cfg.softcap if cfg.softcap else ''}{' frozen W' if cfg.frozen_weight else ''}"
                     f"{'' if cfg.nll else ' no NLL'} | floor {cfg.floor_flop / 1e12:.1f} TFLOP ~{floor_s * 1e3:.0f} ms"
                     f" | target {target} | ~{seconds:.0f} s")
    return lines, total


def select_configs(names: Optional[Sequence[str]]) -> List[Config]:
    if not names:
        return list(CONFIGS)
    known = {cfg.name for cfg in CONFIGS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; expected names among {sorted(known)}")
    return [cfg for cfg in CONFIGS if cfg.name in names]


def split_names(value: str) -> List[str]:
    """``--rows "8x1024,4x1024 Qwen2.5-7B"`` -> the names, spaces around the commas dropped."""
    return [name.strip() for name in value.split(",") if name.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help=f"directory for the .md/.png/.json (default {DEFAULT_OUT}; with --smoke "
                             "outputs/bench_simpo_smoke)")
    parser.add_argument("--stem", default=None,
                        help="file name without extension (default benchmarks_<card>, e.g. benchmarks_h200)")
    parser.add_argument("--rows", type=split_names, default=None,
                        help='comma-separated row names (default: all), e.g. --rows "8x1024,1x32768"')
    parser.add_argument("--configs", nargs="*", default=None, help="row names, space-separated (as --rows)")
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                        help="besides the floor, always timed (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=7, help="timed turns per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed turns per row, on their own inputs")
    parser.add_argument("--logit-std", type=float, default=2.0, help="standard deviation of the random logits")
    parser.add_argument("--target-boost", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="a peaked softmax, as a trained model's: each target logit raised by a uniform draw "
                             "in [LOW, HIGH) above the random rest (e.g. 10 20); default: a diffuse softmax")
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
                        help="take naive/compiled entries not measured now from this earlier run's JSON")
    parser.add_argument("--no-deferred-scale", action="store_true",
                        help="single-pair token mode recomputes both rows' logits (the scheme before "
                             "DEFER_CHOSEN_SCALE)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the rows, their targets and an estimated run time; no CUDA needed")
    parser.add_argument("--smoke", action="store_true",
                        help="every row at a tiny shape (on the CPU without CUDA): checks the pipeline, not speed")
    args = parser.parse_args(argv)
    if args.rows is not None and args.configs is not None:
        parser.error("give --rows or --configs, not both")
    if not (math.isfinite(args.logit_std) and args.logit_std > 0):
        parser.error(f"--logit-std needs a finite standard deviation > 0, got {args.logit_std:g}")
    if args.target_boost is not None:
        low, high = args.target_boost
        # a negative boost pushes the target below the rest (not a peaked softmax); a non-finite one makes NaN inputs
        if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
            parser.error(f"--target-boost LOW HIGH needs finite 0 <= LOW <= HIGH, got {low:g} {high:g}")
    configs = select_configs(args.rows if args.rows is not None else args.configs)
    profile_iterations = args.profile_iterations if args.breakdown_profile else 0
    if args.dry_run:
        lines, total = plan(configs, args.variants, args.reps, profile_iterations, args.warmup)
        print("\n".join(lines))
        cce = load_linear_cross_entropy()[1] if set(args.variants) & set(CCE_VARIANTS) else "not requested"
        print(f"estimated total ~{total:.0f} s (~{total / 60:.1f} min) for the floor and {args.variants}, "
              f"{args.warmup} + {args.reps} turns per row, at {ASSUMED_TFLOPS:g} TFLOP/s, start-up and accuracy "
              f"check included; cut_cross_entropy here: {cce}")
        return lines
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.smoke and device != "cuda":
        raise SystemExit("bench_simpo: no CUDA device (use --dry-run or --smoke on the CPU)")
    if args.smoke:
        configs = [smoke_config(cfg) for cfg in configs]
    if args.logits_fp32:
        logit_ops.FAST_PATH_LOGITS_DTYPE = torch.float32
    if args.no_deferred_scale:
        fused_linear_preference.DEFER_CHOSEN_SCALE = False
    linear_cross_entropy, cce_info = None, "not requested"
    if set(args.variants) & set(CCE_VARIANTS):
        linear_cross_entropy, cce_info = load_linear_cross_entropy()
        if linear_cross_entropy is not None and device != "cuda" and \
                getattr(linear_cross_entropy, "__module__", "").startswith("cut_cross_entropy"):
            linear_cross_entropy, cce_info = None, f"{cce_info}, not run: its kernels need CUDA"
        if linear_cross_entropy is None:
            print(f"WARNING: cut_cross_entropy {cce_info}: the CCE rows are left out", flush=True)
    env = environment(args.commit, device, cce_info)
    print(env, flush=True)
    accuracy_shape = SMOKE_ACCURACY if args.smoke else dict(pairs=2, seq_len=300, hidden=HIDDEN, vocab=VOCAB)
    accuracy = None if args.no_accuracy else accuracy_check(
        device=device, linear_cross_entropy=linear_cross_entropy, logit_std=args.logit_std,
        target_boost=args.target_boost, filtered="ours_filtered" in args.variants, **accuracy_shape)
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
        rows.append(bench_config(cfg, args.variants, args.reps, args.chunk_size, profile_iterations, device,
                                 args.warmup, linear_cross_entropy, args.logit_std, args.target_boost))
        Clock(device).empty_cache()
    if args.reuse:
        reuse_baselines(rows, args.reuse, args.variants, env)
    out = args.out or (os.path.join("outputs", "bench_simpo_smoke") if args.smoke else DEFAULT_OUT)
    stem = args.stem or output_stem(env["card"])
    os.makedirs(out, exist_ok=True)
    settings = dict(warmup=args.warmup, reps=args.reps, logit_std=args.logit_std, target_boost=args.target_boost,
                    variants=list(args.variants),
                    smoke=args.smoke, accuracy_shape=accuracy_shape, simpo=SIMPO_OPTIONS)
    path = os.path.join(out, stem)
    with open(path + ".json", "w") as f:
        json.dump({"env": env, "settings": settings, "rows": rows, "accuracy": accuracy,
                   "chunk_size": args.chunk_size}, f, indent=1)
    write_markdown(path + ".md", env, rows, accuracy, args.chunk_size, settings)
    write_plot(path + ".png", env, rows)
    print(open(path + ".md").read())
    print(f"wrote {path}.md, .json, .png", flush=True)
    return rows


if __name__ == "__main__":
    main()
