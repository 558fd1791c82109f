"""Turn a chunk of logits into the loss gradient with respect to those logits, in place.

Eager PyTorch reference (and CPU path). A fused GPU kernel with the same contract may replace it.
"""
from typing import Optional

import torch


def logit_gradient_(
    logits: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    coef: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Overwrite ``logits`` (N, V) with ``dL/dlogits``.

    For a loss whose dependence on token n is ``-coef[n] * log_softmax(logits[n])[target[n]]`` this is
    ``coef[n] * (softmax(logits[n]) - onehot(target[n]))``; ``coef`` must already be 0 on ignored tokens.
    With ``softcap`` the stored logits are the capped ones ``c = s * tanh(raw / s)`` and the result is
    chained through ``dc/draw = 1 - (c / s) ** 2``, giving the gradient w.r.t. the raw (pre-cap) logits.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    if softcap is not None:
        cap_derivative = 1.0 - (logits / softcap) ** 2
    logits.sub_(lse.unsqueeze(-1)).exp_()
    # onehot: subtract 1 at the target column of valid rows only
    logits.scatter_add_(-1, safe_target.unsqueeze(-1), -valid.to(logits.dtype).unsqueeze(-1))
    logits.mul_(coef.unsqueeze(-1))
    if softcap is not None:
        logits.mul_(cap_derivative)
    return logits
