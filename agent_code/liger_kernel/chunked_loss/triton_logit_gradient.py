"""Triton kernel: turn a chunk of logits into ``dL/dlogits`` in one read and one write, in place.

Replaces (``z`` as in :mod:`triton_logit_statistics`: raw logits + bias, then softcap)::

    grad = coef[:, None] * (softmax(z) - onehot(target)) * (1 - (z / s) ** 2 if softcap else 1)
    grad = grad.to(grad_dtype)

``coef`` must already be 0 on ignored tokens. When ``grad_dtype`` is narrower than the logits (fp32 logits,
bf16 gradient) the gradient of row n is written over the first half of row n's own bytes: one program owns a
row and walks it left to right, so every byte it overwrites has already been read (block j's output lands in
the bytes of blocks <= j). The result is then a strided view of the logits buffer and no second buffer exists.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from agent_code.liger_kernel.chunked_loss.triton_logit_statistics import (
    load_row_block,
    program_row,
    row_kernel_options,
)

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
