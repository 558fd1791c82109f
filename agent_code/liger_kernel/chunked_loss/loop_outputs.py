"""What one call's chunk loop adds up, chunk by chunk: the loss and aux outputs (:class:`LossTotals`) and the input,
weight and bias gradients (:class:`GradientSink`, into which each pass's ``dL/dlogits`` is contracted)."""
from typing import Optional, Tuple

import torch

from agent_code.liger_kernel.chunked_loss.host_sync import HostCopy


class LossTotals:
    """The loss and aux outputs, accumulated chunk by chunk on the device."""

    def __init__(self, n_pairs: int, acc_dtype: torch.dtype, device: torch.device):
        self.loss = torch.zeros((), dtype=acc_dtype, device=device)
        self.nll = torch.zeros((), dtype=acc_dtype, device=device)
        self.logit_sums = torch.zeros(2, dtype=acc_dtype, device=device)  # chosen, rejected
        self.row_logps = torch.zeros(2 * n_pairs, dtype=acc_dtype, device=device)
        self.chosen_rewards = torch.zeros(n_pairs, dtype=acc_dtype, device=device)
        self.rejected_rewards = torch.zeros(n_pairs, dtype=acc_dtype, device=device)

    def outputs(self, positions, compute_nll_loss: bool, out_dtype: torch.dtype):
        """``(loss, aux_outputs)`` in ``out_dtype``; ``positions`` (B * T * V) is the count behind each logits
        mean, or a pair of counts (chosen, rejected) (T = 0: a mean over no logits is 0, like an empty row's
        log-prob)."""
        n_pairs = self.chosen_rewards.shape[0]
        chosen_positions, rejected_positions = positions if isinstance(positions, tuple) else (positions, positions)
        aux_outputs = (
            self.row_logps[:n_pairs].to(out_dtype),
            self.row_logps[n_pairs:].to(out_dtype),
            (self.logit_sums[0] / max(chosen_positions, 1)).to(out_dtype),
            (self.logit_sums[1] / max(rejected_positions, 1)).to(out_dtype),
            (self.nll if compute_nll_loss else torch.zeros_like(self.nll)).to(out_dtype),
            self.chosen_rewards.to(out_dtype),
            self.rejected_rewards.to(out_dtype),
        )
        return self.loss.to(out_dtype), aux_outputs


class GradientSink:
    """Contracts each pass's ``dL/dlogits`` into the input, weight and bias gradients."""

    def __init__(self, ops, _input: torch.Tensor, n_products: int, needs: Tuple[bool, bool, bool]):
        """``needs``: whether the input, weight and bias gradients are needed; ``n_products``: how many passes
        the call's plan has (one weight product each)."""
        needs_input_grad, needs_weight_grad, needs_bias_grad = needs
        device = _input.device
        # no zero fill: the plan covers every token exactly once, so every row of dX is written by one pass
        self.grad_input = (torch.empty(_input.shape, dtype=ops.grad_input_dtype, device=device)
                           if needs_input_grad else None)
        self.grad_weight = None  # created by the first product (no zero-fill pass over (V, H))
        self.grad_bias = (torch.zeros(ops.weight.shape[0], dtype=ops.acc_dtype, device=device)
                          if needs_bias_grad else None)
        self.needs_weight_grad = needs_weight_grad
        self.ops, self.n_products = ops, n_products

    def add(self, piece, grad_logits, x_pass, weight_acc_scale: Optional[HostCopy] = None,
            token_coef: Optional[torch.Tensor] = None) -> None:
        """dX of the pass's tokens, ``dW = s * dW + G.T @ X`` (``s`` read from the host copy ``weight_acc_scale``,
        else 1), db. ``token_coef`` (the pass's per-token factors of ``G``) lets the opt-in gradient filter
        (``ops.kept_blocks``) skip blocks of ``G`` in both products."""
        # only the two products skip blocks: a pass that needs just the bias gradient computes no keep mask
        filtered = token_coef is not None and (self.grad_input is not None or self.needs_weight_grad)
        blocks = self.ops.kept_blocks(grad_logits, token_coef) if filtered else None
        if self.grad_input is not None:
            piece.scatter_(self.grad_input, self.ops.input_grad(grad_logits, blocks))
        if self.needs_weight_grad:
            acc_scale = 1.0 if weight_acc_scale is None else float(weight_acc_scale.get()[0])
            self.grad_weight = self.ops.accumulate_weight_grad(self.grad_weight, grad_logits, x_pass,
                                                               self.n_products, acc_scale, blocks=blocks)
        if self.grad_bias is not None:
            self.grad_bias += grad_logits.sum(dim=0, dtype=self.grad_bias.dtype)

    def results(self):
        grad_weight = self.grad_weight
        if grad_weight is not None:
            grad_weight = self.ops.finish_weight_grad(grad_weight)
        elif self.needs_weight_grad:  # no product at all (T = 0)
            grad_weight = torch.zeros_like(self.ops.weight)
        return self.grad_input, grad_weight, self.grad_bias
