"""Where each pass's ``dL/dlogits`` goes: the input, weight and bias gradients, scaled at once or later."""
from typing import Optional, Tuple

import torch

from agent_code.liger_kernel.chunked_loss.chunk_plan import Piece
from agent_code.liger_kernel.chunked_loss.host_sync import HostCopy
from agent_code.liger_kernel.chunked_loss.logit_ops import matmul_accumulation_dtype


class GradientSink:
    """Contracts each pass's ``dL/dlogits`` into the input, weight and bias gradients."""

    def __init__(self, ops, _input: torch.Tensor, n_products: int, needs: Tuple[bool, bool, bool]):
        """``needs``: whether the input, weight and bias gradients are needed; ``n_products``: how many passes
        the call's plan has (one weight product each)."""
        needs_input_grad, needs_weight_grad, needs_bias_grad = needs
        device = _input.device
        # no zero fill: the plan covers every token exactly once, so every row of dX is written by one pass
        self.grad_input = torch.empty(_input.shape, dtype=ops.grad_input_dtype, device=device) \
            if needs_input_grad else None
        self.grad_weight = None  # created by the first product (no zero-fill pass over (V, H))
        self.grad_bias = torch.zeros(ops.weight.shape[0], dtype=ops.acc_dtype, device=device) \
            if needs_bias_grad else None
        self.needs_weight_grad = needs_weight_grad
        self.ops, self.n_products = ops, n_products

    def add(self, piece, grad_logits, x_pass, weight_acc_scale: Optional[HostCopy] = None) -> None:
        """dX of the pass's tokens, ``dW = s * dW + Gᵀ·X`` (``s`` read from the host copy ``weight_acc_scale``,
        else 1), db."""
        if self.grad_input is not None:
            piece.scatter_(self.grad_input, self.ops.input_grad(grad_logits))
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


class DeferredScale:
    """Single-pair token mode: rows' gradients contracted before their scale is known.

    A row's ``dL/dlogits`` is ``c * u * valid * (softmax - onehot)`` with one unknown scalar ``c`` and a known
    per-row factor ``u``, so each run is contracted in the pass that also computes its statistics and ``c`` is
    applied afterwards. dX stays in float32 until it is scaled and rounded once (bf16/fp16 inputs: the first
    row's in the bytes of both rows of dX, the second row's in a buffer of its own, its last run in the
    product itself); ``db`` is scaled on the device.

    ``both_rows=False`` (the chosen row alone, when its coefficient is not tied to the rejected row's, e.g. with
    the NLL term): the float32 weight accumulator, which then holds only the chosen products, is scaled by
    the first rejected product (accumulator scale ``c``, read on the host while the device runs that
    product's logits GEMM); only the rejected row's logits are computed twice (``3R - 1`` logits GEMMs for
    ``R`` runs per row). ``both_rows=True`` (the pair loss's gradients are opposite, no NLL term: the rows'
    coefficients are ``c / n_chosen`` and ``-c / n_rejected``): both rows are contracted with the known factors
    ``1`` and ``-n_chosen / n_rejected``; their scale ``c / n_chosen`` is known once the last run's statistics
    are, before its gradient, so its weight product scales the accumulator and itself by it (the GEMM's beta
    and alpha): ``2R`` logits GEMMs, as many as the plain computation, and no extra pass over the weight
    gradient.
    """

    def __init__(self, sink: GradientSink, seq_len: int, both_rows: bool, last_run_start: int = 0):
        """``last_run_start``: the first token of the rejected row's last run (``both_rows`` only)."""
        self.sink, self.both_rows, self.last_run_start = sink, both_rows, last_run_start
        acc_dtype = sink.ops.acc_dtype
        grad_input = sink.grad_input
        self.dx_rows, self.dx_last = None, None
        if grad_input is not None:  # (T, H) each in the accumulation dtype; one pair: rows 0 and 1 are contiguous
            self.in_place = grad_input.dtype == acc_dtype
            if self.in_place:
                self.dx_rows = (grad_input[0], grad_input[1])
            else:
                chosen = grad_input.view(-1).view(acc_dtype).view(seq_len, -1)
                rejected = torch.empty((last_run_start, grad_input.shape[-1]), dtype=acc_dtype,
                                       device=grad_input.device) if both_rows else None
                self.dx_rows = (chosen, rejected)
        self.bias_sum = torch.zeros_like(sink.grad_bias) if sink.grad_bias is not None else None

    def add(self, piece: Piece, grad_logits, x_pass, scale: Optional[HostCopy] = None) -> None:
        """Contract one run's unscaled gradient; ``scale`` (the host copy of the rows' scale, ``both_rows``' last
        run only) scales the weight accumulator and this run's product."""
        ops = self.sink.ops
        if self.dx_rows is not None:
            row = piece.rows[0].start  # one pair: 0 chosen, 1 rejected
            if row == 1 and not self.in_place and piece.tokens.start >= self.last_run_start:
                self.dx_last = matmul_accumulation_dtype(grad_logits, ops.weight)  # no buffer holds the last run
            else:
                matmul_accumulation_dtype(grad_logits, ops.weight, out=self.dx_rows[row][piece.tokens])
        if self.sink.needs_weight_grad:
            c = 1.0 if scale is None else float(scale.get()[0])
            self.sink.grad_weight = ops.accumulate_weight_grad(self.sink.grad_weight, grad_logits, x_pass,
                                                               self.sink.n_products, acc_scale=c, product_scale=c)
        if self.bias_sum is not None:
            self.bias_sum += grad_logits.sum(dim=0, dtype=self.bias_sum.dtype)

    def host_scale(self, coef: torch.Tensor) -> Optional[HostCopy]:
        """The host copy of ``coef`` for the weight accumulator's product (None when the weight is frozen)."""
        return HostCopy(coef.view(1), self.sink.ops.host_reads_async) if self.sink.needs_weight_grad else None

    def finish(self, coef: torch.Tensor) -> None:
        """Scale dX and db of every run added by ``coef`` (with ``both_rows``, after the last run: its logits are
        freed by then, so the chosen row's rounding temporary adds nothing to the peak)."""
        grad_input = self.sink.grad_input
        if self.dx_rows is not None:
            chosen, rejected = self.dx_rows
            if self.in_place:
                (grad_input if self.both_rows else grad_input[0]).mul_(coef)
            else:  # scaled in float32, rounded once; the chosen row through a temporary, as it overlaps its source
                grad_input[0].copy_(chosen.mul_(coef).to(grad_input.dtype))
                if self.both_rows:
                    grad_input[1][: self.last_run_start].copy_(rejected.mul_(coef))
                    grad_input[1][self.last_run_start :].copy_(self.dx_last.mul_(coef))
            self.dx_rows = self.dx_last = None
        if self.bias_sum is not None:
            self.sink.grad_bias += self.bias_sum * coef
