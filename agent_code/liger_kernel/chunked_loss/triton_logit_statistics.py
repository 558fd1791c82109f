"""Triton kernel: per-token row statistics of a chunk of logits, in one read of the logits.

Replaces (with ``logits`` the raw ``x @ W.T`` of any float dtype, ``bias`` optional, ``s`` the softcap)::

    z = logits.float() + bias.float()            # bias only when given
    z = s * tanh(z / s)                           # softcap only when given
    lse, target_logit, logit_sum = z.logsumexp(-1), z.gather(-1, target) * valid, z.sum(-1)

Bias and softcap are applied on the fly, so the logits buffer is never rewritten before the gradient pass.
Imported only on the CUDA fast path (or by the interpreter tests): importing triton is deferred to here.
The vocabulary size is a compile-time constant (one compilation per model): constant loop bounds, and
triton 3.6's interpreter (with numpy 2.5) cannot run a loop over a run-time bound.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

#: columns per loop step and warps per row: 16 fp32 values per thread, small programs, many rows in flight per
#: SM (H200 sweep at 4096 tokens, bf16: 0.35 ms at V 128256 vs 0.40-0.54 for 1024-16384 columns at 2-16 warps;
#: 1.05 ms vs 1.11-2.27 at V 256000 with the softcap; docs/measurements/gpu_notes.md)
STATISTICS_BLOCK = 2048
STATISTICS_WARPS = 4


@triton.jit
def softcap_tanh(z, softcap, inv_softcap):
    """``softcap * tanh(z / softcap)`` via ``tanh(u) = 1 - 2 / (exp(2u) + 1)`` (saturates cleanly at +-1).

    ``z / softcap`` is taken as ``z * inv_softcap`` (within an ulp): divisions and exponentials share the
    GPU's special-function units, which bound these kernels with a softcap, so one division fewer per element
    is that much less time.
    """
    return softcap * (1.0 - 2.0 / (tl.exp((2.0 * inv_softcap) * z) + 1.0))


@triton.jit
def load_logits_block(row_ptr, bias_ptr, cols, mask, softcap, inv_softcap, HAS_BIAS: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr):
    """One block of a logits row as float32 with bias and softcap applied (masked lanes read 0)."""
    z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap_tanh(z, softcap, inv_softcap)
    return z


@triton.jit
def program_row(logits_ptr, stride_row):
    """This program's row (int64: ``row * stride`` passes 2**31 on large chunks) and its logits pointer."""
    row = tl.program_id(0).to(tl.int64)
    return row, logits_ptr + row * stride_row


@triton.jit
def load_row_block(row_ptr, bias_ptr, start, n_cols, softcap, inv_softcap, HAS_BIAS: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """``(cols, mask, z)`` of the block of a logits row starting at column ``start`` (see load_logits_block)."""
    cols = start + tl.arange(0, BLOCK)
    mask = cols < n_cols
    return cols, mask, load_logits_block(row_ptr, bias_ptr, cols, mask, softcap, inv_softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def _logit_statistics_kernel(
    logits_ptr,
    stride_row,
    bias_ptr,
    target_ptr,
    lse_ptr,
    target_logit_ptr,
    logit_sum_ptr,
    n_cols: tl.constexpr,
    ignore_index,
    softcap,
    inv_softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, row_ptr = program_row(logits_ptr, stride_row)
    # online log-sum-exp: one block-wide max per step (a single cross-thread reduction), per-lane sums
    # rescaled by one scalar exp, so one exp per element and the sums are reduced once, after the loop
    running_max = -1e30  # finite: exp(running_max - new_max) stays 0, never nan, before the first block
    lane_sum = tl.zeros([BLOCK], dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        _, mask, z = load_row_block(row_ptr, bias_ptr, start, n_cols, softcap, inv_softcap, HAS_BIAS, HAS_SOFTCAP,
                                    BLOCK)
        total += z
        z_masked = tl.where(mask, z, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(z_masked, axis=0))
        lane_sum = lane_sum * tl.exp(running_max - new_max) + tl.exp(z_masked - new_max)
        running_max = new_max
    tl.store(lse_ptr + row, running_max + tl.log(tl.sum(lane_sum, axis=0)))
    tl.store(logit_sum_ptr + row, tl.sum(total, axis=0))

    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    # ids outside [0, V) are rejected by the host, possibly after this kernel ran: never read them
    safe_target = tl.where(valid & (target >= 0) & (target < n_cols), target, 0)
    z_target = load_logits_block(row_ptr, bias_ptr, safe_target, valid, softcap, inv_softcap, HAS_BIAS, HAS_SOFTCAP)
    tl.store(target_logit_ptr + row, tl.where(valid, z_target, 0.0))


def row_kernel_options(n_cols: int, bias: Optional[torch.Tensor], softcap: Optional[float], block: int,
                       num_warps: int) -> dict:
    """The launch keywords of a kernel that walks one logits row per program: the softcap scalar and its
    reciprocal (unused without ``HAS_SOFTCAP``), the compile-time switches, the block (no wider than V's next
    power of two)."""
    cap = float(softcap) if softcap is not None else 1.0
    return dict(softcap=cap, inv_softcap=1.0 / cap, HAS_BIAS=bias is not None,
                HAS_SOFTCAP=softcap is not None, BLOCK=min(block, triton.next_power_of_2(n_cols)),
                num_warps=num_warps)


def triton_logit_statistics(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    block: int = STATISTICS_BLOCK,
    num_warps: int = STATISTICS_WARPS,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse, target_logit, logit_sum)``, float32 of shape (N,), of ``logits`` (N, V) (unit column stride)."""
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    target = target.contiguous()
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    target_logit = torch.empty_like(lse)
    logit_sum = torch.empty_like(lse)
    if n_rows == 0:
        return lse, target_logit, logit_sum
    _logit_statistics_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        bias if bias is not None else logits,  # never read without HAS_BIAS
        target,
        lse,
        target_logit,
        logit_sum,
        n_cols,
        ignore_index,
        **row_kernel_options(n_cols, bias, softcap, block, num_warps),
    )
    return lse, target_logit, logit_sum
