"""Block-sparse gradient products of the opt-in gradient filter (CUDA fast path only; never the default).

A chunk's ``dL/dlogits`` is ``G = coef[:, None] * (softmax - onehot)`` (times the softcap's derivative
``1 - tanh**2`` with a softcap, which the filter's test ``|G| / |coef|`` then includes). With a peaked softmax most
of it is tiny: the filter drops every ``(block_rows x block_cols)`` block of ``G`` in which ``|softmax - onehot| < eps``
everywhere (as Cut Cross-Entropy's ``filter_eps`` does), and contracts only the blocks kept. Replaces::

    keep = block_max(|G| / |coef[:, None]|) >= eps                   # (row blocks, column blocks), bool
    G_kept = G * keep.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)   # (N, V)
    grad_input = G_kept @ weight                                     # (N, H)
    acc = acc_scale * acc + G_kept.T @ x                             # (V, H); untouched where no block is kept

Rows with ``coef == 0`` (ignored tokens) count as 0, so keep no block when ``eps > 0`` (``eps = 0`` keeps every
block). The work of both products scales with the blocks kept.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

#: rows and vocabulary columns per filter block (also the products' tile sizes along those dimensions)
BLOCK_ROWS = 128
BLOCK_COLS = 128
#: hidden columns per product tile (H200, 4096 tokens, V 128256: 256 beat 128 by 20-35 % in both products)
BLOCK_HIDDEN = 256
#: a chunk whose kept blocks exceed this fraction runs its products dense (cuBLAS, exact): the block-sparse products
#: with every block kept take about twice cuBLAS's time (H200, H 2048 and 4096)
DENSE_ABOVE_KEPT_FRACTION = 0.4


@triton.jit
def _block_keep_kernel(grad_ptr, stride_grad, coef_ptr, keep_ptr, n_rows, n_cols, n_col_blocks, eps,
                       BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    row_block, col_block = tl.program_id(0), tl.program_id(1)
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    coef = tl.load(coef_ptr + rows, mask=rows < n_rows, other=0.0)
    # |softmax - onehot| = |G| / |coef|; a row of coef 0 contributes nothing, whatever its G
    inv_coef = tl.where(coef != 0.0, 1.0 / tl.abs(coef), 0.0)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    grad = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * stride_grad + cols[None, :], mask=mask, other=0.0)
    largest = tl.max(tl.max(tl.abs(grad.to(tl.float32)) * inv_coef[:, None], axis=1), axis=0)
    tl.store(keep_ptr + row_block * n_col_blocks + col_block, (largest >= eps).to(tl.int8))


@triton.jit
def _input_grad_kernel(grad_ptr, stride_grad, weight_ptr, stride_weight, out_ptr, stride_out, order_ptr, count_ptr,
                       n_rows, n_cols, n_hidden, n_col_blocks,
                       BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_HIDDEN: tl.constexpr):
    """``out[rows, hidden] = sum over the row block's kept column blocks of G[rows, cols] @ W[cols, hidden]``."""
    row_block, hidden_block = tl.program_id(0), tl.program_id(1)
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    hidden = hidden_block * BLOCK_HIDDEN + tl.arange(0, BLOCK_HIDDEN)
    row_mask, hidden_mask = rows < n_rows, hidden < n_hidden
    acc = tl.zeros((BLOCK_ROWS, BLOCK_HIDDEN), dtype=tl.float32)
    n_kept = tl.load(count_ptr + row_block)
    for k in range(0, n_kept):
        col_block = tl.load(order_ptr + row_block * n_col_blocks + k)
        cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_mask = cols < n_cols
        grad = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * stride_grad + cols[None, :],
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        weight = tl.load(weight_ptr + cols.to(tl.int64)[:, None] * stride_weight + hidden[None, :],
                         mask=col_mask[:, None] & hidden_mask[None, :], other=0.0)
        acc = tl.dot(grad, weight, acc)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + hidden[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & hidden_mask[None, :])


@triton.jit
def _weight_grad_kernel(grad_ptr, stride_grad, x_ptr, stride_x, acc_ptr, stride_acc, order_ptr, count_ptr,
                        n_rows, n_cols, n_hidden, n_row_blocks, acc_scale,
                        ACCUMULATE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                        BLOCK_HIDDEN: tl.constexpr):
    """``acc[cols, hidden] = acc_scale * acc + sum over the column block's kept row blocks of G.T @ X``; without
    ``ACCUMULATE`` (the call's first product) every tile is written, the untouched ones with zeros."""
    col_block, hidden_block = tl.program_id(0), tl.program_id(1)
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    hidden = hidden_block * BLOCK_HIDDEN + tl.arange(0, BLOCK_HIDDEN)
    col_mask, hidden_mask = cols < n_cols, hidden < n_hidden
    n_kept = tl.load(count_ptr + col_block)
    if ACCUMULATE and n_kept == 0 and acc_scale == 1.0:
        return
    acc = tl.zeros((BLOCK_COLS, BLOCK_HIDDEN), dtype=tl.float32)
    for k in range(0, n_kept):
        row_block = tl.load(order_ptr + col_block * n_row_blocks + k)
        rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        grad_t = tl.load(grad_ptr + rows.to(tl.int64)[None, :] * stride_grad + cols[:, None],
                         mask=col_mask[:, None] & row_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + hidden[None, :],
                    mask=row_mask[:, None] & hidden_mask[None, :], other=0.0)
        acc = tl.dot(grad_t, x, acc)
    out = acc_ptr + cols.to(tl.int64)[:, None] * stride_acc + hidden[None, :]
    out_mask = col_mask[:, None] & hidden_mask[None, :]
    if ACCUMULATE:
        acc += acc_scale * tl.load(out, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(acc_ptr.dtype.element_ty), mask=out_mask)


class KeptBlocks(NamedTuple):
    """Which blocks of a chunk's ``G`` the filter keeps, as the two products walk them (no host read)."""

    keep: torch.Tensor  # (row blocks, column blocks) bool
    cols_of_row_block: torch.Tensor  # (row blocks, column blocks) int32: kept column blocks first, in order
    n_cols_of_row_block: torch.Tensor  # (row blocks,) int32
    rows_of_col_block: torch.Tensor  # (column blocks, row blocks) int32: kept row blocks first, in order
    n_rows_of_col_block: torch.Tensor  # (column blocks,) int32
    block_rows: int
    block_cols: int


def kept_blocks(grad_logits: torch.Tensor, coef: torch.Tensor, eps: float, block_rows: int = BLOCK_ROWS,
                block_cols: int = BLOCK_COLS, dense_above: Optional[float] = None) -> Optional[KeptBlocks]:
    """The blocks of ``grad_logits`` (N, V) where ``|grad| / |coef| >= eps`` somewhere (``coef`` (N,), the rows'
    factors; a row of 0 counts as 0: with ``eps = 0`` every block is kept). With ``dense_above``, None when more
    than that fraction of the blocks is kept (the products should then run dense): a host read of the count,
    before the lists are sorted."""
    n_rows, n_cols = grad_logits.shape
    assert grad_logits.stride(1) == 1, "gradient rows must be contiguous"
    n_row_blocks, n_col_blocks = triton.cdiv(n_rows, block_rows), triton.cdiv(n_cols, block_cols)
    keep = torch.empty((n_row_blocks, n_col_blocks), dtype=torch.int8, device=grad_logits.device)
    if keep.numel():
        _block_keep_kernel[(n_row_blocks, n_col_blocks)](
            grad_logits, grad_logits.stride(0), coef.to(torch.float32).contiguous(), keep, n_rows, n_cols,
            n_col_blocks, float(eps), BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=4)
    keep = keep.bool()
    if dense_above is not None and int(keep.sum()) > dense_above * keep.numel():
        return None

    def kept_first(mask: torch.Tensor):
        # a stable sort of "dropped" puts each row's kept indices first, in increasing order, without a host read
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
        return order.contiguous(), mask.sum(dim=1, dtype=torch.int32)

    return KeptBlocks(keep, *kept_first(keep), *kept_first(keep.t()), block_rows, block_cols)


def unit_column_stride(operand: torch.Tensor) -> torch.Tensor:
    """``operand`` itself, or a contiguous copy where its rows are strided (a transposed weight, e.g. a tied one, or
    transposed hidden states): the products' kernels step along a row by one element."""
    return operand if operand.stride(1) == 1 else operand.contiguous()


def block_sparse_input_grad(grad_logits: torch.Tensor, weight: torch.Tensor, blocks: KeptBlocks,
                            out_dtype: Optional[torch.dtype] = None, block_hidden: int = BLOCK_HIDDEN,
                            num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """``G_kept @ weight``, (N, H) in ``out_dtype`` (default the gradient's); ``weight`` of any strides."""
    n_rows, n_cols = grad_logits.shape
    weight = unit_column_stride(weight)
    n_hidden = weight.shape[1]
    out = torch.empty((n_rows, n_hidden), dtype=out_dtype or grad_logits.dtype, device=grad_logits.device)
    n_row_blocks, n_col_blocks = blocks.keep.shape
    if out.numel():
        _input_grad_kernel[(n_row_blocks, triton.cdiv(n_hidden, block_hidden))](
            grad_logits, grad_logits.stride(0), weight, weight.stride(0), out, out.stride(0),
            blocks.cols_of_row_block, blocks.n_cols_of_row_block, n_rows, n_cols, n_hidden, n_col_blocks,
            BLOCK_ROWS=blocks.block_rows, BLOCK_COLS=blocks.block_cols, BLOCK_HIDDEN=block_hidden,
            num_warps=num_warps, num_stages=num_stages)
    return out


def block_sparse_weight_grad_(acc: Optional[torch.Tensor], grad_logits: torch.Tensor, x: torch.Tensor,
                              blocks: KeptBlocks, acc_dtype: torch.dtype, acc_scale: float = 1.0,
                              block_hidden: int = BLOCK_HIDDEN, num_warps: int = 8,
                              num_stages: int = 3) -> torch.Tensor:
    """``acc = acc_scale * acc + G_kept.T @ x`` (``acc`` None: a new (V, H) tensor of ``acc_dtype`` holding the
    product alone); returns ``acc`` (unit column stride when given); ``x`` of any strides."""
    n_rows, n_cols = grad_logits.shape
    x = unit_column_stride(x)
    assert acc is None or acc.stride(1) == 1, "the accumulator's rows must be contiguous"
    n_hidden = x.shape[1]
    accumulate = acc is not None
    if acc is None:
        acc = torch.empty((n_cols, n_hidden), dtype=acc_dtype, device=grad_logits.device)
    n_row_blocks, n_col_blocks = blocks.keep.shape
    if acc.numel():
        _weight_grad_kernel[(n_col_blocks, triton.cdiv(n_hidden, block_hidden))](
            grad_logits, grad_logits.stride(0), x, x.stride(0), acc, acc.stride(0), blocks.rows_of_col_block,
            blocks.n_rows_of_col_block, n_rows, n_cols, n_hidden, n_row_blocks, float(acc_scale),
            ACCUMULATE=accumulate, BLOCK_ROWS=blocks.block_rows, BLOCK_COLS=blocks.block_cols,
            BLOCK_HIDDEN=block_hidden, num_warps=num_warps, num_stages=num_stages)
    return acc
