"""Per-token statistics of a chunk of logits: the only things the loss needs from the forward pass.

Eager PyTorch reference (and CPU path). A fused GPU kernel with the same contract may replace it.
"""
from typing import Optional, Tuple

import torch


def apply_softcap_(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """In place ``logits = softcap * tanh(logits / softcap)`` (Gemma-2/3's final_logit_softcapping)."""
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def logit_statistics(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row statistics of ``logits`` (N, V) for targets ``target`` (N,).

    Returns float tensors of shape (N,):
      * ``lse``          = ``logits.logsumexp(-1)``
      * ``target_logit`` = ``logits.gather(-1, target)`` (0 where ``target == ignore_index``)
      * ``logit_sum``    = ``logits.sum(-1)``  (every row, ignored ones included: feeds the logits mean)
    so that ``log_softmax(logits)[n, target[n]] == target_logit[n] - lse[n]``.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(valid, target_logit, torch.zeros_like(target_logit))
    return lse, target_logit, logits.sum(dim=-1)
