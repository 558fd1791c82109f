"""The CUDA fast path's logit operations: :class:`TritonLogitOps` (cuBLAS GEMMs) and its two Triton kernels
(their eager references: ``logit_ops.logit_statistics`` and ``logit_ops.logit_gradient_``).

Statistics: per-token row statistics of a chunk of logits, in one read of the logits. Replaces (with ``logits``
the raw ``x @ W.T`` of any float dtype, ``bias`` optional, ``s`` the softcap)::

    z = logits.float() + bias.float()            # bias only when given
    z = s * tanh(z / s)                           # softcap only when given
    lse, target_logit, logit_sum = z.logsumexp(-1), z.gather(-1, target) * valid, z.sum(-1)

Bias and softcap are applied on the fly, so the logits buffer is never rewritten before the gradient pass.

Gradient: turn a chunk of logits into ``dL/dlogits`` in one read and one write, in place. Replaces (``z`` as
above)::

    grad = coef[:, None] * (softmax(z) - onehot(target)) * (1 - (z / s) ** 2 if softcap else 1)
    grad = grad.to(grad_dtype)

``coef`` must already be 0 on ignored tokens. When ``grad_dtype`` is narrower than the logits (fp32 logits,
bf16 gradient) the gradient of row n is written over the first half of row n's own bytes: one program owns a
row and walks it left to right, so every byte it overwrites has already been read (block j's output lands in
the bytes of blocks <= j). The result is then a strided view of the logits buffer and no second buffer exists.

Imported only on the CUDA fast path (``logit_ops.select_logit_ops``) or by the interpreter tests: importing triton
is deferred to here.
The vocabulary size is a compile-time constant (one compilation per model): constant loop bounds, and
triton 3.6's interpreter (with numpy 2.5) cannot run a loop over a run-time bound.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from agent_code.liger_kernel.chunked_loss import logit_ops, triton_block_sparse
from agent_code.liger_kernel.chunked_loss.logit_ops import (
    LOW_PRECISION,
    EagerLogitOps,
    accumulate_weight_grad_,
    matmul_accumulation_dtype,
)

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


#: H200 sweep at 4096 tokens, bf16 (docs/measurements/gpu_notes.md): 2048 columns at 8 warps 0.58 ms at V 128256
#: and 1.21 ms at V 256000 with the softcap, within 3 % of the best of 12 settings for both (4096 at 8 warps:
#: 0.61 / 1.26)
GRADIENT_BLOCK = 2048
GRADIENT_WARPS = 8


@triton.jit
def _logit_gradient_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad_row,
    bias_ptr,
    target_ptr,
    lse_ptr,
    coef_ptr,
    n_cols: tl.constexpr,
    softcap,
    inv_softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, row_ptr = program_row(logits_ptr, stride_row)
    grad_row_ptr = grad_ptr + row * stride_grad_row
    target = tl.load(target_ptr + row)  # ignored rows have coef 0, so their (any) target never matters
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols, mask, z = load_row_block(row_ptr, bias_ptr, start, n_cols, softcap, inv_softcap, HAS_BIAS,
                                       HAS_SOFTCAP, BLOCK)
        grad = coef * (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0))
        if HAS_SOFTCAP:
            capped = z * inv_softcap
            grad = grad * (1.0 - capped * capped)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def gradient_destination(logits: torch.Tensor, grad_dtype: torch.dtype) -> torch.Tensor:
    """The (N, V) view of ``logits``' memory that receives the gradient in ``grad_dtype``."""
    if grad_dtype == logits.dtype:
        return logits
    ratio = logits.element_size() // torch.empty((), dtype=grad_dtype).element_size()
    assert ratio >= 1 and logits.is_contiguous(), "the gradient must fit inside the logits' own row bytes"
    return logits.view(grad_dtype)[:, : logits.shape[1]]


def triton_logit_gradient_(
    logits: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    coef: torch.Tensor,
    grad_dtype: torch.dtype,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    block: int = GRADIENT_BLOCK,
    num_warps: int = GRADIENT_WARPS,
) -> torch.Tensor:
    """Overwrite ``logits`` (N, V) with ``dL/dlogits`` in ``grad_dtype``; returns the (possibly strided) view."""
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    grad = gradient_destination(logits, grad_dtype)
    if n_rows == 0:
        return grad
    _logit_gradient_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        grad,
        grad.stride(0),
        bias if bias is not None else logits,
        target.contiguous(),
        lse.contiguous(),
        coef.to(torch.float32).contiguous(),
        n_cols,
        **row_kernel_options(n_cols, bias, softcap, block, num_warps),
    )
    return grad


# --- the fast path's logit operations, on these two kernels -----------------------------------------------------


class TritonLogitOps(EagerLogitOps):
    """CUDA fast path: GEMM output in ``logit_ops.FAST_PATH_LOGITS_DTYPE`` (default: the input dtype), bias and softcap
    applied inside the two Triton kernels, gradient written in place in the input dtype, dX in the input dtype.
    """

    #: pairs per chunk grow from ``chunk_size`` up to the logits budget: fewer GEMMs and float32 passes over the
    #: weight gradient
    chunk_size_is_minimum = True
    #: the kernels clamp target ids, so the host may read and check them while the first chunk already runs
    host_reads_async = True

    def __init__(self, weight, bias, softcap, ignore_index, weight_grad_in_input_dtype: bool = False,
                 gradient_filter_eps: Optional[float] = None):
        super().__init__(weight, bias, softcap, ignore_index)
        # operands in the input dtype wherever the kernels run (the interpreter tests run this class on CPU)
        self.gemm_dtype, self.weight = self.dtype, weight
        low = self.dtype in LOW_PRECISION
        # the knob is read here, at each call's construction, from logit_ops where it is documented
        self.logits_dtype = (logit_ops.FAST_PATH_LOGITS_DTYPE or self.dtype) if low else self.dtype
        #: the weight gradient's running sum kept in the input dtype (no float32 (V, H) buffer)
        self.weight_grad_in_input_dtype = weight_grad_in_input_dtype and low
        #: the opt-in gradient filter's threshold (bf16/fp16 only: float32 products stay cuBLAS's)
        self.gradient_filter_eps = gradient_filter_eps if low else None
        self.filters_gradient = self.gradient_filter_eps is not None

    @property
    def logits_element_size(self) -> int:
        return torch.empty((), dtype=self.logits_dtype).element_size()

    @property
    def grad_input_dtype(self) -> torch.dtype:
        # bounded memory at long T: an fp32 copy of dX would cost 2x the input's bytes
        return self.dtype

    def logits(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.logits_dtype == x2d.dtype:
            return x2d @ self.weight.t()
        return torch.mm(x2d, self.weight.t(), out_dtype=self.logits_dtype)

    def statistics(self, logits, target):
        return triton_logit_statistics(logits, target, self.ignore_index, self.bias, self.softcap)

    def gradient_(self, logits, lse, target, coef):
        return triton_logit_gradient_(logits, lse, target, coef, self.dtype, self.bias, self.softcap)

    def kept_blocks(self, grad_logits, coef):
        if not self.filters_gradient:
            return None
        # a host read per chunk (opt-in mode): past this fraction the block-sparse products are slower than cuBLAS
        # (H200: about half its speed when every block is kept), so they run dense, and exact
        return triton_block_sparse.kept_blocks(grad_logits, coef, self.gradient_filter_eps,
                                               dense_above=triton_block_sparse.DENSE_ABOVE_KEPT_FRACTION)

    def input_grad(self, grad_logits, blocks=None):
        if blocks is not None:
            return triton_block_sparse.block_sparse_input_grad(grad_logits, self.weight, blocks)
        return grad_logits @ self.weight

    def accumulate_weight_grad(self, acc, grad_logits, x2d, n_products, acc_scale=1.0, product_scale=1.0,
                               blocks=None):
        if blocks is not None:
            assert product_scale == 1.0, "the deferred-scale runs are contracted dense"
            single = n_products == 1 or self.weight_grad_in_input_dtype
            return triton_block_sparse.block_sparse_weight_grad_(acc, grad_logits, x2d, blocks,
                                                                 self.dtype if single else self.acc_dtype, acc_scale)
        if acc is not None:
            accumulate_weight_grad_(acc, grad_logits, x2d, acc_scale, product_scale)
            return acc
        if n_products == 1 or grad_logits.dtype == self.acc_dtype or self.weight_grad_in_input_dtype:
            # the only product: cuBLAS accumulates in float32 and rounds once, straight to the input dtype
            # (float32 inputs: this already is the float32 accumulator; weight_grad_in_input_dtype: the running
            # sum, which each later product's GEMM reads and rounds again, in the input dtype)
            return grad_logits.t() @ x2d
        # first of several: writes the float32 accumulator (no zero-fill pass, no read of it)
        return matmul_accumulation_dtype(grad_logits.t(), x2d)

    def finish_weight_grad(self, grad_weight):
        # round once, here, and free the float32 accumulator before backward allocates anything
        return grad_weight.to(self.dtype)
