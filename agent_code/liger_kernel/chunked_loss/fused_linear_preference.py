"""Generic machinery: a linear layer fused with a pairwise preference loss, computed chunk by chunk.

Replaces, without ever materialising the ``(2B, T, V)`` logits::

    logits = _input @ weight.T + bias                                   # (2B, T, V)
    logp_tok = log_softmax(logits.float(), -1).gather(-1, target)       # ignored tokens masked out
    logp_row = logp_tok.sum(-1) / n_tokens      (or .sum(-1) when average_log_prob is False)
    loss = preference_loss_fn(logp_row[:B], logp_row[B:], target) + alpha * nll(chosen rows)

Per chunk of ``chunk_size`` pairs the chunk's logits are built once, reduced to per-token statistics,
turned in place into ``dL/dlogits`` and contracted into the input, weight and bias gradients. The
gradients are therefore produced in forward and only scaled by ``grad_output`` in backward.
When one pair's logits exceed ``LOGITS_BUDGET_BYTES`` the pair is processed in token runs (statistics
first, then recomputed logits and gradients). The per-chunk logit work is delegated to ``logit_ops``
(plain PyTorch, or cuBLAS + Triton kernels on the CUDA fast path).
See docs/design.md for the derivation and docs/measurements/gpu_notes.md for the fast path.

This module holds the autograd Functions, the process-wide settings and :class:`FusedLossParams`, the one
object a call's options travel in: each Function translates its arguments into it once (``params``), and
:func:`fused_forward` hands it on. The pieces live in ``input_checks`` (argument checks), ``chunk_plan`` (which
rows and tokens each GEMM covers, padded or packed batches), ``chunk_loop`` (one call's chunks: statistics,
pair loss, gradients), ``loop_outputs`` (loss totals, gradient accumulation), ``pair_loss`` (the loss the loop
evaluates), ``host_sync``, ``logit_ops`` (with ``triton_logit_ops``, the CUDA fast path) and ``autograd_guards``.
"""
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from agent_code.liger_kernel.chunked_loss.autograd_guards import (
    InputVersions,
    graph_links,
    needed_gradients,
    refuse_double_backward,
    run_eagerly_under_compile,
)
from agent_code.liger_kernel.chunked_loss.chunk_loop import ChunkLoop
from agent_code.liger_kernel.chunked_loss.chunk_plan import lay_out_batch
from agent_code.liger_kernel.chunked_loss.input_checks import (
    check_loss_options,
    parse_byte_count,
    validate_packed_inputs,
    validate_preference_inputs,
)
from agent_code.liger_kernel.chunked_loss.logit_ops import select_logit_ops
from agent_code.liger_kernel.chunked_loss.pair_loss import PairLoss


def read_setting(name: str, env_var: str, default, check_value: Callable, parse_text: Callable):
    """A process-wide setting, read at each call: this module's attribute ``name`` when not None (checked by
    ``check_value(value, where)``), else the environment variable ``env_var`` (``parse_text(text, env_var)``),
    else ``default``."""
    value = globals()[name]
    if value is not None:
        return check_value(value, f"fused_linear_preference.{name}")
    text = os.environ.get(env_var)
    return default if text is None else parse_text(text, env_var)


#: Memory budget for one chunk's logits. A pair whose logits exceed it is processed in token chunks (two
#: passes: statistics, then recomputed logits and gradients). None: the environment variable
#: ``LIGER_LOGITS_BUDGET_BYTES``, read at each call, else 1 GiB. Assign an int here to override both.
LOGITS_BUDGET_BYTES: Optional[int] = None
BUDGET_ENV_VAR = "LIGER_LOGITS_BUDGET_BYTES"
DEFAULT_LOGITS_BUDGET_BYTES = 1 << 30


def _checked_budget(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be None or a positive int (bytes), got {value!r}")
    return value


def logits_budget_bytes() -> int:
    """The budget in force: :data:`LOGITS_BUDGET_BYTES` if set, else the environment variable, else 1 GiB."""
    return read_setting("LOGITS_BUDGET_BYTES", BUDGET_ENV_VAR, DEFAULT_LOGITS_BUDGET_BYTES, _checked_budget,
                        parse_byte_count)


#: CUDA fast path, bf16/fp16 inputs: accumulate the weight gradient in the input dtype instead of float32, so no
#: float32 ``(V, H)`` buffer exists (2 GiB at V 128256, H 4096) at the price of one rounding of the running sum
#: per chunk (the exact default rounds once, at the end; docs/interface.md, "Inputs"). None: the environment
#: variable ``LIGER_WEIGHT_GRAD_IN_INPUT_DTYPE`` ("1"/"0"), read at each call, else False. Other paths ignore it.
WEIGHT_GRAD_IN_INPUT_DTYPE: Optional[bool] = None
WEIGHT_GRAD_ENV_VAR = "LIGER_WEIGHT_GRAD_IN_INPUT_DTYPE"


def _checked_flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be None, True or False, got {value!r}")
    return value


def _parsed_weight_grad_flag(text: str, env_var: str) -> bool:
    if text.strip() not in ("0", "1"):
        raise ValueError(f"{env_var} must be 1 (accumulate the weight gradient in the input dtype) or 0, "
                         f"got {text!r}")
    return text.strip() == "1"


def weight_grad_in_input_dtype() -> bool:
    """The setting in force: :data:`WEIGHT_GRAD_IN_INPUT_DTYPE` if set, else the environment variable, else False."""
    return read_setting("WEIGHT_GRAD_IN_INPUT_DTYPE", WEIGHT_GRAD_ENV_VAR, False, _checked_flag,
                        _parsed_weight_grad_flag)


#: Opt-in, never the default, CUDA fast path with bf16/fp16 inputs: the gradient filter's threshold ``eps``. Each
#: chunk's input and weight gradient products skip every 128 x 128 block of ``dL/dlogits`` in which
#: ``|softmax - onehot| < eps`` everywhere (Cut Cross-Entropy's ``filter_eps``; its default is 2**-12, bf16's eps / 32):
#: faster on a peaked softmax, NOT exact (docs/interface.md, "Inputs"). The loss, log-probs, rewards and the bias
#: gradient stay exact. None: the environment variable ``LIGER_GRADIENT_FILTER_EPS`` (a float in [0, 1): 1 or more
#: would drop every block, |softmax - onehot| never exceeding 1), read at each call, else no filter. Other paths
#: ignore it.
GRADIENT_FILTER_EPS: Optional[float] = None
GRADIENT_FILTER_ENV_VAR = "LIGER_GRADIENT_FILTER_EPS"


def _checked_threshold(raw, where: str) -> float:
    try:
        value = None if isinstance(raw, bool) else float(raw)
    except (TypeError, ValueError):
        value = None
    # 1 or more would drop every block (|softmax - onehot| <= 1): zero input and weight gradients, silently
    if value is None or not 0.0 <= value < 1.0:
        raise ValueError(f"{where} must be a number in [0, 1) (the gradient filter's threshold, e.g. 0.000244; "
                         f"1 or more would drop every block), got {raw!r}")
    return value


def gradient_filter_eps() -> Optional[float]:
    """The setting in force: :data:`GRADIENT_FILTER_EPS` if set, else the environment variable (blank: unset), else
    None."""
    return read_setting("GRADIENT_FILTER_EPS", GRADIENT_FILTER_ENV_VAR, None, _checked_threshold,
                        lambda text, env_var: _checked_threshold(text.strip(), env_var) if text.strip() else None)


#: Single-pair token mode: compute the chosen row's gradients while its coefficient is still unknown (see
#: ``chunk_loop.DeferredScale``), so only the rejected row's logits are computed twice (all but its last run's).
#: False: both rows' logits are computed twice (all but the last run's).
DEFER_CHOSEN_SCALE = True
#: With DEFER_CHOSEN_SCALE, when the pair loss's gradients are opposite (:meth:`pair_gradients_opposite`) and
#: there is no NLL term: the rejected row's gradients are deferred too, so no logits are computed twice.
DEFER_PAIR_SCALE = True


@dataclass(frozen=True, eq=False)
class FusedLossParams:
    """Everything one call needs beyond its tensors, fixed for the call: its options, checked, and the module
    settings in force when it started (read once). Built by :meth:`from_options`."""

    pair_loss: PairLoss
    ignore_index: int
    alpha: float  # weight of the NLL term
    compute_nll_loss: bool
    allow_triton: bool  # the public ``compiled``: the CUDA fast path (Triton kernels) may run
    chunk_size: int  # pairs per chunk; where ``ops.chunk_size_is_minimum`` (CUDA fast path) a minimum
    softcap: Optional[float]
    output_dtype: Optional[torch.dtype]  # of the loss and aux outputs; None: the input dtype
    logits_budget_bytes: int  # :func:`logits_budget_bytes` at the call
    defer_chosen_scale: bool  # :data:`DEFER_CHOSEN_SCALE` at the call
    defer_pair_scale: bool  # :data:`DEFER_PAIR_SCALE` at the call
    weight_grad_in_input_dtype: bool  # :func:`weight_grad_in_input_dtype` at the call
    gradient_filter_eps: Optional[float]  # :func:`gradient_filter_eps` at the call

    @classmethod
    def from_options(cls, pair_loss: PairLoss, ignore_index=-100, alpha=1.0, compute_nll_loss=False, compiled=True,
                     chunk_size=1, softcap=None, output_dtype=None) -> "FusedLossParams":
        """The options checked (``input_checks.check_loss_options``) and the module settings read."""
        check_loss_options(ignore_index, alpha, compute_nll_loss, compiled, chunk_size, softcap, output_dtype)
        return cls(pair_loss, ignore_index, alpha, compute_nll_loss, compiled, chunk_size, softcap, output_dtype,
                   logits_budget_bytes(), DEFER_CHOSEN_SCALE, DEFER_PAIR_SCALE, weight_grad_in_input_dtype(),
                   gradient_filter_eps())


def fused_forward(ctx, _input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                  bias: Optional[torch.Tensor], params: FusedLossParams, sequence_offsets=None):
    """The forward of every fused preference Function: loss and aux outputs; the input, weight and bias gradients
    are computed here and saved on ctx for the shared backward (docs/design.md, "The forward, step by step").

    ``sequence_offsets`` (None: a padded ``(2B, T, H)`` batch): a packed batch (see
    :meth:`LigerFusedLinearPreferenceBase.apply_packed`).
    """
    if sequence_offsets is None:
        validate_preference_inputs(_input, weight, target, bias)
    else:
        sequence_offsets = validate_packed_inputs(_input, weight, target, bias, sequence_offsets)
    needs = needed_gradients(ctx, bias is not None)
    # before target.long(), which may copy: the caller's tensors are the ones to watch
    input_versions = InputVersions(_input=_input, weight=weight, target=target, bias=bias) if any(needs) else None

    ops = select_logit_ops(_input, weight, bias, params.softcap, params.ignore_index, params.allow_triton,
                           params.weight_grad_in_input_dtype, params.gradient_filter_eps)
    layout = lay_out_batch(_input, target.long(), ops, params, sequence_offsets)
    loop = ChunkLoop(params, ops, layout, needs)
    loop.run(layout.plan)

    grad_input, grad_weight, grad_bias = loop.sink.results()
    ctx.save_for_backward(None if grad_input is None else grad_input.view(_input.shape), grad_weight, grad_bias)
    ctx.grad_dtype, ctx.input_versions = _input.dtype, input_versions
    # what a backward(create_graph=True) links its gradients to (autograd_guards.refuse_double_backward)
    ctx.input_links = graph_links(_input, weight, bias) if any(needs) else ()
    out_dtype = _input.dtype if params.output_dtype is None else params.output_dtype
    return loop.totals.outputs(layout.positions, params.compute_nll_loss, out_dtype)


class LigerFusedLinearPreferenceBase(torch.autograd.Function):
    """Base of fused-linear preference losses.

    A subclass supplies ``preference_loss_fn(chosen_logps, rejected_logps, full_target, **hyperparams)``
    returning ``(loss, chosen_rewards, rejected_rewards)`` — the loss summed over the pairs given and
    divided by the number of pairs in the whole batch — and calls the base's :meth:`forward` from its own
    (under torch.compile every subclass's ``forward`` runs eagerly, behind a graph break); or, with options of its
    own, overrides :meth:`params` (its options in its ``forward``'s order, with its defaults, translated into
    :class:`FusedLossParams`) and has ``forward`` return ``fused_forward(ctx, ..., cls.params(...))``. The base's
    :meth:`backward` serves every subclass, :meth:`apply_packed` gives every subclass packed batches.
    The gradient of ``preference_loss_fn`` is taken by autograd on the tiny per-pair tensors, so a new
    loss (DPO, CPO, ORPO, ...) needs no hand-written derivative; a subclass may add a closed form
    (``preference_loss_and_grad``), used when every pair of the chunk has tokens.
    """

    #: True: a row's log-prob is the mean over its non-ignored tokens (SimPO); False: the sum (DPO).
    average_log_prob = True

    @classmethod
    def pair_gradients_opposite(cls, loss_kwargs: Dict[str, Any]) -> bool:
        """True when ``d loss / d chosen_logps == -d loss / d rejected_logps`` for these hyperparameters (a loss
        of ``chosen - rejected`` alone): single-pair token mode then computes no logits twice. Default False."""
        return False

    @staticmethod
    def preference_loss_fn(chosen_logps, rejected_logps, full_target, **hyperparams):
        raise NotImplementedError("subclasses define the preference loss")

    #: Optional closed form, same arguments as ``preference_loss_fn``, returning ``(loss, d loss/d chosen_logps,
    #: d loss/d rejected_logps, chosen_rewards, rejected_rewards)``: a few launches instead of an autograd
    #: graph on tiny tensors (with one pair chunk that host time can delay the gradient kernel). None: autograd.
    preference_loss_and_grad = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward = run_eagerly_under_compile(cls.__dict__["forward"])

    @classmethod
    def pair_loss(cls, loss_kwargs: Optional[Dict[str, Any]] = None,
                  pair_kwargs: Optional[Dict[str, torch.Tensor]] = None) -> PairLoss:
        """This Function's pair loss with these hyperparameters (``loss_kwargs``) and per-pair tensors."""
        loss_kwargs = dict(loss_kwargs or {})
        return PairLoss(cls.preference_loss_fn, cls.preference_loss_and_grad, loss_kwargs, dict(pair_kwargs or {}),
                        cls.average_log_prob, cls.pair_gradients_opposite(loss_kwargs))

    @classmethod
    def params(cls, ignore_index=-100, alpha=1.0, compute_nll_loss=False, compiled=True, chunk_size=1, softcap=None,
               loss_kwargs=None, pair_kwargs=None, output_dtype=None) -> FusedLossParams:
        """:meth:`forward`'s options (after ``bias``, in its order, with its defaults) as one checked object."""
        return FusedLossParams.from_options(cls.pair_loss(loss_kwargs, pair_kwargs), ignore_index, alpha,
                                            compute_nll_loss, compiled, chunk_size, softcap, output_dtype)

    @classmethod
    @torch.compiler.disable  # see run_eagerly_under_compile
    def forward(cls, ctx, _input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None, ignore_index: int = -100, alpha: float = 1.0,
                compute_nll_loss: bool = False, compiled: bool = True, chunk_size: int = 1,
                softcap: Optional[float] = None, loss_kwargs: Optional[Dict[str, Any]] = None,
                pair_kwargs: Optional[Dict[str, torch.Tensor]] = None, output_dtype: Optional[torch.dtype] = None):
        """Loss and aux outputs (see ``simpo_loss.AUX_OUTPUT_NAMES``); the input, weight and bias gradients are
        computed here and saved on ctx (docs/design.md, "The forward, step by step").

        ``loss_kwargs`` go to ``preference_loss_fn`` as they are; ``pair_kwargs`` are per-pair tensors of leading
        size B (e.g. reference log-probs), sliced to each chunk's pairs. ``output_dtype`` (default: the input
        dtype) is the dtype of the loss and aux outputs, rounded once from the float32 (float64) accumulators.
        A row with no token has log-prob 0 and its pair adds no loss and no gradient; a sequence length of 0
        makes every row such a row (all outputs 0, zero gradients).
        """
        params = cls.params(ignore_index, alpha, compute_nll_loss, compiled, chunk_size, softcap, loss_kwargs,
                            pair_kwargs, output_dtype)
        return fused_forward(ctx, _input, weight, target, bias, params)

    @classmethod
    def apply_packed(cls, _input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, sequence_offsets,
                     bias: Optional[torch.Tensor] = None, *options):
        """This Function on a packed ("padding-free") batch: ``cls.apply``'s arguments, with the
        ``sequence_offsets`` after ``target`` (``options``: those after ``bias``, positionally).

        ``sequence_offsets`` (a 1-D integer tensor or sequence of 2B + 1 ints) makes ``_input`` ``(1, N, H)`` and
        ``target`` ``(1, N)`` hold 2B sequences end to end, sequence ``s`` at ``[offsets[s], offsets[s + 1])``, B
        chosen then B rejected in the same pair order; ``target`` is aligned within each sequence (its last
        position predicts nothing: ``ignore_index``). The loss, log-probs, rewards, NLL and gradients equal those
        of the padded batch of the same sequences, computed without padding: chunks cover spans of the flat
        input (``chunk_plan``). The logits means average the real positions only (there is no padding), each
        half over its own tokens. The gradient of ``_input`` has its ``(1, N, H)`` shape.
        """
        return PackedPreferenceFunction.apply(_input, weight, target, bias, sequence_offsets, cls, *options)

    @staticmethod
    def backward(ctx, *grad_output):
        """Scale the gradients computed in forward by the upstream gradient of the loss.

        Returns ``(grad_input, grad_weight, None, grad_bias)`` and one None for each further argument of the
        subclass's ``forward``, so a subclass needs no ``backward`` of its own.
        """
        if ctx.input_versions is not None:
            ctx.input_versions.check(type(ctx).__name__)
        grad_input, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output[0]
        dtype = ctx.grad_dtype

        # one host read of the upstream scalar (all forward work is done by now): at exactly 1 (plain
        # loss.backward()) the (V, H) weight gradient needs no extra read and write
        unit = scale.numel() == 1 and float(scale.detach()) == 1.0  # (a scale may require grad: create_graph)

        def scaled(grad):
            if grad is None:
                return None
            return grad.to(dtype) if unit else (grad * scale.to(grad.dtype)).to(dtype)

        grads = (scaled(grad_input), scaled(grad_weight), None, scaled(grad_bias),
                 *([None] * (len(ctx.needs_input_grad) - 4)))
        if torch.is_grad_enabled():  # backward(create_graph=True): the caller will differentiate these
            return refuse_double_backward(grads, type(ctx).__name__, (*ctx.input_links, *grad_output))
        return grads


class PackedPreferenceFunction(torch.autograd.Function):
    """A fused preference Function on a packed batch (:meth:`LigerFusedLinearPreferenceBase.apply_packed`):
    ``function`` (the loss's Function) translates ``options`` into its params; the sequence offsets are an
    argument of their own."""

    @staticmethod
    @torch.compiler.disable  # see run_eagerly_under_compile
    def forward(ctx, _input, weight, target, bias, sequence_offsets, function, *options):
        return fused_forward(ctx, _input, weight, target, bias, function.params(*options), sequence_offsets)

    backward = staticmethod(LigerFusedLinearPreferenceBase.backward)
