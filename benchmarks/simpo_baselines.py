"""What benchmarks/bench_simpo.py measures ours against: the honest GEMM floor and SimPO on Cut Cross-Entropy.

* :class:`FloorGemms` -- the three GEMMs of one fwd+bwd of a linear head, ``logits = X·Wᵀ``, ``dX = G·W``,
  ``dW = Gᵀ·X`` (two with a frozen weight), bf16 in and out, all tokens at once. ``G`` is the REAL gradient of
  the logits (:func:`logits_gradient`), prepared untimed from the same ``X`` before each timed call: a GEMM's
  speed depends on its operands' values (the card's power draw, hence its clock), so a floor fed ``randn`` as
  ``G`` is not the floor of a loss whose gradient is mostly tiny values.
* :func:`cce_simpo` -- SimPO written on Apple's Cut Cross-Entropy the way a user would: per-token losses from
  ``linear_cross_entropy(x, w, y, reduction="none")`` (its own fused kernels, no logits in memory), then the
  length-normalised log-probs, the SimPO pair loss and the chosen NLL in plain PyTorch.

``cut_cross_entropy`` is an optional benchmark dependency (pip ``cut-cross-entropy``), never a library one:
:func:`load_linear_cross_entropy` returns None without it. Nothing here imports the library's internals.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

#: ``filter_eps`` of CCE's two variants: its default skips the backward blocks whose softmax gradient is below
#: bf16's eps / 32 everywhere (not exact); None computes every block (exact)
CCE_FILTERED, CCE_EXACT = "high", None


def logits_gradient(x2d: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                    softcap: Optional[float] = None, out: Optional[torch.Tensor] = None,
                    max_chunk_elements: int = 1 << 28) -> torch.Tensor:
    """The gradient of ``F.cross_entropy(cap(x2d @ weight.T), target, ignore_index)`` (mean over the counted
    tokens) with respect to the raw logits ``x2d @ weight.T``, in ``x2d``'s dtype.

    That is ``(softmax(cap(z)) - onehot(target)) / N``, times ``cap'(z) = 1 - tanh²(z / softcap)`` with a softcap
    (``cap(z) = softcap * tanh(z / softcap)``); ``N`` counts the targets != ``ignore_index``, whose rows are
    zero. Computed in float32 (float64 for float64 inputs) ``max_chunk_elements`` logits at a time (bounded
    scratch memory), written into ``out`` ``(tokens, V)`` if given.
    """
    tokens, vocab = x2d.shape[0], weight.shape[0]
    target = target.reshape(-1)
    if target.numel() != tokens:
        raise ValueError(f"logits_gradient: {target.numel()} targets for {tokens} rows of x2d")
    if out is None:
        out = x2d.new_empty(tokens, vocab)
    compute_dtype = torch.promote_types(x2d.dtype, torch.float32)
    valid = target != ignore_index
    count = valid.sum().clamp(min=1).to(compute_dtype)
    rows = max(1, max_chunk_elements // vocab)
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        z = torch.mm(x2d[start:stop], weight.t()).to(compute_dtype)
        capped = z if softcap is None else softcap * torch.tanh(z / softcap)
        grad = capped.softmax(-1)
        chunk_target, chunk_valid = target[start:stop], valid[start:stop]
        safe_target = torch.where(chunk_valid, chunk_target, torch.zeros_like(chunk_target)).unsqueeze(1)
        grad.scatter_add_(1, safe_target, -torch.ones_like(safe_target, dtype=grad.dtype))
        grad.mul_(chunk_valid.unsqueeze(1)).div_(count)
        if softcap is not None:
            grad.mul_(1 - (capped / softcap).square())
        out[start:stop] = grad
    return out


class FloorGemms:
    """The floor's GEMMs at one row's shape; buffers allocated once (``tokens × V`` twice: logits and G).

    ``prepare(x, target)`` (untimed) writes the real logits gradient of ``x`` into ``G``; calling the object
    then runs exactly the timed GEMMs on ``x``: ``X·Wᵀ``, ``G·W`` and, unless the weight is frozen, ``Gᵀ·X``.
    """

    def __init__(self, weight: torch.Tensor, tokens: int, frozen_weight: bool, ignore_index: int = -100,
                 softcap: Optional[float] = None):
        self.weight = weight.detach()
        vocab, hidden = self.weight.shape
        self.ignore_index, self.softcap = ignore_index, softcap
        self.logits = self.weight.new_empty(tokens, vocab)
        self.grad = self.weight.new_empty(tokens, vocab)
        self.grad_input = self.weight.new_empty(tokens, hidden)
        self.grad_weight = None if frozen_weight else torch.empty_like(self.weight)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().reshape(-1, self.weight.shape[1])

    def prepare(self, x: torch.Tensor, target: torch.Tensor) -> None:
        logits_gradient(self._rows(x), self.weight, target, self.ignore_index, self.softcap, out=self.grad)

    def __call__(self, x: torch.Tensor) -> None:
        x2d = self._rows(x)
        torch.mm(x2d, self.weight.t(), out=self.logits)
        torch.mm(self.grad, self.weight, out=self.grad_input)
        if self.grad_weight is not None:
            torch.mm(self.grad.t(), x2d, out=self.grad_weight)


def load_linear_cross_entropy() -> Tuple[Optional[Callable], str]:
    """``(cut_cross_entropy.linear_cross_entropy, its version)``, or ``(None, why not)`` where not importable."""
    try:
        import cut_cross_entropy
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as error:  # pragma: no cover - depends on the environment
        return None, f"not importable ({error})"
    return linear_cross_entropy, getattr(cut_cross_entropy, "__version__", "unknown")


def cce_simpo(linear_cross_entropy: Callable, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
              beta: float = 0.1, gamma: float = 0.5, label_smoothing: float = 0.0, alpha: float = 1.0,
              compute_nll_loss: bool = True, ignore_index: int = -100, softcap: Optional[float] = None,
              filter_eps=CCE_FILTERED) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """SimPO of ``x`` ``(2B, T, H)`` (chosen rows first) on CCE's per-token losses: ``(loss, (chosen_logps,
    rejected_logps, nll))``, the objective of ``LigerFusedLinearSimPOFunction`` with the same options.

    ``linear_cross_entropy(x, weight, target, reduction="none")`` gives each token's ``-log p(target)`` (0 at
    ignored ones; ``target`` aligned with ``x``, no shift). A pair with a row holding no token adds zero loss;
    the mean divides by B. CCE yields no logits, so no logits means (the library's other aux outputs).
    """
    token_nll = linear_cross_entropy(x, weight, target, ignore_index=ignore_index, softcap=softcap,
                                     reduction="none", filter_eps=filter_eps)
    if token_nll.requires_grad:
        # CCE's backward views the gradient it receives; without the NLL term that gradient is a row sum's
        # broadcast (stride 0 along T), which cannot be viewed ("view size is not compatible"): give it a copy
        token_nll.register_hook(lambda grad: grad.contiguous())
    n_pairs = x.shape[0] // 2
    counts = (target != ignore_index).sum(-1)
    row_logps = -token_nll.sum(-1) / counts.clamp(min=1)
    chosen, rejected = row_logps[:n_pairs], row_logps[n_pairs:]
    margin = beta * (chosen - rejected) - gamma
    pair_losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    has_tokens = (counts[:n_pairs] > 0) & (counts[n_pairs:] > 0)
    loss = torch.where(has_tokens, pair_losses, torch.zeros_like(pair_losses)).sum() / n_pairs
    nll = token_nll[:n_pairs].sum() / counts[:n_pairs].sum().clamp(min=1)
    if compute_nll_loss:
        loss = loss + alpha * nll
    return loss, (chosen.detach(), rejected.detach(), nll.detach())
