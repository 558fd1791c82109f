"""SimPO (arXiv 2405.14734) fused with the LM head: loss fn, autograd Function and nn.Module.

Same objective as TRL's ``CPOTrainer(loss_type="simpo")``::

    z_i    = beta * (logp_chosen_i - logp_rejected_i) - gamma        # logp: length-normalised
    loss_i = -(1 - label_smoothing) * logsigmoid(z_i) - label_smoothing * logsigmoid(-z_i)
    loss   = mean_i(loss_i) + alpha * nll(chosen)                    # alpha term if compute_nll_loss
"""
from typing import Optional

import torch
import torch.nn.functional as F

from agent_code.liger_kernel.chunked_loss.fused_linear_preference import (
    FusedLossParams,
    LigerFusedLinearPreferenceBase,
    fused_forward,
)
from agent_code.liger_kernel.chunked_loss.input_checks import check_loss_options, check_real
from agent_code.liger_kernel.chunked_loss.pair_loss import smoothed_sigmoid_loss

#: Names of the aux outputs, in the order every entry point returns them.
AUX_OUTPUT_NAMES = (
    "chosen_logps",
    "rejected_logps",
    "chosen_logits_mean",
    "rejected_logits_mean",
    "nll_loss",
    "chosen_rewards",
    "rejected_rewards",
)


def check_simpo_hyperparameters(beta, gamma, label_smoothing) -> None:
    """beta > 0 (a reward scale: beta <= 0 would train towards the rejected answers), gamma real, label_smoothing
    in [0, 1]; ``TypeError``/``ValueError`` naming the first that is not."""
    check_real("beta", beta, 0.0, strict=True)
    check_real("gamma", gamma)
    check_real("label_smoothing", label_smoothing, 0.0)
    if label_smoothing > 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")


def validate_simpo_options(ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=False,
                           compiled=True, gamma=0.5, chunk_size=1) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first SimPO option that is of the wrong type or out of range:
    :func:`check_simpo_hyperparameters`, then ``input_checks.check_loss_options``."""
    check_simpo_hyperparameters(beta, gamma, label_smoothing)
    check_loss_options(ignore_index, alpha, compute_nll_loss, compiled, chunk_size)


class LigerFusedLinearSimPOFunction(LigerFusedLinearPreferenceBase):
    @staticmethod
    def preference_loss_fn(chosen_logps, rejected_logps, full_target, beta=0.1, gamma=0.5, label_smoothing=0.0):
        """SimPO loss of the given pairs, summed and divided by the number of pairs in the whole batch.

        Returns ``(loss, beta * chosen_logps, beta * rejected_logps)``.
        """
        n_pairs_total = full_target.shape[0] // 2
        losses = smoothed_sigmoid_loss(beta * (chosen_logps - rejected_logps) - gamma, label_smoothing)
        return losses.sum() / n_pairs_total, beta * chosen_logps, beta * rejected_logps

    @staticmethod
    def preference_loss_and_grad(chosen_logps, rejected_logps, full_target, beta=0.1, gamma=0.5,
                                 label_smoothing=0.0):
        """:meth:`preference_loss_fn` and its gradient in closed form (the base's fast path, no autograd).

        With ``z = beta * (chosen - rejected) - gamma`` and ``s = sigmoid(z)``:
        ``d loss_i / d z_i = (1 - ls) * (s - 1) + ls * s = s - (1 - ls)``, so
        ``d loss / d chosen_i = beta * (s_i - (1 - ls)) / B = -d loss / d rejected_i``.
        """
        n_pairs_total = full_target.shape[0] // 2
        z = (chosen_logps - rejected_logps).mul_(beta).sub_(gamma)
        # in place, and the smoothing term only when it counts: fewer launches than smoothed_sigmoid_loss
        losses = F.logsigmoid(z).mul_(-(1.0 - label_smoothing))
        if label_smoothing:
            losses.sub_(F.logsigmoid(-z).mul_(label_smoothing))
        d_chosen = torch.sigmoid(z).sub_(1.0 - label_smoothing).mul_(beta / n_pairs_total)
        return (losses.sum() / n_pairs_total, d_chosen, -d_chosen, beta * chosen_logps, beta * rejected_logps)

    @classmethod
    def pair_gradients_opposite(cls, loss_kwargs) -> bool:
        return True  # a function of chosen - rejected

    @classmethod
    def params(cls, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=False,
               compiled=True, gamma=0.5, chunk_size=1, softcap=None, output_dtype=None) -> FusedLossParams:
        """:meth:`forward`'s options (after ``bias``, in its order, with its defaults) as one checked object."""
        check_simpo_hyperparameters(beta, gamma, label_smoothing)
        return super().params(ignore_index, alpha, compute_nll_loss, compiled, chunk_size, softcap,
                              dict(beta=beta, gamma=gamma, label_smoothing=label_smoothing), None, output_dtype)

    @classmethod
    def forward(
        cls,
        ctx,
        _input,
        weight,
        target,
        bias=None,
        ignore_index=-100,
        beta=0.1,
        alpha=1.0,
        label_smoothing=0.0,
        compute_nll_loss=False,
        compiled=True,
        gamma=0.5,
        chunk_size=1,
        softcap: Optional[float] = None,
        output_dtype: Optional[torch.dtype] = None,
    ):
        """Fused ``x @ W.T + b`` and SimPO loss. Returns ``(loss, aux_outputs)`` (see :data:`AUX_OUTPUT_NAMES`).

        Two trailing arguments beyond the fixed twelve, both default None: ``softcap`` applies Gemma-2/3's
        ``softcap * tanh(logits / softcap)`` to the logits inside the fused loss; ``output_dtype`` is the dtype
        of the loss and aux outputs (default: the input dtype; the patched models pass float32).
        A packed batch goes through ``LigerFusedLinearSimPOFunction.apply_packed`` (see the base's).
        """
        params = cls.params(ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, gamma,
                            chunk_size, softcap, output_dtype)
        return fused_forward(ctx, _input, weight, target, bias, params)

    # backward: the base's (grads for _input, weight, target (None), bias; None for every further argument)


class LigerFusedLinearSimPOLoss(torch.nn.Module):
    """``nn.Module`` wrapper: ``loss_fn(lm_head.weight, hidden_states, target, lm_head.bias)``."""

    def __init__(
        self,
        ignore_index=-100,
        beta=0.1,
        alpha=1.0,
        label_smoothing=0.0,
        compute_nll_loss=True,
        compiled=True,
        gamma=0.5,
        chunk_size=1,
    ):
        super().__init__()
        validate_simpo_options(ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, gamma,
                               chunk_size)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.gamma = gamma
        self.chunk_size = chunk_size

    #: the autograd Function applied (a subclass may pick another that takes the same arguments)
    function = LigerFusedLinearSimPOFunction

    def forward(self, lin_weight, _input, target, bias=None, softcap: Optional[float] = None,
                output_dtype: Optional[torch.dtype] = None, sequence_offsets=None):
        """``sequence_offsets`` (2B + 1 ints; default None): ``_input`` ``(1, N, H)`` and ``target`` ``(1, N)`` are a
        packed batch, sequence ``s`` at ``[offsets[s], offsets[s + 1])`` (see
        ``LigerFusedLinearPreferenceBase.apply_packed``)."""
        options = (self.ignore_index, self.beta, self.alpha, self.label_smoothing, self.compute_nll_loss,
                   self.compiled, self.gamma, self.chunk_size, softcap, output_dtype, *self.extra_function_args())
        if sequence_offsets is None:
            return self.function.apply(_input, lin_weight, target, bias, *options)
        return self.function.apply_packed(_input, lin_weight, target, sequence_offsets, bias, *options)

    def extra_function_args(self) -> tuple:
        """What :attr:`function` takes after the SimPO Function's arguments (nothing for SimPO)."""
        return ()

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, alpha={self.alpha}, label_smoothing={self.label_smoothing}, "
            f"compute_nll_loss={self.compute_nll_loss}, ignore_index={self.ignore_index}, "
            f"chunk_size={self.chunk_size}, compiled={self.compiled}"
        )
