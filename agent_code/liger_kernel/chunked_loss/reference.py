"""SimPO from materialised logits, in plain PyTorch: the computation the fused loss replaces.

Written straight from the math (arXiv 2405.14734; TRL's ``CPOTrainer(loss_type="simpo")``), independent of the
chunked implementation, so it serves as the readable statement of the objective, as the truth in the tests
(float64), as "plain PyTorch" in a given dtype (the three-way checks, the benchmarks' naive baseline) and as the
``--no-patch`` path of the trainer. It builds the whole ``(2B, T, V)`` logits tensor: use it on small inputs.
"""
from typing import Optional, Tuple

import torch

from agent_code.liger_kernel.chunked_loss.pair_loss import smoothed_sigmoid_loss


def simpo_from_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    compute_nll_loss: bool = False,
    gamma: float = 0.5,
    softmax_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """``(loss, aux_outputs)`` of ``logits`` ``(2B, T, V)`` against the aligned ``target`` ``(2B, T)``.

    Rows ``[0, B)`` are the chosen answers, ``[B, 2B)`` the rejected ones; ``logits[:, t]`` predicts
    ``target[:, t]`` (no shift here). The log-softmax runs in ``softmax_dtype`` (default: the logits' own dtype);
    the logits means average every position, ignored ones included. A pair with a row holding no token adds zero
    loss (its log-prob would be 0/0); the mean still divides by B. ``aux_outputs`` are detached, in the order
    ``chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
    rejected_rewards``; the loss stays differentiable with respect to ``logits``.
    """
    if softmax_dtype is not None:
        logits = logits.to(softmax_dtype)
    n_pairs = logits.shape[0] // 2
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    token_logp = logits.log_softmax(-1).gather(-1, safe_target.unsqueeze(-1)).squeeze(-1) * valid
    counts = valid.sum(-1)
    row_logp = token_logp.sum(-1) / counts.clamp(min=1)
    chosen, rejected = row_logp[:n_pairs], row_logp[n_pairs:]
    pair_losses = smoothed_sigmoid_loss(beta * (chosen - rejected) - gamma, label_smoothing)
    pair_has_tokens = (counts[:n_pairs] > 0) & (counts[n_pairs:] > 0)
    loss = torch.where(pair_has_tokens, pair_losses, torch.zeros_like(pair_losses)).sum() / n_pairs
    nll = -token_logp[:n_pairs].sum() / counts[:n_pairs].sum().clamp(min=1)
    if compute_nll_loss:
        loss = loss + alpha * nll
    aux = (
        chosen,
        rejected,
        logits[:n_pairs].mean(),
        logits[n_pairs:].mean(),
        nll if compute_nll_loss else torch.zeros_like(nll),
        beta * chosen,
        beta * rejected,
    )
    return loss, tuple(a.detach() for a in aux)


def reference_simpo(
    _input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = torch.float64,
    **simpo_options,
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The fused loss's inputs, computed with the whole logits: ``simpo_from_logits(x @ W.T + b, target)``.

    ``simpo_options`` are :func:`simpo_from_logits`'s (``ignore_index``, ``beta``, ``alpha``,
    ``label_smoothing``, ``compute_nll_loss``, ``gamma``), with its defaults. ``compute_dtype=torch.float64``
    (default) gives the truth; ``None`` runs every op in the inputs' own dtype ("plain PyTorch", what TRL
    computes from a bf16 model's logits). ``softcap`` applies Gemma-2/3's ``softcap * tanh(logits / softcap)``.
    Differentiable with respect to the inputs.
    """
    cast = (lambda t: t.to(compute_dtype)) if compute_dtype is not None else (lambda t: t)
    logits = cast(_input) @ cast(weight).T
    if bias is not None:
        logits = logits + cast(bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return simpo_from_logits(logits, target, **simpo_options)
