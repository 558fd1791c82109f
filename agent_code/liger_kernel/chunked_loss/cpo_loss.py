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
from typing import Dict, Optional, Type

import torch
import torch.nn.functional as F

from agent_code.liger_kernel.chunked_loss.fused_linear_preference import LigerFusedLinearPreferenceBase
from agent_code.liger_kernel.chunked_loss.input_checks import check_real
from agent_code.liger_kernel.chunked_loss.simpo_loss import validate_simpo_options



def cpo_rewards(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, alphapo_alpha: float):
    """The rewards TRL's CPO losses compare (before ``beta``): the log-probs, or AlphaPO's transform of them."""
    if alphapo_alpha == 0.0:
        return chosen_logps, rejected_logps
    # written as TRL writes it (exp, then pow), so that both round alike
    return tuple((1 - torch.exp(logps).pow(-alphapo_alpha)) / alphapo_alpha
                 for logps in (chosen_logps, rejected_logps))


def _pair_sum_loss(losses: torch.Tensor, full_target: torch.Tensor) -> torch.Tensor:
    """Sum of the given pairs' losses over the number of pairs in the whole batch (chunks add up to the mean)."""
    return losses.sum() / (full_target.shape[0] // 2)


def _smoothed_sigmoid_losses(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


class _LigerFusedLinearCPOBase(LigerFusedLinearPreferenceBase):
    """Shared forward/backward of the CPO losses; subclasses set the pair loss and the log-prob reduction.

    ``uses_label_smoothing`` / ``uses_gamma``: whether the pair loss reads that hyperparameter; a non-zero value
    for one it ignores is refused, so a setting never silently does nothing.
    """

    loss_type: str = ""
    uses_label_smoothing = False
    uses_gamma = False

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
        gamma=0.0,
        chunk_size=1,
        softcap: Optional[float] = None,
        output_dtype: Optional[torch.dtype] = None,
        alphapo_alpha: float = 0.0,
    ):
        """Fused ``x @ W.T + b`` and the CPO loss of ``cls.loss_type``; returns ``(loss, aux_outputs)``.

        Same arguments, order and outputs as the SimPO Function, plus ``alphapo_alpha`` (TRL's ``alpha``);
        ``alpha`` is the weight of the NLL term (TRL's ``cpo_alpha``).
        """
        validate_cpo_options(cls, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                             alphapo_alpha=alphapo_alpha, ignore_index=ignore_index, alpha=alpha,
                             compute_nll_loss=compute_nll_loss, compiled=compiled, chunk_size=chunk_size)
        return super().forward(
            ctx, _input, weight, target, bias,
            ignore_index=ignore_index, alpha=alpha, compute_nll_loss=compute_nll_loss, compiled=compiled,
            chunk_size=chunk_size, softcap=softcap, output_dtype=output_dtype,
            loss_kwargs=dict(beta=beta, label_smoothing=label_smoothing, gamma=gamma, alphapo_alpha=alphapo_alpha),
        )


class LigerFusedLinearCPOSigmoidFunction(_LigerFusedLinearCPOBase):
    """CPO's sigmoid loss (TRL's default ``loss_type``) on summed log-probs."""

    loss_type = "sigmoid"
    average_log_prob = False
    uses_label_smoothing = True

    @staticmethod
    def preference_loss_fn(chosen_logps, rejected_logps, full_target, beta=0.1, label_smoothing=0.0, gamma=0.0,
                           alphapo_alpha=0.0):
        chosen, rejected = cpo_rewards(chosen_logps, rejected_logps, alphapo_alpha)
        losses = _smoothed_sigmoid_losses(chosen - rejected, beta, label_smoothing)
        return _pair_sum_loss(losses, full_target), beta * chosen, beta * rejected


class LigerFusedLinearCPOHingeFunction(_LigerFusedLinearCPOBase):
    """SLiC's hinge loss ``relu(1 - beta * d)`` on summed log-probs."""

    loss_type = "hinge"
    average_log_prob = False

    @staticmethod
    def preference_loss_fn(chosen_logps, rejected_logps, full_target, beta=0.1, label_smoothing=0.0, gamma=0.0,
                           alphapo_alpha=0.0):
        chosen, rejected = cpo_rewards(chosen_logps, rejected_logps, alphapo_alpha)
        losses = torch.relu(1 - beta * (chosen - rejected))
        return _pair_sum_loss(losses, full_target), beta * chosen, beta * rejected


class LigerFusedLinearCPOIPOFunction(_LigerFusedLinearCPOBase):
    """IPO's squared loss ``(d - 1 / (2 * beta)) ** 2`` on length-normalised log-probs."""

    loss_type = "ipo"
    average_log_prob = True

    @staticmethod
    def preference_loss_fn(chosen_logps, rejected_logps, full_target, beta=0.1, label_smoothing=0.0, gamma=0.0,
                           alphapo_alpha=0.0):
        chosen, rejected = cpo_rewards(chosen_logps, rejected_logps, alphapo_alpha)
        losses = (chosen - rejected - 1 / (2 * beta)) ** 2
        return _pair_sum_loss(losses, full_target), beta * chosen, beta * rejected


class LigerFusedLinearCPOSimPOFunction(_LigerFusedLinearCPOBase):
    """SimPO as TRL's CPOTrainer writes it (margin ``gamma`` subtracted as ``gamma / beta`` before scaling by
    ``beta``), on length-normalised log-probs, with optional AlphaPO rewards."""

    loss_type = "simpo"
    average_log_prob = True
    uses_label_smoothing = True
    uses_gamma = True

    @staticmethod
    def preference_loss_fn(chosen_logps, rejected_logps, full_target, beta=0.1, label_smoothing=0.0, gamma=0.0,
                           alphapo_alpha=0.0):
        chosen, rejected = cpo_rewards(chosen_logps, rejected_logps, alphapo_alpha)
        losses = _smoothed_sigmoid_losses(chosen - rejected - gamma / beta, beta, label_smoothing)
        return _pair_sum_loss(losses, full_target), beta * chosen, beta * rejected


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


def validate_cpo_options(function: Type[_LigerFusedLinearCPOBase], *, beta, label_smoothing, gamma, alphapo_alpha,
                         **simpo_options) -> None:
    """Check the options of a CPO Function: the SimPO checks (beta > 0, alpha >= 0, label_smoothing in [0, 1],
    ...), a finite ``alphapo_alpha``, and no non-zero value for a hyperparameter the loss does not read."""
    validate_simpo_options(beta=beta, label_smoothing=label_smoothing, gamma=gamma, **simpo_options)
    check_real("alphapo_alpha", alphapo_alpha)
    if label_smoothing and not function.uses_label_smoothing:
        raise ValueError(f"label_smoothing must be 0 for loss_type {function.loss_type!r} (it has no label "
                         f"smoothing), got {label_smoothing!r}")
    if gamma and not function.uses_gamma:
        raise ValueError(f"gamma (the SimPO margin) must be 0 for loss_type {function.loss_type!r}, got {gamma!r}")


class LigerFusedLinearCPOLoss(torch.nn.Module):
    """``nn.Module`` of the CPO losses: ``loss_fn(lm_head.weight, hidden_states, target, lm_head.bias)``.

    ``loss_type`` picks the pair loss (see the module docstring); ``alpha`` weighs the NLL term of the chosen
    rows (TRL's ``cpo_alpha``), ``gamma`` is the SimPO margin (TRL's ``simpo_gamma``), ``alphapo_alpha`` TRL's
    ``alpha``. Returns ``(loss, aux_outputs)`` like :class:`LigerFusedLinearSimPOLoss`.
    """

    def __init__(self, loss_type="sigmoid", ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0,
                 compute_nll_loss=True, compiled=True, gamma=0.0, chunk_size=1, alphapo_alpha=0.0):
        super().__init__()
        self.function = cpo_function(loss_type)
        validate_cpo_options(self.function, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                             alphapo_alpha=alphapo_alpha, ignore_index=ignore_index, alpha=alpha,
                             compute_nll_loss=compute_nll_loss, compiled=compiled, chunk_size=chunk_size)
        self.loss_type = loss_type
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.gamma = gamma
        self.chunk_size = chunk_size
        self.alphapo_alpha = alphapo_alpha

    def forward(self, lin_weight, _input, target, bias=None, softcap: Optional[float] = None,
                output_dtype: Optional[torch.dtype] = None, sequence_offsets=None):
        """``sequence_offsets``: a packed batch, as in ``LigerFusedLinearSimPOLoss.forward``."""
        function = self.function if sequence_offsets is None else self.function.packed()
        return function.apply(
            _input, lin_weight, target, bias, self.ignore_index, self.beta, self.alpha, self.label_smoothing,
            self.compute_nll_loss, self.compiled, self.gamma, self.chunk_size, softcap, output_dtype,
            self.alphapo_alpha, *(() if sequence_offsets is None else (sequence_offsets,)),
        )

    def extra_repr(self) -> str:
        return (
            f"loss_type={self.loss_type!r}, beta={self.beta}, gamma={self.gamma}, alpha={self.alpha}, "
            f"label_smoothing={self.label_smoothing}, alphapo_alpha={self.alphapo_alpha}, "
            f"compute_nll_loss={self.compute_nll_loss}, ignore_index={self.ignore_index}, "
            f"chunk_size={self.chunk_size}, compiled={self.compiled}"
        )


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
