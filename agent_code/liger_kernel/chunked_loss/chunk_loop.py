"""One forward call's chunk loop: each chunk's log-probs, pair loss, NLL and, when asked for, gradients."""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from agent_code.liger_kernel.chunked_loss.chunk_plan import Chunk, Piece, chosen_passes, pair_rows, rejected_passes
from agent_code.liger_kernel.chunked_loss.chunk_statistics import (
    ChunkStatistics,
    LossTotals,
    add_passes,
    chunk_statistics,
    new_chunk_statistics,
    pass_logits,
)
from agent_code.liger_kernel.chunked_loss.gradient_sinks import DeferredScale, GradientSink
from agent_code.liger_kernel.chunked_loss.host_sync import HostChecks

#: single-pair token mode: contract the chosen row before its scale is known (``DeferredScale``)
DEFER_CHOSEN = "chosen"
#: single-pair token mode: contract both rows before their (tied) scale is known
DEFER_PAIR = "pair"


def is_deferred(chunk: Chunk, deferral: Optional[str]) -> bool:
    """Whether ``chunk`` runs the deferred-scale scheme: a token-mode chunk (several passes) of a deferral."""
    return deferral is not None and len(chunk.passes) > 1


@dataclass
class ChunkLoop:
    """The state one forward call's chunks share, and the steps each chunk goes through."""

    pair_loss_and_grad: Callable  # the Function's ``_pair_loss_and_grad``
    ops: Any  # a logit_ops implementation
    _input: torch.Tensor
    target: torch.Tensor  # int64
    ignore_index: int
    acc_dtype: torch.dtype
    host_checks: HostChecks
    totals: LossTotals
    sink: GradientSink
    alpha: float
    compute_nll_loss: bool
    loss_kwargs: Dict[str, Any]
    pair_kwargs: Dict[str, torch.Tensor]
    needs_any_grad: bool
    deferral: Optional[str]  # DEFER_CHOSEN, DEFER_PAIR or None, already combined with "one pair, gradients needed"
    n_chosen_tokens: torch.Tensor  # NLL normaliser: the chosen tokens of the whole batch, never of a chunk
    row_norm: Optional[torch.Tensor]  # (2B,) token counts (at least 1) when log-probs are averaged, else None
    #: what ``preference_loss_fn`` receives as ``full_target`` (its ``shape[0]`` is 2B); None: ``target``
    full_target: Optional[torch.Tensor] = None

    @property
    def n_pairs(self) -> int:
        return self.totals.chosen_rewards.shape[0]  # not _input's rows: a packed batch is one flat row

    def run(self, plan: List[Chunk], first_stats: Optional[ChunkStatistics]) -> None:
        """Every chunk of ``plan`` in turn; ``first_stats`` are the first chunk's, already on the device (None
        for a deferred chunk)."""
        for index, chunk in enumerate(plan):
            if is_deferred(chunk, self.deferral):
                self.run_deferred(chunk)
                continue
            stats = first_stats if index == 0 else chunk_statistics(
                self.ops, self._input, self.target, chunk, self.n_pairs, self.ignore_index, self.acc_dtype)
            first_stats = None
            d_logps, norm_chunk = self.losses(chunk, stats)
            if self.needs_any_grad:
                self.gradients(chunk, stats, d_logps, norm_chunk, None)
            del stats

    def run_deferred(self, chunk: Chunk) -> None:
        """Single-pair token mode with deferred scales (``DeferredScale``): the chosen row's runs give their
        statistics and unscaled gradients at once, then the rejected row's runs give their statistics, and,
        with ``DEFER_PAIR``, their unscaled gradients too; otherwise the last one's logits are kept and the
        others recomputed once the coefficients are known."""
        both_rows = self.deferral == DEFER_PAIR
        stats = new_chunk_statistics(self._input, self.target, chunk, self.n_pairs, self.ignore_index,
                                     self.acc_dtype)
        rejected = rejected_passes(chunk)
        deferred = DeferredScale(self.sink, self._input.shape[1], self.acc_dtype, both_rows,
                                 last_run_start=rejected[-1][0].tokens.start)
        # the chosen row's coefficient is c (times valid); with both rows, c / n_chosen and -c / n_rejected, i.e.
        # s * (1, -n_chosen / n_rejected) with s = c / n_chosen: unit-sized unscaled gradients, which a float16
        # gradient holds without underflowing sooner than the scaled one would
        unit_coef = stats.valid.to(self.acc_dtype)
        if both_rows:
            unit_coef[1] *= -(self.row_norm[0] / self.row_norm[1]) if self.row_norm is not None else -1.0
        for pieces in chosen_passes(chunk) + (rejected[:-1] if both_rows else []):
            self.add_unscaled_run(stats, deferred, pieces, unit_coef)
        if not both_rows:
            add_passes(stats, self.ops, self._input, rejected, keep_last=True)
            d_logps, norm_chunk = self.losses(chunk, stats)
            self.gradients(chunk, stats, d_logps, norm_chunk, deferred)
            return
        # the last run's statistics complete the pair's: the scale is known before its gradient (c = -d loss/d
        # chosen = d loss/d rejected; scale c / n_chosen), so its weight product applies it to the accumulator
        last_pass = stats.add_pass(self.ops, self._input, rejected[-1])
        d_logps, _ = self.losses(chunk, stats)
        coef = -d_logps[0] / self.row_norm[0] if self.row_norm is not None else -d_logps[0]
        weight_scale = deferred.host_scale(coef, defer_host=self.ops.defers_host_checks)
        self.add_unscaled_run(stats, deferred, rejected[-1], unit_coef, last_pass, weight_scale)
        del last_pass  # the run's logits: freed before finish allocates its rounding temporary
        deferred.finish(coef)

    def add_unscaled_run(self, stats: ChunkStatistics, deferred: DeferredScale, pieces: List[Piece],
                         unit_coef: torch.Tensor, computed=None, weight_scale=None) -> None:
        """One run's statistics (unless ``computed`` already) and unscaled gradient, contracted by ``deferred``."""
        x_pass, logits = computed if computed is not None else stats.add_pass(self.ops, self._input, pieces)
        grad_logits = stats.gradient_(self.ops, logits, pieces, unit_coef)
        del logits, computed
        deferred.add(pieces, grad_logits, x_pass, weight_scale)

    def losses(self, chunk: Chunk, stats: ChunkStatistics):
        """Add the chunk's log-probs, logit sums, pair loss, rewards and NLL to the totals; returns
        ``(d loss / d logps, the chunk's row normalisers or None)``."""
        start, end, n_pairs, totals = chunk.start, chunk.end, self.n_pairs, self.totals
        pairs = end - start
        norm_chunk = pair_rows(self.row_norm, start, end, n_pairs) if self.row_norm is not None else None
        token_logp = (stats.target_logit - stats.lse) * stats.valid
        logp_sum = token_logp.sum(dim=1)
        logps = logp_sum / norm_chunk if norm_chunk is not None else logp_sum
        totals.row_logps[start:end], totals.row_logps[n_pairs + start : n_pairs + end] = logps[:pairs], logps[pairs:]
        totals.logit_sums += stats.logit_sum.view(2, -1).sum(dim=1)

        chunk_pair_kwargs = {k: v[start:end] for k, v in self.pair_kwargs.items()}
        pairs_with_tokens = self.host_checks.checked_pairs_with_tokens()[start:end]
        pair_loss, d_logps, rewards = self.pair_loss_and_grad(
            logps, pairs, pairs_with_tokens, self.target if self.full_target is None else self.full_target,
            self.loss_kwargs, chunk_pair_kwargs, self.needs_any_grad
        )
        totals.chosen_rewards[start:end], totals.rejected_rewards[start:end] = rewards
        totals.loss += pair_loss
        nll_chunk = -logp_sum[:pairs].sum() / self.n_chosen_tokens
        if self.compute_nll_loss:
            totals.loss += self.alpha * nll_chunk
        totals.nll += nll_chunk
        return d_logps, norm_chunk

    def gradients(self, chunk: Chunk, stats: ChunkStatistics, d_logps: torch.Tensor,
                  norm_chunk: Optional[torch.Tensor], deferred: Optional[DeferredScale]) -> None:
        """``dL/dlogits`` of every pass not yet contracted, contracted into the gradient sink."""
        # dL/dlogits[t] = coef[t] * (softmax - onehot); d logp_row / d logits[t] = -(softmax - onehot)/norm
        row_coef = -d_logps / norm_chunk if norm_chunk is not None else -d_logps
        if self.compute_nll_loss:
            row_coef[: chunk.end - chunk.start] += self.alpha / self.n_chosen_tokens
        coef = row_coef.unsqueeze(1) * stats.valid
        weight_acc_scale = None
        if deferred:
            deferred.finish(row_coef[0])
            weight_acc_scale = deferred.host_scale(row_coef[0], defer_host=self.ops.defers_host_checks)
        last_pass = stats.last_pass
        stats.last_pass = None
        for pieces in reversed(rejected_passes(chunk) if deferred else chunk.passes):
            if last_pass is not None:
                x_pass, logits = last_pass
                last_pass = None
            else:  # token mode: recompute this run's logits now that the sequence coefficients are known
                x_pass, logits = pass_logits(self.ops, self._input, pieces)
            grad_logits = stats.gradient_(self.ops, logits, pieces, coef)
            del logits
            self.sink.add(pieces, grad_logits, x_pass, weight_acc_scale)
            weight_acc_scale = None  # the chosen row's products are scaled by the first product alone
            del grad_logits, x_pass
