"""The pair loss a call's chunks evaluate, and the smoothed sigmoid loss shared by SimPO, CPO's sigmoid/simpo
losses and the plain reference."""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair ``-(1 - label_smoothing) * log sigmoid(z) - label_smoothing * log sigmoid(-z)``.

    ``z`` is the scaled reward margin of each pair (SimPO: ``beta * (logp_chosen - logp_rejected) - gamma``);
    ``label_smoothing`` is the assumed probability that a pair's preference label is flipped (cDPO).
    """
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@dataclass(frozen=True, eq=False)
class PairLoss:
    """A preference loss with its hyperparameters: what the chunk loop calls on each chunk's row log-probs.

    Built by ``LigerFusedLinearPreferenceBase.pair_loss`` from a Function's ``preference_loss_fn`` (and its
    optional closed form ``preference_loss_and_grad``) and the call's arguments.
    """

    loss_fn: Callable  # preference_loss_fn(chosen_logps, rejected_logps, full_target, **loss_kwargs, **pair_kwargs)
    loss_and_grad: Optional[Callable]  # same arguments; (loss, d/d chosen, d/d rejected, rewards...); None: autograd
    loss_kwargs: Dict[str, Any]  # hyperparameters, as they are
    pair_kwargs: Dict[str, torch.Tensor]  # per-pair tensors of leading size B, sliced to each chunk's pairs
    #: True: a row's log-prob is the mean over its non-ignored tokens (SimPO); False: the sum (DPO)
    average_log_prob: bool
    #: ``d loss / d chosen_logps == -d loss / d rejected_logps`` for these hyperparameters (a loss of
    #: ``chosen - rejected`` alone): single-pair token mode then computes no logits twice
    gradients_opposite: bool

    def __call__(self, logps: torch.Tensor, start: int, end: int, pairs_with_tokens: torch.Tensor,
                 full_target: torch.Tensor, needs_grad: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """The loss of pairs ``[start, end)`` from their row log-probs ``logps`` (chosen rows, then rejected);
        returns the loss, ``d loss / d logps`` and the rewards.

        A pair with a row whose tokens are all ignored has no defined log-prob: it adds zero loss and
        zero gradient (its rewards are still reported, from log-prob 0), the mean still divides by B.
        ``pairs_with_tokens`` (these pairs') is a host tensor, so the chunk loop never waits for the device.
        """
        pairs = end - start
        pair_kwargs = {k: v[start:end] for k, v in self.pair_kwargs.items()}
        all_have_tokens = bool(pairs_with_tokens.all())
        if needs_grad and all_have_tokens and self.loss_and_grad is not None:
            loss, d_chosen, d_rejected, chosen_rewards, rejected_rewards = self.loss_and_grad(
                logps[:pairs], logps[pairs:], full_target, **self.loss_kwargs, **pair_kwargs
            )
            return loss, torch.cat((d_chosen, d_rejected)), (chosen_rewards, rejected_rewards)
        with torch.enable_grad():
            leaf = logps.detach().requires_grad_(needs_grad)
            chosen, rejected = leaf[:pairs], leaf[pairs:]
            loss, chosen_rewards, rejected_rewards = self.loss_fn(
                chosen, rejected, full_target, **self.loss_kwargs, **pair_kwargs
            )
            if not all_have_tokens:
                loss = torch.zeros_like(loss)
                if bool(pairs_with_tokens.any()):
                    index = pairs_with_tokens.nonzero().squeeze(1).to(logps.device)
                    their_kwargs = {k: v[index] for k, v in pair_kwargs.items()}
                    loss = self.loss_fn(chosen[index], rejected[index], full_target, **self.loss_kwargs,
                                        **their_kwargs)[0]
            if needs_grad and loss.requires_grad:
                (d_logps,) = torch.autograd.grad(loss, leaf)
            else:
                d_logps = torch.zeros_like(leaf)
        rewards = (chosen_rewards.detach(), rejected_rewards.detach())
        return loss.detach(), d_logps, rewards
