"""Reference SimPO written straight from the math (arXiv 2405.14734; TRL CPOTrainer, loss_type="simpo"), with the
full logits materialised.

``compute_dtype=torch.float64`` gives the truth; ``compute_dtype=None`` runs every op in the inputs' own dtype,
which is "plain PyTorch" (what TRL's CPOTrainer computes from a model's logits) for the three-way checks.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def reference_simpo(
    _input,
    weight,
    target,
    bias=None,
    ignore_index=-100,
    beta=0.1,
    alpha=1.0,
    label_smoothing=0.0,
    compute_nll_loss=False,
    gamma=0.5,
    softcap: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = torch.float64,
):
    """Return ``(loss, aux_outputs)``, aux in the order of ``simpo_loss.AUX_OUTPUT_NAMES``, differentiable w.r.t.
    the inputs."""
    cast = (lambda t: t.to(compute_dtype)) if compute_dtype is not None else (lambda t: t)
    logits = cast(_input) @ cast(weight).T
    if bias is not None:
        logits = logits + cast(bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    n_pairs = _input.shape[0] // 2
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    token_logp = logits.log_softmax(-1).gather(-1, safe_target.unsqueeze(-1)).squeeze(-1) * valid
    counts = valid.sum(-1)
    row_logp = token_logp.sum(-1) / counts.clamp(min=1)
    chosen, rejected = row_logp[:n_pairs], row_logp[n_pairs:]
    z = beta * (chosen - rejected) - gamma
    pair_losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    # a pair with a row that has no tokens has no log-prob: it contributes nothing (the mean still divides by B)
    pair_ok = (counts[:n_pairs] > 0) & (counts[n_pairs:] > 0)
    loss = (pair_losses * pair_ok).sum() / n_pairs
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
