"""The losses of TRL's ``CPOTrainer`` (sigmoid, hinge, ipo, simpo; AlphaPO rewards), fused with the LM head.

Each is a small subclass of :class:`LigerFusedLinearPreferenceBase` that writes only its pair loss and says
whether a row's log-prob is the sum over its tokens or their mean, as TRL does
(``average_log_prob = loss_type in ["ipo", "simpo"]``). With ``d = r(logp_chosen) - r(logp_rejected)``, where
``r`` is the identity or, for ``alphapo_alpha != 0``, AlphaPO's ``r(l) = (1 - exp(l) ** -alpha) / alpha``::

    sigmoid: -(1 - ls) * logsigmoid(beta * d) - ls * logsigmoid(-beta * d)        summed log-probs
    hinge:   relu(1 - beta * d)                                                  summed log-probs
    ipo:     (d - 1 / (2 * beta)) ** 2                                           mean log-probs
    simpo:   sigmoid's formula with d - gamma / beta in place of d                 mean log-probs

    loss = mean over pairs + alpha * nll(chosen rows)      (the alpha term if compute_nll_loss)

The rewards reported are ``beta * r(logp)``. The arithmetic follows TRL's ``CPOTrainer.cpo_loss`` operation
by operation, so the results agree with it to rounding. For ``simpo`` without AlphaPO
:class:`~agent_code.liger_kernel.chunked_loss.simpo_loss.LigerFusedLinearSimPOFunction` is the same objective
(its ``gamma`` is the same absolute margin) with a closed-form gradient.
"""
from typing import Dict, Type

import torch

from agent_code.liger_kernel.chunked_loss.fused_linear_preference import (
    FusedLossParams,
    LigerFusedLinearPreferenceBase,
    fused_forward,
)
from agent_code.liger_kernel.chunked_loss.input_checks import check_real
from agent_code.liger_kernel.chunked_loss.pair_loss import smoothed_sigmoid_loss
from agent_code.liger_kernel.chunked_loss.simpo_loss import (
    LigerFusedLinearSimPOFunction,
    LigerFusedLinearSimPOLoss,
    check_simpo_hyperparameters,
)


def cpo_rewards(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, alphapo_alpha: float):
    """The rewards TRL's CPO losses compare (before ``beta``): the log-probs, or AlphaPO's transform of them."""
    if alphapo_alpha == 0.0:
        return chosen_logps, rejected_logps
    # written as TRL writes it (exp, then pow), so that both round alike
    return tuple((1 - torch.exp(logps).pow(-alphapo_alpha)) / alphapo_alpha
                 for logps in (chosen_logps, rejected_logps))


class _LigerFusedLinearCPOBase(LigerFusedLinearSimPOFunction):
    """The SimPO Function's forward with another pair loss; subclasses set the loss and the log-prob reduction.

    ``uses_label_smoothing`` / ``uses_gamma``: whether the pair loss reads that hyperparameter; a non-zero value
    for one it ignores is refused, so a setting never silently does nothing.
    """

    loss_type: str = ""
    uses_label_smoothing = False
    uses_gamma = False
    preference_loss_and_grad = None  # SimPO's closed-form gradient: these losses go through autograd

    @staticmethod
    def pair_losses(d: torch.Tensor, beta: float, label_smoothing: float, gamma: float) -> torch.Tensor:
        """Per-pair loss of the reward differences ``d = r(chosen) - r(rejected)``."""
        raise NotImplementedError("each CPO loss defines its pair loss")

    @classmethod
    def preference_loss_fn(cls, chosen_logps, rejected_logps, full_target, beta=0.1, label_smoothing=0.0, gamma=0.0,
                           alphapo_alpha=0.0):
        """The pairs' losses summed over the number of pairs in the whole batch (chunks add up to the mean),
        and the rewards ``beta * r(logp)``."""
        chosen, rejected = cpo_rewards(chosen_logps, rejected_logps, alphapo_alpha)
        losses = cls.pair_losses(chosen - rejected, beta, label_smoothing, gamma)
        return losses.sum() / (full_target.shape[0] // 2), beta * chosen, beta * rejected

    @classmethod
    def params(cls, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=False,
               compiled=True, gamma=0.5, chunk_size=1, softcap=None, output_dtype=None,
               alphapo_alpha=0.0) -> FusedLossParams:
        """:meth:`forward`'s options (after ``bias``, in its order, with its defaults) as one checked object."""
        check_simpo_hyperparameters(beta, gamma, label_smoothing)
        cls.check_cpo_hyperparameters(label_smoothing, gamma, alphapo_alpha)
        loss_kwargs = dict(beta=beta, label_smoothing=label_smoothing, gamma=gamma, alphapo_alpha=alphapo_alpha)
        return LigerFusedLinearPreferenceBase.params.__func__(cls, ignore_index, alpha, compute_nll_loss, compiled,
                                                              chunk_size, softcap, loss_kwargs, None, output_dtype)

    @classmethod
    def forward(cls, ctx, _input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0,
                label_smoothing=0.0, compute_nll_loss=False, compiled=True, gamma=0.5, chunk_size=1, softcap=None,
                output_dtype=None, alphapo_alpha=0.0):
        """Fused ``x @ W.T + b`` and the CPO loss of ``cls.loss_type``; returns ``(loss, aux_outputs)``.

        The SimPO Function's arguments, in its order and with its defaults (so pass ``gamma=0`` to a loss
        without a margin), then one more: ``alphapo_alpha`` (TRL's ``alpha``, default 0). ``alpha`` is the
        weight of the NLL term (TRL's ``cpo_alpha``).
        """
        params = cls.params(ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, gamma,
                            chunk_size, softcap, output_dtype, alphapo_alpha)
        return fused_forward(ctx, _input, weight, target, bias, params)

    @classmethod
    def pair_gradients_opposite(cls, loss_kwargs) -> bool:
        return loss_kwargs["alphapo_alpha"] == 0.0  # AlphaPO's reward transform is not a difference of log-probs

    @classmethod
    def check_cpo_hyperparameters(cls, label_smoothing, gamma, alphapo_alpha) -> None:
        """Beyond the SimPO checks: a finite ``alphapo_alpha``, and no non-zero value for a hyperparameter
        this loss does not read."""
        check_real("alphapo_alpha", alphapo_alpha)
        if label_smoothing and not cls.uses_label_smoothing:
            raise ValueError(f"label_smoothing must be 0 for loss_type {cls.loss_type!r} (it has no label "
                             f"smoothing), got {label_smoothing!r}")
        if gamma and not cls.uses_gamma:
            raise ValueError(f"gamma (the SimPO margin) must be 0 for loss_type {cls.loss_type!r}, got {gamma!r}")


class LigerFusedLinearCPOSigmoidFunction(_LigerFusedLinearCPOBase):
    """CPO's sigmoid loss (TRL's default ``loss_type``) on summed log-probs."""

    loss_type = "sigmoid"
    average_log_prob = False
    uses_label_smoothing = True

    @staticmethod
    def pair_losses(d, beta, label_smoothing, gamma):
        return smoothed_sigmoid_loss(beta * d, label_smoothing)


class LigerFusedLinearCPOHingeFunction(_LigerFusedLinearCPOBase):
    """SLiC's hinge loss ``relu(1 - beta * d)`` on summed log-probs."""

    loss_type = "hinge"
    average_log_prob = False

    @staticmethod
    def pair_losses(d, beta, label_smoothing, gamma):
        return torch.relu(1 - beta * d)


class LigerFusedLinearCPOIPOFunction(_LigerFusedLinearCPOBase):
    """IPO's squared loss ``(d - 1 / (2 * beta)) ** 2`` on length-normalised log-probs."""

    loss_type = "ipo"
    average_log_prob = True

    @staticmethod
    def pair_losses(d, beta, label_smoothing, gamma):
        return (d - 1 / (2 * beta)) ** 2


class LigerFusedLinearCPOSimPOFunction(_LigerFusedLinearCPOBase):
    """SimPO as TRL's CPOTrainer writes it (margin ``gamma`` subtracted as ``gamma / beta`` before scaling by
    ``beta``), on length-normalised log-probs, with optional AlphaPO rewards."""

    loss_type = "simpo"
    average_log_prob = True
    uses_label_smoothing = True
    uses_gamma = True

    @staticmethod
    def pair_losses(d, beta, label_smoothing, gamma):
        return smoothed_sigmoid_loss(beta * (d - gamma / beta), label_smoothing)


#: ``loss_type`` -> Function, for every loss of TRL's CPOTrainer.
CPO_FUNCTIONS: Dict[str, Type[_LigerFusedLinearCPOBase]] = {
    function.loss_type: function
    for function in (LigerFusedLinearCPOSigmoidFunction, LigerFusedLinearCPOHingeFunction,
                     LigerFusedLinearCPOIPOFunction, LigerFusedLinearCPOSimPOFunction)
}


def cpo_function(loss_type: str) -> Type[_LigerFusedLinearCPOBase]:
    """The Function of ``loss_type``; ``ValueError`` naming the supported ones otherwise."""
    try:
        return CPO_FUNCTIONS[loss_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"loss_type must be one of {sorted(CPO_FUNCTIONS)} for the fused CPO loss, got {loss_type!r}"
        ) from None


class LigerFusedLinearCPOLoss(LigerFusedLinearSimPOLoss):
    """``nn.Module`` of the CPO losses: ``loss_fn(lm_head.weight, hidden_states, target, lm_head.bias)``.

    ``loss_type`` picks the pair loss (see the module docstring); ``alpha`` weighs the NLL term of the chosen
    rows (TRL's ``cpo_alpha``), ``gamma`` is the SimPO margin (TRL's ``simpo_gamma``), ``alphapo_alpha`` TRL's
    ``alpha``. Returns ``(loss, aux_outputs)`` like :class:`LigerFusedLinearSimPOLoss`.
    """

    def __init__(self, loss_type="sigmoid", ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0,
                 compute_nll_loss=True, compiled=True, gamma=0.0, chunk_size=1, alphapo_alpha=0.0):
        function = cpo_function(loss_type)
        super().__init__(ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, gamma, chunk_size)
        function.check_cpo_hyperparameters(label_smoothing, gamma, alphapo_alpha)
        self.function = function
        self.loss_type = loss_type
        self.alphapo_alpha = alphapo_alpha

    def extra_function_args(self) -> tuple:
        return (self.alphapo_alpha,)

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, alphapo_alpha={self.alphapo_alpha}, {super().extra_repr()}"


__all__ = [
    "CPO_FUNCTIONS",
    "LigerFusedLinearCPOHingeFunction",
    "LigerFusedLinearCPOIPOFunction",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearCPOSigmoidFunction",
    "LigerFusedLinearCPOSimPOFunction",
    "cpo_function",
    "cpo_rewards",
]
