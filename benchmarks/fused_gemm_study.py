"""Study: would Triton GEMMs that fuse the loss's memory-bound passes beat cuBLAS plus those passes on Hopper?

The loss spends, per chunk, three GEMMs at the floor plus two memory-bound passes over the chunk's logits: the
statistics (max, sum-exp, target logit, logit sum) and the in-place softmax gradient. This study replaces them with
Triton GEMMs (persistent grid, TMA descriptors) that fuse those passes, and times both, interleaved turn by turn:

* ``baseline`` (what the loss runs): ``logits = X @ W.T`` (cuBLAS), the statistics kernel, the gradient kernel in
  place, ``dX = G @ W`` and ``dW = G.T @ X`` in float32 (cuBLAS);
* ``epilogue_statistics``: the logits GEMM in Triton with the statistics in its epilogue (per 256-column tile: max,
  sum-exp, logit sum, the target's logit; a tiny reduction over tiles), the rest as the baseline;
* ``fused``: that GEMM, then dX and dW as Triton GEMMs that compute ``G = coef * (softmax - onehot)`` from the
  logits tile where they load their operand (no gradient pass, no ``G`` written).

Each turn calls every variant once on the turn's own inputs (drawn untimed before the turn: no timed call sees an
input an earlier turn used); the two first (warm-up) turns are reported apart (``first_turns_ms``); ratios are the
medians of the per-turn ratios to the baseline. Errors: each variant's lse, dX, dW against the baseline's
(relative norm), on inputs of their own.

    python3 -m benchmarks.fused_gemm_study --out outputs/fused_gemm_study

The kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (tests/benchmarks/test_fused_gemm_study.py) in
float32/float16 with row counts and widths that are multiples of 8 (TMA needs 16-byte row strides).
"""
import argparse
import json
import os
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.bench_simpo import Clock

LOG2E = 1.4426950408889634
#: (rows, columns, inner) per tile, pipeline stages, warps: the best of a sweep on an H200 (triton 3.6) for the logits
#: GEMM at H 2048-4096, V 128k-152k (128 x 256 x 64 with 4 stages needs more shared memory than the card has)
LOGITS_TILES = (128, 256, 64, 3, 8)
GRADIENT_TILES = (128, 128, 64, 4, 8)


@triton.jit
def _tile_of(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    """Grouped tile order: ``GROUP_M`` row tiles share each column tile while it is in L2."""
    group_id = tile_id // num_pid_in_group
    first_m = group_id * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile_id % size_m), (tile_id % num_pid_in_group) // size_m


@triton.jit
def _logits_statistics_kernel(x_desc, w_desc, out_desc, target_ptr, tile_max_ptr, tile_sumexp_ptr, tile_sum_ptr,
                              target_logit_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                              GROUP_M: tl.constexpr, N_PROGRAMS: tl.constexpr):
    """``out = X @ W.T`` (M, N) and, per row and column tile, the tile's max, sum of exp(z - max), sum of z (from
    the rounded logits), and the target's logit where the target falls in the tile."""
    num_pid_m, num_pid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, N_PROGRAMS):
        pid_m, pid_n = _tile_of(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        om, on = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BK)):
            acc = tl.dot(x_desc.load([om, ki * BK]), w_desc.load([on, ki * BK]).T, acc)
        logits = acc.to(out_desc.dtype)
        out_desc.store([om, on], logits)
        z = logits.to(tl.float32)
        rows, cols = om + tl.arange(0, BM), on + tl.arange(0, BN)
        in_cols = cols[None, :] < N
        z_masked = tl.where(in_cols, z, -float("inf"))
        tile_max = tl.max(z_masked, 1)
        in_rows = rows < M
        tl.store(tile_max_ptr + pid_n * M + rows, tile_max, mask=in_rows)
        tl.store(tile_sumexp_ptr + pid_n * M + rows,
                 tl.sum(tl.exp2((z_masked - tile_max[:, None]) * 1.4426950408889634), 1), mask=in_rows)
        # columns past N hold 0 (the descriptor zero-fills W's missing rows): no mask needed in the sum
        tl.store(tile_sum_ptr + pid_n * M + rows, tl.sum(z, 1), mask=in_rows)
        target = tl.load(target_ptr + rows, mask=in_rows, other=-1)
        target_logit = tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), 1)
        tl.store(target_logit_ptr + rows, target_logit, mask=in_rows & (target >= on) & (target < on + BN))


@triton.jit
def _gradient_product_kernel(logits_desc, other_desc, out_desc, lse_ptr, target_ptr, coef_ptr, M, N, K,
                             WEIGHT_GRAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                             GROUP_M: tl.constexpr, N_PROGRAMS: tl.constexpr):
    """``G @ W`` (``WEIGHT_GRAD`` False: M tokens, K vocabulary) or ``G.T @ X`` (True: M vocabulary, K tokens), with
    ``G = coef * (exp(z - lse) - onehot(target))`` computed from each loaded logits tile, rounded to the other
    operand's dtype."""
    num_pid_m, num_pid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, N_PROGRAMS):
        pid_m, pid_n = _tile_of(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        om, on = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if not WEIGHT_GRAD:  # the tile's tokens are its rows: their statistics are loaded once
            tokens = om + tl.arange(0, BM)
            lse = tl.load(lse_ptr + tokens, mask=tokens < M, other=0.0)
            target = tl.load(target_ptr + tokens, mask=tokens < M, other=-1)
            coef = tl.load(coef_ptr + tokens, mask=tokens < M, other=0.0)
        for ki in range(tl.cdiv(K, BK)):
            ok = ki * BK
            if WEIGHT_GRAD:  # (BK tokens, BM vocabulary), transposed after the gradient
                tokens = ok + tl.arange(0, BK)
                lse = tl.load(lse_ptr + tokens, mask=tokens < K, other=0.0)
                target = tl.load(target_ptr + tokens, mask=tokens < K, other=-1)
                coef = tl.load(coef_ptr + tokens, mask=tokens < K, other=0.0)
                cols = om + tl.arange(0, BM)
                z = logits_desc.load([ok, om]).to(tl.float32)
            else:  # (BM tokens, BK vocabulary); columns past V meet zero-filled rows of W
                cols = ok + tl.arange(0, BK)
                z = logits_desc.load([om, ok]).to(tl.float32)
            grad = coef[:, None] * (tl.exp2((z - lse[:, None]) * 1.4426950408889634)
                                    - tl.where(cols[None, :] == target[:, None], 1.0, 0.0))
            grad = grad.to(other_desc.dtype)
            if WEIGHT_GRAD:
                grad = grad.T
            acc = tl.dot(grad, other_desc.load([ok, on]), acc)
        out_desc.store([om, on], acc.to(out_desc.dtype))


def n_programs(device: torch.device) -> int:
    """One program per multiprocessor on a GPU (a persistent grid); a few under the interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def logits_with_statistics(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                           tiles: Sequence[int] = LOGITS_TILES):
    """``(logits, lse, target_logit, logit_sum)``: ``logits = x @ weight.T`` in x's dtype; the rest float32 per row,
    as ``torch.logsumexp(z, -1)``, ``z.gather(-1, target)``, ``z.sum(-1)`` of the rounded logits ``z``."""
    bm, bn, bk, stages, warps = tiles
    (m, k), n = x.shape, weight.shape[0]
    logits = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = torch.empty((3, triton.cdiv(n, bn), m), dtype=torch.float32, device=x.device)
    target_logit = torch.zeros(m, dtype=torch.float32, device=x.device)
    grid = (min(n_programs(x.device), triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
    _logits_statistics_kernel[grid](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
        TensorDescriptor.from_tensor(logits, [bm, bn]), target, partial[0], partial[1], partial[2], target_logit,
        m, n, k, bm, bn, bk, 8, grid[0], num_stages=stages, num_warps=warps)
    tile_max, tile_sumexp, tile_sum = partial
    row_max = tile_max.amax(dim=0)
    lse = row_max + torch.log((tile_sumexp * torch.exp(tile_max - row_max)).sum(dim=0))
    return logits, lse, target_logit, tile_sum.sum(dim=0)


def gradient_product(logits: torch.Tensor, other: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                     coef: torch.Tensor, weight_grad: bool, out_dtype: torch.dtype,
                     tiles: Sequence[int] = GRADIENT_TILES) -> torch.Tensor:
    """``G @ other`` (dX, ``other`` = W (V, H)) or ``G.T @ other`` (``weight_grad``: dW, ``other`` = X (N, H)),
    ``G = coef[:, None] * (softmax(logits) - onehot(target))`` with ``softmax = exp(logits - lse[:, None])``."""
    bm, bn, bk, stages, warps = tiles
    (n_tokens, vocab), hidden = logits.shape, other.shape[1]
    m, k = (vocab, n_tokens) if weight_grad else (n_tokens, vocab)
    out = torch.empty((m, hidden), dtype=out_dtype, device=logits.device)
    grid = (min(n_programs(logits.device), triton.cdiv(m, bm) * triton.cdiv(hidden, bn)),)
    _gradient_product_kernel[grid](
        TensorDescriptor.from_tensor(logits, [bk, bm] if weight_grad else [bm, bk]),
        TensorDescriptor.from_tensor(other, [bk, bn]), TensorDescriptor.from_tensor(out, [bm, bn]),
        lse, target, coef, m, hidden, k, weight_grad, bm, bn, bk, 8, grid[0], num_stages=stages, num_warps=warps)
    return out


def chunk_variants(weight: torch.Tensor) -> Dict[str, Callable]:
    """Each variant's ``(x, target, coef) -> (lse, dX, dW float32)`` for one chunk."""
    from agent_code.liger_kernel.chunked_loss.logit_ops import matmul_accumulation_dtype
    from agent_code.liger_kernel.chunked_loss.triton_logit_ops import (
        triton_logit_gradient_,
        triton_logit_statistics,
    )

    def baseline(x, target, coef):
        logits = x @ weight.t()
        lse, _, _ = triton_logit_statistics(logits, target, -100)
        grad = triton_logit_gradient_(logits, lse, target, coef, x.dtype)
        return lse, grad @ weight, matmul_accumulation_dtype(grad.t(), x)

    def epilogue_statistics(x, target, coef):
        logits, lse, _, _ = logits_with_statistics(x, weight, target)
        grad = triton_logit_gradient_(logits, lse, target, coef, x.dtype)
        return lse, grad @ weight, matmul_accumulation_dtype(grad.t(), x)

    def fused(x, target, coef):
        logits, lse, _, _ = logits_with_statistics(x, weight, target)
        return (lse, gradient_product(logits, weight, lse, target, coef, False, x.dtype),
                gradient_product(logits, x, lse, target, coef, True, torch.float32))

    return {"baseline": baseline, "epilogue_statistics": epilogue_statistics, "fused": fused}


#: (label, tokens per chunk, H, V): the chunks the loss runs at its default budget on the benchmark's heads, but the
#: Llama-3.2-1B head's: its whole 4x1024 batch, 8192 tokens (the default budget runs it as two 4096-token chunks)
SHAPES = [("8x1024 (H 4096, V 128256): 4096-token chunks", 4096, 4096, 128256),
          ("Llama-3.2-1B head (H 2048, V 128256): 8192-token chunks", 8192, 2048, 128256),
          ("Qwen2.5-7B head (H 3584, V 152064): 2048-token chunks", 2048, 3584, 152064)]


def chunk_inputs(tokens: int, hidden: int, vocab: int, seed: int, device: torch.device, dtype: torch.dtype):
    """One chunk's ``(x, target, coef)``, drawn from ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(tokens, hidden, device=device, generator=gen).to(dtype),
            torch.randint(0, vocab, (tokens,), device=device, generator=gen),
            torch.randn(tokens, device=device, generator=gen) / tokens)


def study_shape(tokens: int, hidden: int, vocab: int, turns: int, warmup: int = 2, device="cuda",
                dtype: torch.dtype = torch.bfloat16) -> dict:
    """Every variant once per turn, in turns: each turn on inputs of its own, drawn untimed before it (no timed
    call sees an input an earlier turn used); the ``warmup`` first turns (compilation, autotuning, allocator
    growth) reported apart."""
    device, clock = torch.device(device), Clock(device)
    weight = (torch.randn(vocab, hidden, device=device) * (2.0 / hidden ** 0.5)).to(dtype)
    variants = chunk_variants(weight)
    # the errors on inputs of their own, before any timing
    check = chunk_inputs(tokens, hidden, vocab, 10_000, device, dtype)
    want = variants["baseline"](*check)
    errors = {name: [float((g.float() - w.float()).norm() / w.float().norm()) for g, w in zip(fn(*check), want)]
              for name, fn in variants.items() if name != "baseline"}
    del check, want
    times: Dict[str, List[float]] = {name: [] for name in variants}
    first: Dict[str, List[float]] = {name: [] for name in variants}
    for turn in range(warmup + turns):
        inputs = chunk_inputs(tokens, hidden, vocab, turn, device, dtype)
        for name, fn in variants.items():
            (times if turn >= warmup else first)[name].append(clock.time_ms(lambda: fn(*inputs)))
        del inputs
    base = times["baseline"]
    return {"median_ms": {name: statistics.median(t) for name, t in times.items()},
            "ratio_to_baseline": {name: statistics.median([a / b for a, b in zip(t, base)])
                                  for name, t in times.items()},
            "first_turns_ms": first,
            "rel_err_lse_dx_dw_vs_baseline": errors}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/fused_gemm_study")
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--commit", default=None, help="the commit measured (recorded in the JSON)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fused_gemm_study: needs a CUDA GPU (Hopper: TMA descriptors); its kernels' CPU check is "
                         "tests/benchmarks/test_fused_gemm_study.py under TRITON_INTERPRET=1")
    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
              "commit": args.commit, "logits_tiles": LOGITS_TILES, "gradient_tiles": GRADIENT_TILES, "rows": []}
    for label, tokens, hidden, vocab in SHAPES:
        row = {"chunk": label, **study_shape(tokens, hidden, vocab, args.turns)}
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fused_gemm_study.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
