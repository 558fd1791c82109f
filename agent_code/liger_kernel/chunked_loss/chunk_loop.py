"""One forward call's chunk loop: each chunk's per-token statistics, log-probs, pair loss, NLL and, when asked
for, gradients, added into the call's outputs (``loop_outputs``); single-pair token mode contracts its gradients
before their scale is known (:class:`DeferredScale`)."""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

from agent_code.liger_kernel.chunked_loss.chunk_plan import BatchLayout, Chunk, Piece
from agent_code.liger_kernel.chunked_loss.host_sync import HostChecks, HostCopy
from agent_code.liger_kernel.chunked_loss.logit_ops import matmul_accumulation_dtype
from agent_code.liger_kernel.chunked_loss.loop_outputs import GradientSink, LossTotals

#: single-pair token mode: contract the chosen row before its scale is known (``DeferredScale``)
DEFER_CHOSEN = "chosen"
#: single-pair token mode: contract both rows before their (tied) scale is known
DEFER_PAIR = "pair"


class PassLogits(NamedTuple):
    """One pass's GEMM input (its rows and tokens of ``_input``, flattened) and the logits computed from it."""

    x: torch.Tensor
    logits: torch.Tensor


def pass_logits(ops, _input, piece) -> PassLogits:
    """The logits GEMM of one pass's rows and tokens."""
    x_pass = ops.prepare_input(piece.gather(_input))
    return PassLogits(x_pass, ops.logits(x_pass))


@dataclass
class ChunkStatistics:
    """A chunk's per-token statistics, (2p, T) each, laid out by the plan (:meth:`Chunk.per_token_arrays`), and
    the last pass's logits if kept for its gradient."""

    target: torch.Tensor  # (2p, T): the chunk's chosen rows, then its rejected rows
    valid: torch.Tensor
    lse: torch.Tensor
    target_logit: torch.Tensor
    logit_sum: torch.Tensor
    last_pass: Optional[PassLogits] = None  # logits of the last pass computed, if kept for the gradient

    def add_pass(self, ops, _input, piece, computed: Optional[PassLogits] = None) -> PassLogits:
        """Logits of one pass (unless ``computed`` already) and their statistics, written into the per-token
        arrays; returns the pass's logits."""
        computed = computed if computed is not None else pass_logits(ops, _input, piece)
        stats = ops.statistics(computed.logits, piece.gather(self.target, local=True))
        for array, values in zip((self.lse, self.target_logit, self.logit_sum), stats):
            piece.scatter_(array, values, local=True)
        return computed

    def add_passes(self, ops, _input, passes: list, keep_last: bool, computed: Optional[PassLogits] = None) -> None:
        """Statistics of ``passes`` in turn (``computed``: the first pass's logits, already launched); with
        ``keep_last`` the last pass's logits stay on :attr:`last_pass` for its gradient."""
        for piece in passes:
            self.last_pass = None  # free the previous pass's logits before the next GEMM allocates its own
            latest = self.add_pass(ops, _input, piece, computed)
            computed = None
            self.last_pass = latest if keep_last else None
            del latest

    def gradient_(self, ops, logits: torch.Tensor, piece, pass_coef: torch.Tensor) -> torch.Tensor:
        """``dL/dlogits`` of one pass in place, from its statistics and its tokens' coefficients (``pass_coef``:
        gathered from the chunk's (2p, T) coefficients)."""
        return ops.gradient_(logits, piece.gather(self.lse, local=True), piece.gather(self.target, local=True),
                             pass_coef)


class DeferredScale:
    """Single-pair token mode: rows' gradients contracted before their scale is known.

    A row's ``dL/dlogits`` is ``c * u * valid * (softmax - onehot)`` with one unknown scalar ``c`` and a known
    per-row factor ``u``, so each run is contracted in the pass that also computes its statistics and ``c`` is
    applied afterwards. dX stays in float32 until it is scaled and rounded once (bf16/fp16 inputs: the first
    row's in the bytes of both rows of dX, the second row's in a buffer of its own, its last run in the
    product itself); ``db`` is scaled on the device.

    ``both_rows=False`` (the chosen row alone, when its coefficient is not tied to the rejected row's, e.g. with
    the NLL term): the float32 weight accumulator, which then holds only the chosen products, is scaled by
    the first rejected product (accumulator scale ``c``, read on the host while the device runs that
    product's logits GEMM); only the rejected row's logits are computed twice (``3R - 1`` logits GEMMs for
    ``R`` runs per row). ``both_rows=True`` (the pair loss's gradients are opposite, no NLL term: the rows'
    coefficients are ``c / n_chosen`` and ``-c / n_rejected``): both rows are contracted with the known factors
    ``1`` and ``-n_chosen / n_rejected``; their scale ``c / n_chosen`` is known once the last run's statistics
    are, before its gradient, so its weight product scales the accumulator and itself by it (the GEMM's beta
    and alpha): ``2R`` logits GEMMs, as many as the plain computation, and no extra pass over the weight
    gradient.
    """

    def __init__(self, sink: GradientSink, seq_len: int, both_rows: bool, last_run_start: int = 0):
        """``last_run_start``: the first token of the rejected row's last run (``both_rows`` only)."""
        self.sink, self.both_rows, self.last_run_start = sink, both_rows, last_run_start
        acc_dtype = sink.ops.acc_dtype
        grad_input = sink.grad_input
        self.dx_rows, self.dx_last = None, None
        if grad_input is not None:  # (T, H) each in the accumulation dtype; one pair: rows 0 and 1 are contiguous
            self.in_place = grad_input.dtype == acc_dtype
            if self.in_place:
                self.dx_rows = (grad_input[0], grad_input[1])
            else:
                chosen = grad_input.view(-1).view(acc_dtype).view(seq_len, -1)
                rejected = torch.empty((last_run_start, grad_input.shape[-1]), dtype=acc_dtype,
                                       device=grad_input.device) if both_rows else None
                self.dx_rows = (chosen, rejected)
        self.bias_sum = torch.zeros_like(sink.grad_bias) if sink.grad_bias is not None else None

    def add(self, piece: Piece, grad_logits, x_pass, scale: Optional[HostCopy] = None) -> None:
        """Contract one run's unscaled gradient; ``scale`` (the host copy of the rows' scale, ``both_rows``' last
        run only) scales the weight accumulator and this run's product."""
        ops = self.sink.ops
        if self.dx_rows is not None:
            row = piece.rows[0].start  # one pair: 0 chosen, 1 rejected
            if row == 1 and not self.in_place and piece.tokens.start >= self.last_run_start:
                self.dx_last = matmul_accumulation_dtype(grad_logits, ops.weight)  # no buffer holds the last run
            else:
                matmul_accumulation_dtype(grad_logits, ops.weight, out=self.dx_rows[row][piece.tokens])
        if self.sink.needs_weight_grad:
            c = 1.0 if scale is None else float(scale.get()[0])
            self.sink.grad_weight = ops.accumulate_weight_grad(self.sink.grad_weight, grad_logits, x_pass,
                                                               self.sink.n_products, acc_scale=c, product_scale=c)
        if self.bias_sum is not None:
            self.bias_sum += grad_logits.sum(dim=0, dtype=self.bias_sum.dtype)

    def host_scale(self, coef: torch.Tensor) -> Optional[HostCopy]:
        """The host copy of ``coef`` for the weight accumulator's product (None when the weight is frozen)."""
        return HostCopy(coef.view(1), self.sink.ops.host_reads_async) if self.sink.needs_weight_grad else None

    def finish(self, coef: torch.Tensor) -> None:
        """Scale dX and db of every run added by ``coef`` (with ``both_rows``, after the last run: its logits are
        freed by then, so the chosen row's rounding temporary adds nothing to the peak)."""
        grad_input = self.sink.grad_input
        if self.dx_rows is not None:
            chosen, rejected = self.dx_rows
            if self.in_place:
                (grad_input if self.both_rows else grad_input[0]).mul_(coef)
            else:  # scaled in float32, rounded once; the chosen row through a temporary, as it overlaps its source
                grad_input[0].copy_(chosen.mul_(coef).to(grad_input.dtype))
                if self.both_rows:
                    grad_input[1][: self.last_run_start].copy_(rejected.mul_(coef))
                    grad_input[1][self.last_run_start :].copy_(self.dx_last.mul_(coef))
            self.dx_rows = self.dx_last = None
        if self.bias_sum is not None:
            self.sink.grad_bias += self.bias_sum * coef


def single_pair_deferral(params, needs_any_grad: bool, layout: BatchLayout) -> Optional[str]:
    """The deferred-scale scheme of a call (:data:`DEFER_CHOSEN`/:data:`DEFER_PAIR`), or None: only for one padded
    pair in token mode whose gradients are needed (the deferred scale relies on a pair's two rows being adjacent
    (T, H) blocks of the input gradient)."""
    token_mode = bool(layout.plan) and len(layout.plan[0].passes) > 1
    if not (params.defer_chosen_scale and needs_any_grad and layout.n_pairs == 1 and not layout.packed
            and token_mode):
        return None
    nll_in_gradient = params.compute_nll_loss and params.alpha != 0
    if params.defer_pair_scale and not nll_in_gradient and params.pair_loss.gradients_opposite:
        return DEFER_PAIR
    return DEFER_CHOSEN


class ChunkLoop:
    """One forward call's chunks: what they share, and the steps each goes through.

    ``params`` (``FusedLossParams``) are the call's options, ``ops`` its logit operations, ``layout`` its batch
    and plan, ``needs`` whether the input, weight and bias gradients are needed. Constructing the loop queues the
    host checks (ahead of the first GEMM, so their answer is on the host long before the first pair loss
    asks); :meth:`run` fills :attr:`totals` (the loss and aux outputs) and :attr:`sink` (the gradients).
    """

    def __init__(self, params, ops, layout: BatchLayout, needs: Tuple[bool, bool, bool]):
        self.params, self.ops, self.layout, self.needs = params, ops, layout, needs
        self.host_checks = HostChecks(layout.target, params.ignore_index, ops.weight.shape[0], layout.n_pairs,
                                      ops.host_reads_async, layout.token_counts)
        self.deferral = single_pair_deferral(params, self.needs_any_grad, layout)
        self.totals: Optional[LossTotals] = None
        self.sink: Optional[GradientSink] = None
        self.n_chosen_tokens: Optional[torch.Tensor] = None  # NLL normaliser: the whole batch's chosen tokens
        self.row_norm: Optional[torch.Tensor] = None  # (2B,) token counts (>= 1) when log-probs are averaged

    @property
    def needs_any_grad(self) -> bool:
        return any(self.needs)

    def run(self, plan: List[Chunk]) -> None:
        """Every chunk of ``plan`` in turn."""
        if self.deferral is not None:
            (chunk,) = plan  # one padded pair in token mode: a plan of one chunk
            self.set_up_outputs()
            self.run_deferred(chunk)
            return
        # The first chunk's GEMM and statistics go to the device before the rest of the host-side set-up,
        # which then runs while the device is busy instead of leaving it idle.
        first_stats = self.statistics(plan[0]) if plan else None
        self.set_up_outputs()
        for index, chunk in enumerate(plan):
            stats = first_stats if index == 0 else self.statistics(chunk)
            first_stats = None
            d_logps, norm_chunk = self.losses(chunk, stats)
            if self.needs_any_grad:
                self.gradients(chunk, stats, d_logps, norm_chunk, None)
            del stats

    def set_up_outputs(self) -> None:
        """What the chunks add into: the loss totals and the gradient sink; and the normalisers of the NLL term
        and of averaged log-probs."""
        layout, acc_dtype = self.layout, self.ops.acc_dtype
        self.totals = LossTotals(layout.n_pairs, acc_dtype, layout.input.device)
        self.sink = GradientSink(self.ops, layout.input, layout.n_passes, self.needs)
        token_counts = self.host_checks.token_counts
        self.n_chosen_tokens = token_counts[: layout.n_pairs].sum().clamp(min=1).to(acc_dtype)
        if self.params.pair_loss.average_log_prob:
            self.row_norm = token_counts.clamp(min=1).to(acc_dtype)

    def statistics(self, chunk: Chunk) -> ChunkStatistics:
        """Logits and per-token statistics of every pass of ``chunk``; the last pass's logits are kept for the
        gradient."""
        # the first GEMM goes to the device before any bookkeeping launch
        computed = pass_logits(self.ops, self.layout.input, chunk.passes[0])
        stats = ChunkStatistics(*chunk.per_token_arrays(self.layout, self.ops.ignore_index, self.ops.acc_dtype))
        stats.add_passes(self.ops, self.layout.input, chunk.passes, keep_last=True, computed=computed)
        return stats

    def run_deferred(self, chunk: Chunk) -> None:
        """Single-pair token mode with deferred scales (``DeferredScale``): the chosen row's runs give their
        statistics and unscaled gradients at once, then the rejected row's runs give their statistics, and,
        with ``DEFER_PAIR``, their unscaled gradients too; otherwise the last one's logits are kept and the
        others recomputed once the coefficients are known."""
        both_rows, ops, _input = self.deferral == DEFER_PAIR, self.ops, self.layout.input
        stats = ChunkStatistics(*chunk.per_token_arrays(self.layout, ops.ignore_index, ops.acc_dtype))
        rejected = chunk.passes[chunk.n_chosen_passes :]
        deferred = DeferredScale(self.sink, _input.shape[1], both_rows, last_run_start=rejected[-1].tokens.start)
        # the chosen row's coefficient is c (times valid); with both rows, c / n_chosen and -c / n_rejected, i.e.
        # s * (1, -n_chosen / n_rejected) with s = c / n_chosen: unit-sized unscaled gradients, which a float16
        # gradient holds without underflowing sooner than the scaled one would
        unit_coef = stats.valid.to(ops.acc_dtype)
        if both_rows:
            unit_coef[1] *= -(self.row_norm[0] / self.row_norm[1]) if self.row_norm is not None else -1.0
        for piece in chunk.passes[: chunk.n_chosen_passes] + (rejected[:-1] if both_rows else []):
            self.add_unscaled_run(stats, deferred, piece, unit_coef)
        if not both_rows:
            stats.add_passes(ops, _input, rejected, keep_last=True)
            d_logps, norm_chunk = self.losses(chunk, stats)
            self.gradients(chunk, stats, d_logps, norm_chunk, deferred)
            return
        # the last run's statistics complete the pair's: the scale is known before its gradient (c = -d loss/d
        # chosen = d loss/d rejected; scale c / n_chosen), so its weight product applies it to the accumulator
        last_pass = stats.add_pass(ops, _input, rejected[-1])
        d_logps, _ = self.losses(chunk, stats)
        coef = -d_logps[0] / self.row_norm[0] if self.row_norm is not None else -d_logps[0]
        weight_scale = deferred.host_scale(coef)
        self.add_unscaled_run(stats, deferred, rejected[-1], unit_coef, last_pass, weight_scale)
        del last_pass  # the run's logits: freed before finish allocates its rounding temporary
        deferred.finish(coef)

    def add_unscaled_run(self, stats: ChunkStatistics, deferred: DeferredScale, piece, unit_coef: torch.Tensor,
                         computed: Optional[PassLogits] = None, weight_scale=None) -> None:
        """One run's statistics (unless ``computed`` already) and unscaled gradient, contracted by ``deferred``."""
        x_pass, logits = computed if computed is not None else stats.add_pass(self.ops, self.layout.input, piece)
        grad_logits = stats.gradient_(self.ops, logits, piece, piece.gather(unit_coef, local=True))
        del logits, computed
        deferred.add(piece, grad_logits, x_pass, weight_scale)

    def losses(self, chunk: Chunk, stats: ChunkStatistics):
        """Add the chunk's log-probs, logit sums, pair loss, rewards and NLL to the totals; returns
        ``(d loss / d logps, the chunk's row normalisers or None)``."""
        start, end, n_pairs, totals, params = chunk.start, chunk.end, self.layout.n_pairs, self.totals, self.params
        pairs = end - start
        # the chunk's chosen rows, then its rejected rows (a view when the chunk holds every pair)
        norm_chunk = self.row_norm.view(2, n_pairs)[:, start:end].reshape(-1) if self.row_norm is not None else None
        token_logp = (stats.target_logit - stats.lse) * stats.valid
        logp_sum = token_logp.sum(dim=1)
        logps = logp_sum / norm_chunk if norm_chunk is not None else logp_sum
        totals.row_logps[start:end], totals.row_logps[n_pairs + start : n_pairs + end] = logps[:pairs], logps[pairs:]
        totals.logit_sums += stats.logit_sum.view(2, -1).sum(dim=1)

        pairs_with_tokens = self.host_checks.checked_pairs_with_tokens()[start:end]
        pair_loss, d_logps, rewards = params.pair_loss(logps, start, end, pairs_with_tokens, self.layout.full_target,
                                                       self.needs_any_grad)
        totals.chosen_rewards[start:end], totals.rejected_rewards[start:end] = rewards
        totals.loss += pair_loss
        nll_chunk = -logp_sum[:pairs].sum() / self.n_chosen_tokens
        if params.compute_nll_loss:
            totals.loss += params.alpha * nll_chunk
        totals.nll += nll_chunk
        return d_logps, norm_chunk

    def gradients(self, chunk: Chunk, stats: ChunkStatistics, d_logps: torch.Tensor,
                  norm_chunk: Optional[torch.Tensor], deferred: Optional[DeferredScale]) -> None:
        """``dL/dlogits`` of every pass not yet contracted, contracted into the gradient sink."""
        # dL/dlogits[t] = coef[t] * (softmax - onehot); d logp_row / d logits[t] = -(softmax - onehot)/norm
        row_coef = -d_logps / norm_chunk if norm_chunk is not None else -d_logps
        if self.params.compute_nll_loss:
            row_coef[: chunk.end - chunk.start] += self.params.alpha / self.n_chosen_tokens
        coef = row_coef.unsqueeze(1) * stats.valid
        weight_acc_scale = None
        if deferred:
            deferred.finish(row_coef[0])
            weight_acc_scale = deferred.host_scale(row_coef[0])
        last_pass = stats.last_pass
        stats.last_pass = None
        for piece in reversed(chunk.passes[chunk.n_chosen_passes :] if deferred else chunk.passes):
            if last_pass is not None:
                x_pass, logits = last_pass
                last_pass = None
            else:  # token mode: recompute this run's logits now that the sequence coefficients are known
                x_pass, logits = pass_logits(self.ops, self.layout.input, piece)
            pass_coef = piece.gather(coef, local=True)
            grad_logits = stats.gradient_(self.ops, logits, piece, pass_coef)
            del logits
            self.sink.add(piece, grad_logits, x_pass, weight_acc_scale,
                          pass_coef if self.ops.filters_gradient else None)
            weight_acc_scale = None  # the chosen row's products are scaled by the first product alone
            del grad_logits, x_pass
