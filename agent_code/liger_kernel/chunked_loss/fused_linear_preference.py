"""Generic machinery: a linear layer fused with a pairwise preference loss, computed chunk by chunk.

Replaces, without ever materialising the ``(2B, T, V)`` logits::

    logits = _input @ weight.T + bias                                   # (2B, T, V)
    logp_tok = log_softmax(logits.float(), -1).gather(-1, target)       # ignored tokens masked out
    logp_row = logp_tok.sum(-1) / n_tokens      (or .sum(-1) when average_log_prob is False)
    loss = preference_loss_fn(logp_row[:B], logp_row[B:], target) + alpha * nll(chosen rows)

Per chunk of ``chunk_size`` pairs the chunk's logits are built once, reduced to per-token statistics,
turned in place into ``dL/dlogits`` and contracted into the input, weight and bias gradients. The
gradients are therefore produced in forward and only scaled by ``grad_output`` in backward.
See docs/design.md for the derivation.
"""
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from agent_code.liger_kernel.chunked_loss.logit_gradient import logit_gradient_
from agent_code.liger_kernel.chunked_loss.logit_statistics import apply_softcap_, logit_statistics
from agent_code.liger_kernel.utils import accumulation_dtype

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def validate_preference_inputs(
    _input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor],
    ignore_index: int,
    chunk_size: int,
    softcap: Optional[float],
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the offending argument; silent on valid input."""
    for name, value in (("_input", _input), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if _input.dim() != 3:
        raise ValueError(f"_input must be 3-D (2B, T, H), got shape {tuple(_input.shape)}")
    rows, seq_len, hidden = _input.shape
    if rows == 0 or rows % 2 != 0:
        raise ValueError(
            f"_input must hold an even, non-zero number of rows (B chosen then B rejected), got {rows} rows "
            f"(shape {tuple(_input.shape)})"
        )
    if not _input.is_floating_point():
        raise TypeError(f"_input must be floating point, got {_input.dtype}")
    if tuple(target.shape) != (rows, seq_len):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal _input.shape[:2] = {(rows, seq_len)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer token ids, got {target.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(
            f"weight must be (V, H) with H = _input.shape[-1] = {hidden}, got shape {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight has an empty vocabulary (shape (0, H))")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is None:
            continue
        if value.dtype != _input.dtype:
            raise TypeError(f"{name} dtype {value.dtype} must match _input dtype {_input.dtype}")
        if value.device != _input.device:
            raise ValueError(f"{name} is on {value.device} but _input is on {_input.device}")
    if target.device != _input.device:
        raise ValueError(f"target is on {target.device} but _input is on {_input.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (pairs per chunk), got {chunk_size!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or a positive float, got {softcap!r}")
    out_of_range = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(out_of_range.any()):
        position = tuple(int(i) for i in out_of_range.nonzero()[0])
        raise ValueError(
            f"target holds id {int(target[position])} at position {position}, outside [0, V={vocab}) and not "
            f"ignore_index={ignore_index}"
        )


def chunk_logits(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``(x2d @ weight.T + bias)`` as a fresh float32 (float64 for float64 inputs) tensor."""
    stat_dtype = accumulation_dtype(x2d.dtype)
    if x2d.dtype in _LOW_PRECISION and x2d.is_cuda:
        # cuBLAS accumulates in fp32 anyway; keeping its fp32 output avoids rounding logits to 8 bits.
        logits = torch.mm(x2d, weight.t(), out_dtype=torch.float32)
    else:
        logits = (x2d @ weight.t()).to(stat_dtype)
    if bias is not None:
        logits += bias.to(stat_dtype)
    return logits


def matmul_accumulation_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` returned in float32 (float64) without rounding through a low-precision output."""
    out_dtype = accumulation_dtype(a.dtype)
    if a.dtype in _LOW_PRECISION and a.is_cuda:
        return torch.mm(a, b, out_dtype=out_dtype)
    return (a @ b).to(out_dtype)


def accumulate_weight_grad_(acc: torch.Tensor, grad_logits: torch.Tensor, x2d: torch.Tensor) -> None:
    """``acc += grad_logits.T @ x2d`` with ``acc`` in float32 (float64) whatever the operand dtype."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), x2d)
    elif acc.is_cuda:
        torch.addmm(acc, grad_logits.t(), x2d, out_dtype=acc.dtype, out=acc)
    else:
        acc += (grad_logits.t() @ x2d).to(acc.dtype)


class LigerFusedLinearPreferenceBase(torch.autograd.Function):
    """Base of fused-linear preference losses.

    A subclass supplies ``preference_loss_fn(chosen_logps, rejected_logps, full_target, **hyperparams)``
    returning ``(loss, chosen_rewards, rejected_rewards)`` — the loss summed over the pairs given and
    divided by the number of pairs in the whole batch — and calls :meth:`forward` / :meth:`backward`.
    The gradient of ``preference_loss_fn`` is taken by autograd on the tiny per-pair tensors, so a new
    loss (DPO, CPO, ORPO, ...) needs no hand-written derivative.
    """

    #: True: a row's log-prob is the mean over its non-ignored tokens (SimPO); False: the sum (DPO).
    average_log_prob = True

    @staticmethod
    def preference_loss_fn(chosen_logps, rejected_logps, full_target, **hyperparams):
        raise NotImplementedError("subclasses define the preference loss")

    @classmethod
    def forward(
        cls,
        ctx,
        _input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        chunk_size: int = 1,
        softcap: Optional[float] = None,
        loss_kwargs: Optional[Dict[str, Any]] = None,
        pair_kwargs: Optional[Dict[str, torch.Tensor]] = None,
    ):
        """Loss and aux outputs (SPEC §7); input/weight/bias gradients are computed here and kept on ctx.

        ``loss_kwargs`` go to ``preference_loss_fn`` as they are; ``pair_kwargs`` are per-pair tensors of
        leading size B (e.g. reference log-probs) sliced to each chunk's pairs before being passed.
        """
        validate_preference_inputs(_input, weight, target, bias, ignore_index, chunk_size, softcap)
        loss_kwargs = dict(loss_kwargs or {})
        pair_kwargs = dict(pair_kwargs or {})
        needs_input_grad, needs_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_bias_grad = bias is not None and ctx.needs_input_grad[3]
        needs_any_grad = needs_input_grad or needs_weight_grad or needs_bias_grad

        rows, seq_len, hidden = _input.shape
        n_pairs = rows // 2
        vocab = weight.shape[0]
        device, dtype = _input.device, _input.dtype
        acc_dtype = accumulation_dtype(dtype)
        target = target.long()
        # CUDA: bf16/fp16 operands with float32 outputs (tensor cores). CPU: low-precision GEMMs are no faster
        # there and round their outputs, so operands go to float32 once and only the final results are rounded.
        gemm_dtype = acc_dtype if (dtype in _LOW_PRECISION and not _input.is_cuda) else dtype
        gemm_weight = weight.to(gemm_dtype)

        valid = target != ignore_index
        token_counts = valid.sum(dim=1)
        # NLL is normalised by the chosen tokens of the whole batch, never of the chunk.
        n_chosen_tokens = token_counts[:n_pairs].sum().clamp(min=1).to(acc_dtype)
        row_norm = token_counts.clamp(min=1).to(acc_dtype) if cls.average_log_prob else None

        loss_acc = torch.zeros((), dtype=acc_dtype, device=device)
        nll_acc = torch.zeros((), dtype=acc_dtype, device=device)
        logit_sums = torch.zeros(2, dtype=acc_dtype, device=device)  # chosen, rejected
        row_logps = torch.zeros(rows, dtype=acc_dtype, device=device)
        chosen_rewards = torch.zeros(n_pairs, dtype=acc_dtype, device=device)
        rejected_rewards = torch.zeros(n_pairs, dtype=acc_dtype, device=device)
        # dX stays in the accumulation dtype until backward scales it, so bf16 results are rounded once
        grad_input = torch.zeros(_input.shape, dtype=acc_dtype, device=device) if needs_input_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if needs_weight_grad else None
        grad_bias = torch.zeros(vocab, dtype=acc_dtype, device=device) if needs_bias_grad else None

        for start in range(0, n_pairs, chunk_size):
            end = min(start + chunk_size, n_pairs)
            pairs = end - start
            # chunk rows: chosen [start, end) then rejected [B + start, B + end)
            x_chunk = torch.cat((_input[start:end], _input[n_pairs + start : n_pairs + end])).reshape(-1, hidden)
            x_chunk = x_chunk.to(gemm_dtype)
            target_chunk = torch.cat((target[start:end], target[n_pairs + start : n_pairs + end])).reshape(-1)
            valid_chunk = (target_chunk != ignore_index).view(2 * pairs, seq_len)
            chunk_rows = torch.cat(
                (torch.arange(start, end, device=device), torch.arange(n_pairs + start, n_pairs + end, device=device))
            )

            logits = apply_softcap_(chunk_logits(x_chunk, gemm_weight, bias), softcap)
            lse, target_logit, logit_sum = logit_statistics(logits, target_chunk, ignore_index)
            token_logp = ((target_logit - lse).view(2 * pairs, seq_len)) * valid_chunk
            logp_sum = token_logp.sum(dim=1)
            logps = logp_sum / row_norm[chunk_rows] if row_norm is not None else logp_sum
            row_logps[chunk_rows] = logps
            logit_sums += logit_sum.view(2, -1).sum(dim=1)

            chunk_pair_kwargs = {k: v[start:end] for k, v in pair_kwargs.items()}
            pair_loss, d_logps, rewards = cls._pair_loss_and_grad(
                logps, pairs, valid_chunk, target, loss_kwargs, chunk_pair_kwargs, needs_any_grad
            )
            chosen_rewards[start:end], rejected_rewards[start:end] = rewards
            loss_acc += pair_loss
            nll_chunk = -logp_sum[:pairs].sum() / n_chosen_tokens
            if compute_nll_loss:
                loss_acc += alpha * nll_chunk
            nll_acc += nll_chunk

            if not needs_any_grad:
                continue
            # dL/dlogits[t] = coef[t] * (softmax - onehot); d logp_row / d logits[t] = -(softmax - onehot)/norm
            row_coef = -d_logps / row_norm[chunk_rows] if row_norm is not None else -d_logps
            if compute_nll_loss:
                row_coef[:pairs] += alpha / n_chosen_tokens
            coef = (row_coef.unsqueeze(1) * valid_chunk).reshape(-1)
            grad_logits = logit_gradient_(logits, lse, target_chunk, coef, ignore_index, softcap).to(gemm_dtype)
            if needs_input_grad:
                grad_x = matmul_accumulation_dtype(grad_logits, gemm_weight).view(2 * pairs, seq_len, hidden)
                grad_input[start:end] = grad_x[:pairs]
                grad_input[n_pairs + start : n_pairs + end] = grad_x[pairs:]
            if needs_weight_grad:
                accumulate_weight_grad_(grad_weight, grad_logits, x_chunk)
            if needs_bias_grad:
                grad_bias += grad_logits.sum(dim=0, dtype=acc_dtype)
            del logits, grad_logits

        ctx.save_for_backward(grad_input, grad_weight, grad_bias)
        ctx.grad_dtype = dtype
        positions = n_pairs * seq_len * vocab
        aux_outputs = (
            row_logps[:n_pairs].to(dtype),
            row_logps[n_pairs:].to(dtype),
            (logit_sums[0] / positions).to(dtype),
            (logit_sums[1] / positions).to(dtype),
            (nll_acc if compute_nll_loss else torch.zeros_like(nll_acc)).to(dtype),
            chosen_rewards.to(dtype),
            rejected_rewards.to(dtype),
        )
        return loss_acc.to(dtype), aux_outputs

    @classmethod
    def _pair_loss_and_grad(
        cls,
        logps: torch.Tensor,
        pairs: int,
        valid_chunk: torch.Tensor,
        full_target: torch.Tensor,
        loss_kwargs: Dict[str, Any],
        pair_kwargs: Dict[str, torch.Tensor],
        needs_grad: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Run ``preference_loss_fn`` on a chunk's pairs; return its loss, ``dloss/dlogps`` and rewards.

        A pair with a row whose tokens are all ignored has no defined log-prob: it adds zero loss and
        zero gradient (its rewards are still reported, from log-prob 0), the mean still divides by B.
        """
        has_tokens = valid_chunk.any(dim=1)
        pair_ok = has_tokens[:pairs] & has_tokens[pairs:]
        with torch.enable_grad():
            leaf = logps.detach().requires_grad_(needs_grad)
            chosen, rejected = leaf[:pairs], leaf[pairs:]
            loss, chosen_rewards, rejected_rewards = cls.preference_loss_fn(
                chosen, rejected, full_target, **loss_kwargs, **pair_kwargs
            )
            if not bool(pair_ok.all()):
                loss = torch.zeros_like(loss)
                if bool(pair_ok.any()):
                    kept = {k: v[pair_ok] for k, v in pair_kwargs.items()}
                    loss = cls.preference_loss_fn(
                        chosen[pair_ok], rejected[pair_ok], full_target, **loss_kwargs, **kept
                    )[0]
            if needs_grad and loss.requires_grad:
                (d_logps,) = torch.autograd.grad(loss, leaf)
            else:
                d_logps = torch.zeros_like(leaf)
        rewards = (chosen_rewards.detach(), rejected_rewards.detach())
        return loss.detach(), d_logps, rewards

    @staticmethod
    def backward(ctx, *grad_output):
        """Scale the gradients computed in forward by the upstream gradient of the loss.

        Returns ``(grad_input, grad_weight, None, grad_bias)``; subclasses append one None per extra argument.
        """
        grad_input, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output[0]
        dtype = ctx.grad_dtype

        def scaled(grad):
            if grad is None:
                return None
            return (grad * scale.to(grad.dtype)).to(dtype)

        return scaled(grad_input), scaled(grad_weight), None, scaled(grad_bias)
