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

This module holds the autograd Function and its process-wide settings; the pieces live in
``input_checks`` (argument checks), ``host_sync`` (device facts the host waits for), ``chunk_plan`` and
``packed_plan`` (which rows and tokens each GEMM covers, padded or packed batches; :func:`lay_out_batch` picks), ``chunk_statistics`` and ``gradient_sinks`` (per-token statistics, loss
totals, gradient accumulation), ``chunk_loop`` (one call's chunks) and ``autograd_guards``.
"""
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from agent_code.liger_kernel.chunked_loss.autograd_guards import (
    InputVersions,
    graph_links,
    needed_gradients,
    refuse_double_backward,
    run_eagerly_under_compile,
)
from agent_code.liger_kernel.chunked_loss.chunk_loop import DEFER_CHOSEN, DEFER_PAIR, ChunkLoop
from agent_code.liger_kernel.chunked_loss.chunk_plan import plan_chunks  # noqa: F401  (re-exported)
from agent_code.liger_kernel.chunked_loss.chunk_statistics import LossTotals, chunk_statistics
from agent_code.liger_kernel.chunked_loss.gradient_sinks import GradientSink
from agent_code.liger_kernel.chunked_loss.host_sync import HostChecks
from agent_code.liger_kernel.chunked_loss.input_checks import (
    parse_byte_count,
    validate_packed_inputs,
    validate_preference_inputs,
)
from agent_code.liger_kernel.chunked_loss.logit_ops import select_logit_ops
from agent_code.liger_kernel.chunked_loss.packed_plan import plan_packed_chunks, row_token_counts
from agent_code.liger_kernel.utils import accumulation_dtype


#: Memory budget for one chunk's logits. A pair whose logits exceed it is processed in token chunks (two
#: passes: statistics, then recomputed logits and gradients). None: the environment variable
#: ``LIGER_LOGITS_BUDGET_BYTES``, read at each call, else 1 GiB. Assign an int here to override both.
LOGITS_BUDGET_BYTES: Optional[int] = None
BUDGET_ENV_VAR = "LIGER_LOGITS_BUDGET_BYTES"
DEFAULT_LOGITS_BUDGET_BYTES = 1 << 30


def logits_budget_bytes() -> int:
    """The budget in force: :data:`LOGITS_BUDGET_BYTES` if set, else the environment variable, else 1 GiB."""
    if LOGITS_BUDGET_BYTES is not None:
        if isinstance(LOGITS_BUDGET_BYTES, bool) or not isinstance(LOGITS_BUDGET_BYTES, int) \
                or LOGITS_BUDGET_BYTES < 1:
            raise ValueError(f"fused_linear_preference.LOGITS_BUDGET_BYTES must be None or a positive int "
                             f"(bytes), got {LOGITS_BUDGET_BYTES!r}")
        return LOGITS_BUDGET_BYTES
    text = os.environ.get(BUDGET_ENV_VAR)
    return DEFAULT_LOGITS_BUDGET_BYTES if text is None else parse_byte_count(text, BUDGET_ENV_VAR)


#: ctx attribute through which :meth:`LigerFusedLinearPreferenceBase.packed` hands the sequence offsets to forward.
PACKED_OFFSETS_ATTRIBUTE = "sequence_offsets"

#: Single-pair token mode: compute the chosen row's gradients while its coefficient is still unknown (see
#: ``gradient_sinks.DeferredScale``), so only the rejected row's logits are computed twice (all but its last run's).
#: False: both rows' logits are computed twice (all but the last run's).
DEFER_CHOSEN_SCALE = True
#: With DEFER_CHOSEN_SCALE, when the pair loss's gradients are opposite (:meth:`pair_gradients_opposite`) and
#: there is no NLL term: the rejected row's gradients are deferred too, so no logits are computed twice.
DEFER_PAIR_SCALE = True


def single_pair_deferral(cls, needs_any_grad: bool, layout: "BatchLayout", packed: bool, compute_nll_loss: bool,
                         alpha: float, loss_kwargs: Dict[str, Any]) -> Optional[str]:
    """The deferred-scale scheme of a call (``chunk_loop.DEFER_CHOSEN``/``DEFER_PAIR``), or None: only for one
    padded pair in token mode whose gradients are needed."""
    token_mode = bool(layout.plan) and len(layout.plan[0].passes) > 1
    if not (DEFER_CHOSEN_SCALE and needs_any_grad and layout.n_pairs == 1 and not packed and token_mode):
        return None
    nll_in_gradient = compute_nll_loss and alpha != 0
    if DEFER_PAIR_SCALE and not nll_in_gradient and cls.pair_gradients_opposite(loss_kwargs):
        return DEFER_PAIR
    return DEFER_CHOSEN


@dataclass
class BatchLayout:
    """How one call's batch meets the chunk loop: padded ``(2B, T, ...)`` rows, or a packed batch's flat tokens."""

    input: torch.Tensor  # (2B, T, H), or the flat (N, H) of a packed batch
    target: torch.Tensor  # int64, laid out like ``input``
    n_pairs: int
    plan: List[Any]  # chunk_plan.Chunk or packed_plan.PackedChunk
    token_counts: Optional[torch.Tensor]  # (2B,) real tokens per row when known here (packed), else None
    positions: Any  # logit positions the logits means divide by: one int per half, or (chosen, rejected)
    full_target: Optional[torch.Tensor]  # what preference_loss_fn gets as full_target (None: the target)


def lay_out_batch(_input, target, vocab, chunk_size, ops, ignore_index, offsets) -> BatchLayout:
    """The chunk plan of one call (``offsets``: the 2B + 1 sequence offsets of a packed batch, else None)."""
    budget = logits_budget_bytes()
    if offsets is None:
        n_pairs, seq_len = _input.shape[0] // 2, _input.shape[1]
        plan = plan_chunks(n_pairs, seq_len, vocab, chunk_size, ops.logits_element_size, budget,
                           fill_budget=ops.fills_budget)
        return BatchLayout(_input, target, n_pairs, plan, None, n_pairs * seq_len * vocab, None)
    # one flat (N, H) input; chunks cover flat spans (packed_plan)
    n_pairs = (len(offsets) - 1) // 2
    flat_input, flat_target = _input.reshape(-1, _input.shape[-1]), target.reshape(-1)
    plan = plan_packed_chunks(offsets, vocab, chunk_size, ops.logits_element_size, budget, _input.device,
                              fill_budget=ops.fills_budget)
    positions = (offsets[n_pairs] * vocab, (offsets[-1] - offsets[n_pairs]) * vocab)
    # preference_loss_fn divides by full_target.shape[0] // 2, so it gets 2B rows: a broadcast view of the
    # packed target (no copy; only its shape is meaningful)
    return BatchLayout(flat_input, flat_target, n_pairs, plan, row_token_counts(flat_target, offsets, ignore_index),
                       positions, flat_target.expand(2 * n_pairs, -1))


class LigerFusedLinearPreferenceBase(torch.autograd.Function):
    """Base of fused-linear preference losses.

    A subclass supplies ``preference_loss_fn(chosen_logps, rejected_logps, full_target, **hyperparams)``
    returning ``(loss, chosen_rewards, rejected_rewards)`` — the loss summed over the pairs given and
    divided by the number of pairs in the whole batch — and calls the base's :meth:`forward` from its own
    (under torch.compile every subclass's ``forward`` runs eagerly, behind a graph break). The base's
    :meth:`backward` serves every subclass.
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
        makes every row such a row (all outputs 0, zero gradients). Called through :meth:`packed`, the batch is
        a packed one (see there).
        """
        offsets = getattr(ctx, PACKED_OFFSETS_ATTRIBUTE, None)
        if offsets is not None:
            offsets = validate_packed_inputs(_input, weight, target, bias, ignore_index, chunk_size, softcap,
                                             output_dtype, offsets)
        else:
            validate_preference_inputs(_input, weight, target, bias, ignore_index, chunk_size, softcap, output_dtype)
        needs_input_grad, needs_weight_grad, needs_bias_grad = needed_gradients(ctx, bias is not None)
        needs_any_grad = needs_input_grad or needs_weight_grad or needs_bias_grad
        # before target.long(), which may copy: the caller's tensors are the ones to watch
        input_versions = InputVersions(_input=_input, weight=weight, target=target, bias=bias) \
            if needs_any_grad else None

        vocab, acc_dtype, input_shape = weight.shape[0], accumulation_dtype(_input.dtype), _input.shape
        ops = select_logit_ops(_input, weight, bias, softcap, ignore_index, compiled)
        layout = lay_out_batch(_input, target.long(), vocab, chunk_size, ops, ignore_index, offsets)
        n_pairs = layout.n_pairs
        # queued ahead of the first GEMM, so its answer is on the host long before the first pair loss asks
        host_checks = HostChecks(layout.target, ignore_index, vocab, n_pairs, defer=ops.defers_host_checks,
                                 token_counts=layout.token_counts)
        loss_kwargs = dict(loss_kwargs or {})
        # (the deferred scale relies on a pair's two rows being adjacent (T, H) blocks of the input gradient)
        deferral = single_pair_deferral(cls, needs_any_grad, layout, offsets is not None, compute_nll_loss, alpha,
                                        loss_kwargs)
        # The first chunk's GEMM and statistics go to the device before the rest of the host-side set-up,
        # which then runs while the device is busy instead of leaving it idle.
        first_stats = chunk_statistics(ops, layout.input, layout.target, layout.plan[0], n_pairs, ignore_index,
                                       acc_dtype) if layout.plan and deferral is None else None
        token_counts = host_checks.token_counts
        loop = ChunkLoop(
            pair_loss_and_grad=cls._pair_loss_and_grad, ops=ops, _input=layout.input, target=layout.target,
            ignore_index=ignore_index, acc_dtype=acc_dtype, host_checks=host_checks,
            totals=LossTotals(n_pairs, acc_dtype, _input.device),
            sink=GradientSink(ops, layout.input, vocab, sum(len(c.passes) for c in layout.plan), needs_input_grad,
                              needs_weight_grad, needs_bias_grad, acc_dtype),
            alpha=alpha, compute_nll_loss=compute_nll_loss, loss_kwargs=loss_kwargs,
            pair_kwargs=dict(pair_kwargs or {}), needs_any_grad=needs_any_grad, deferral=deferral,
            n_chosen_tokens=token_counts[:n_pairs].sum().clamp(min=1).to(acc_dtype),
            row_norm=token_counts.clamp(min=1).to(acc_dtype) if cls.average_log_prob else None,
            full_target=layout.full_target,
        )
        loop.run(layout.plan, first_stats)
        del first_stats

        grad_input, grad_weight, grad_bias = loop.sink.results()
        ctx.save_for_backward(None if grad_input is None else grad_input.view(input_shape), grad_weight, grad_bias)
        ctx.grad_dtype, ctx.input_versions = _input.dtype, input_versions
        # what a backward(create_graph=True) links its gradients to (autograd_guards.refuse_double_backward)
        ctx.input_links = graph_links(_input, weight, bias) if needs_any_grad else ()
        out_dtype = _input.dtype if output_dtype is None else output_dtype
        return loop.totals.outputs(layout.positions, compute_nll_loss, out_dtype)

    @classmethod
    def packed(cls):
        """This Function for packed ("padding-free") batches: its ``apply`` takes the same arguments as ``cls.apply``
        (all of them, positionally) followed by ``sequence_offsets``.

        ``sequence_offsets`` (a 1-D integer tensor or sequence of 2B + 1 ints) makes ``_input`` ``(1, N, H)`` and
        ``target`` ``(1, N)`` hold 2B sequences end to end, sequence ``s`` at ``[offsets[s], offsets[s + 1])``, B
        chosen then B rejected in the same pair order; ``target`` is aligned within each sequence (its last
        position predicts nothing: ``ignore_index``). The loss, log-probs, rewards, NLL and gradients equal those
        of the padded batch of the same sequences, computed without padding: chunks cover spans of the flat
        input (``packed_plan``). The logits means average the real positions only (there is no padding), each
        half over its own tokens. The gradient of ``_input`` has its ``(1, N, H)`` shape.
        """
        variant = cls.__dict__.get("_packed_variant")
        if variant is None:
            def forward(variant_cls, ctx, *args):
                *function_args, sequence_offsets = args
                # the one channel from here to the base's forward that leaves cls.forward's signature alone
                setattr(ctx, PACKED_OFFSETS_ATTRIBUTE, sequence_offsets)
                return cls.forward.__func__(variant_cls, ctx, *function_args)

            variant = type(f"{cls.__name__}Packed", (cls,), {"forward": classmethod(forward),
                                                             "__doc__": cls.packed.__doc__})
            cls._packed_variant = variant
        return variant

    @classmethod
    def _pair_loss_and_grad(
        cls,
        logps: torch.Tensor,
        pairs: int,
        pairs_with_tokens: torch.Tensor,
        full_target: torch.Tensor,
        loss_kwargs: Dict[str, Any],
        pair_kwargs: Dict[str, torch.Tensor],
        needs_grad: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Run ``preference_loss_fn`` on a chunk's pairs; return its loss, ``dloss/dlogps`` and rewards.

        A pair with a row whose tokens are all ignored has no defined log-prob: it adds zero loss and
        zero gradient (its rewards are still reported, from log-prob 0), the mean still divides by B.
        ``pairs_with_tokens`` is a host tensor, so the chunk loop never waits for the device.
        """
        all_have_tokens = bool(pairs_with_tokens.all())
        if needs_grad and all_have_tokens and cls.preference_loss_and_grad is not None:
            loss, d_chosen, d_rejected, chosen_rewards, rejected_rewards = cls.preference_loss_and_grad(
                logps[:pairs], logps[pairs:], full_target, **loss_kwargs, **pair_kwargs
            )
            return loss, torch.cat((d_chosen, d_rejected)), (chosen_rewards, rejected_rewards)
        with torch.enable_grad():
            leaf = logps.detach().requires_grad_(needs_grad)
            chosen, rejected = leaf[:pairs], leaf[pairs:]
            loss, chosen_rewards, rejected_rewards = cls.preference_loss_fn(
                chosen, rejected, full_target, **loss_kwargs, **pair_kwargs
            )
            if not all_have_tokens:
                loss = torch.zeros_like(loss)
                if bool(pairs_with_tokens.any()):
                    index = pairs_with_tokens.nonzero().squeeze(1).to(logps.device)
                    their_kwargs = {k: v[index] for k, v in pair_kwargs.items()}
                    loss = cls.preference_loss_fn(
                        chosen[index], rejected[index], full_target, **loss_kwargs, **their_kwargs
                    )[0]
            if needs_grad and loss.requires_grad:
                (d_logps,) = torch.autograd.grad(loss, leaf)
            else:
                d_logps = torch.zeros_like(leaf)
        rewards = (chosen_rewards.detach(), rejected_rewards.detach())
        return loss.detach(), d_logps, rewards

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
