"""Where each pass's ``dL/dlogits`` goes: the input, weight and bias gradients, scaled at once or later."""
from typing import List, Optional

import torch

from agent_code.liger_kernel.chunked_loss.chunk_plan import Piece, scatter_pieces_
from agent_code.liger_kernel.chunked_loss.host_sync import HostCopy
from agent_code.liger_kernel.chunked_loss.logit_ops import matmul_accumulation_dtype


class GradientSink:
    """Contracts each pass's ``dL/dlogits`` into the input, weight and bias gradients."""

    def __init__(self, ops, _input, vocab, n_products, needs_input_grad, needs_weight_grad, needs_bias_grad,
                 acc_dtype):
        device = _input.device
        # no zero fill: the plan covers every token exactly once, so every row of dX is written by one pass
        self.grad_input = torch.empty(_input.shape, dtype=ops.grad_input_dtype, device=device) \
            if needs_input_grad else None
        self.grad_weight = None  # created by the first product (no zero-fill pass over (V, H))
        self.grad_bias = torch.zeros(vocab, dtype=acc_dtype, device=device) if needs_bias_grad else None
        self.needs_weight_grad = needs_weight_grad
        self.ops, self.n_products = ops, n_products

    def add(self, pieces: List[Piece], grad_logits, x_pass, weight_acc_scale: Optional[HostCopy] = None) -> None:
        """dX of the pass's tokens, ``dW = s * dW + Gᵀ·X`` (``s`` read from the host copy ``weight_acc_scale``,
        else 1), db."""
        if self.grad_input is not None:
            scatter_pieces_(self.grad_input, pieces, self.ops.input_grad(grad_logits))
        if self.needs_weight_grad:
            acc_scale = 1.0 if weight_acc_scale is None else float(weight_acc_scale.get()[0])
            self.grad_weight = self.ops.accumulate_weight_grad(self.grad_weight, grad_logits, x_pass,
                                                               self.n_products, acc_scale)
        if self.grad_bias is not None:
            self.grad_bias += grad_logits.sum(dim=0, dtype=self.grad_bias.dtype)

    def results(self):
        grad_weight = self.grad_weight
        if grad_weight is not None:
            grad_weight = self.ops.finish_weight_grad(grad_weight)
        elif self.needs_weight_grad:  # no product at all (T = 0)
            grad_weight = torch.zeros_like(self.ops.weight)
        return self.grad_input, grad_weight, self.grad_bias


class DeferredChosenScale:
    """Single-pair token mode with the chosen row's gradient computed before its coefficient ``c`` is known.

    The chosen row's ``dL/dlogits`` is ``c * valid * (softmax - onehot)`` with one scalar ``c`` for the row, so
    its runs are contracted unscaled, in the pass that also computes their statistics, and ``c`` is applied
    afterwards: dX is kept in float32 and rounded once after scaling (for bf16/fp16 inputs in the bytes of
    both rows of dX, which the rejected row fills only later), ``db`` is scaled on the device, and the float32
    weight accumulator, which holds only this pair's chosen products, is scaled by the first rejected
    product (accumulator scale ``c``, read on the host while the device runs that product's logits GEMM). Only the
    rejected row's logits are computed twice: ``3R`` logits GEMMs for ``R`` runs per row instead of ``4R - 1``.
    """

    def __init__(self, sink: GradientSink, seq_len: int, acc_dtype: torch.dtype):
        self.sink = sink
        grad_input = sink.grad_input
        self.dx = None
        if grad_input is not None:  # (T, H) in the accumulation dtype; one pair: rows 0 and 1 are contiguous
            self.in_place = grad_input.dtype == acc_dtype
            self.dx = grad_input[0] if self.in_place else grad_input.view(-1).view(acc_dtype).view(seq_len, -1)
        self.bias_sum = torch.zeros_like(sink.grad_bias) if sink.grad_bias is not None else None

    def add(self, pieces: List[Piece], grad_logits, x_pass) -> None:
        """Contract one run of the chosen row's unscaled gradient."""
        ops = self.sink.ops
        if self.dx is not None:
            (piece,) = pieces
            self.dx[piece.tokens].copy_(matmul_accumulation_dtype(grad_logits, ops.weight))
        if self.sink.needs_weight_grad:
            self.sink.grad_weight = ops.accumulate_weight_grad(self.sink.grad_weight, grad_logits, x_pass,
                                                               self.sink.n_products)
        if self.bias_sum is not None:
            self.bias_sum += grad_logits.sum(dim=0, dtype=self.bias_sum.dtype)

    def finish(self, coef: torch.Tensor, defer_host: bool) -> Optional[HostCopy]:
        """Scale dX and db by the chosen row's coefficient; returns its host copy for the weight (or None)."""
        grad_input = self.sink.grad_input
        if self.dx is not None:
            if self.in_place:
                self.dx.mul_(coef)
            else:  # round once; the product goes through a temporary as it overlaps its source
                scaled = torch.empty_like(grad_input[0])
                torch.mul(self.dx, coef, out=scaled)
                grad_input[0].copy_(scaled)
        if self.bias_sum is not None:
            self.sink.grad_bias += self.bias_sum * coef
        return HostCopy(coef.view(1), defer_host) if self.sink.needs_weight_grad else None
