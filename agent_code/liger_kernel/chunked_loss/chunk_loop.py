"""One forward call's chunk loop: each chunk's log-probs, pair loss, NLL and, when asked for, gradients."""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from agent_code.liger_kernel.chunked_loss.chunk_plan import Chunk, Piece, chosen_passes, pair_rows, rejected_passes
from agent_code.liger_kernel.chunked_loss.chunk_statistics import (
    ChunkStatistics,
    LossTotals,
    chunk_statistics,
    pass_logits,
)
from agent_code.liger_kernel.chunked_loss.gradient_sinks import DeferredChosenScale, GradientSink
from agent_code.liger_kernel.chunked_loss.host_sync import HostChecks


def first_passes(chunk: Chunk, defer_chosen_scale: bool) -> Optional[List[List[Piece]]]:
    """Passes whose statistics come first: all (None; logits of the last kept), or, when the chosen row's
    scale is deferred (single-pair token mode), the rejected row's alone."""
    return rejected_passes(chunk) if defer_chosen_scale and len(chunk.passes) > 1 else None


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
    defer_chosen_scale: bool  # the knob, already combined with "one pair, gradients needed"
    n_chosen_tokens: torch.Tensor  # NLL normaliser: the chosen tokens of the whole batch, never of a chunk
    row_norm: Optional[torch.Tensor]  # (2B,) token counts (at least 1) when log-probs are averaged, else None
    #: what ``preference_loss_fn`` receives as ``full_target`` (its ``shape[0]`` is 2B); None: ``target``
    full_target: Optional[torch.Tensor] = None

    @property
    def n_pairs(self) -> int:
        return self.totals.chosen_rewards.shape[0]  # not _input's rows: a packed batch is one flat row

    def statistics(self, chunk: Chunk) -> ChunkStatistics:
        return chunk_statistics(self.ops, self._input, self.target, chunk, self.n_pairs, self.ignore_index,
                                self.acc_dtype, first_passes(chunk, self.defer_chosen_scale))

    def run(self, plan: List[Chunk], first_stats: Optional[ChunkStatistics]) -> None:
        """Every chunk of ``plan`` in turn; ``first_stats`` are the first chunk's, already on the device."""
        for index, chunk in enumerate(plan):
            stats = first_stats if index == 0 else self.statistics(chunk)
            first_stats = None
            deferred = self.chosen_row_unscaled(chunk, stats) \
                if self.defer_chosen_scale and len(chunk.passes) > 1 else None
            d_logps, norm_chunk = self.losses(chunk, stats)
            if self.needs_any_grad:
                self.gradients(chunk, stats, d_logps, norm_chunk, deferred)
            del stats

    def chosen_row_unscaled(self, chunk: Chunk, stats: ChunkStatistics) -> DeferredChosenScale:
        """The chosen row's statistics and unscaled gradient from one logits GEMM per run (its scale follows)."""
        deferred = DeferredChosenScale(self.sink, self._input.shape[1], self.acc_dtype)
        unit_coef = stats.valid.to(self.acc_dtype)
        for pieces in chosen_passes(chunk):
            x_pass, logits = stats.add_pass(self.ops, self._input, pieces)
            grad_logits = stats.gradient_(self.ops, logits, pieces, unit_coef)
            del logits
            deferred.add(pieces, grad_logits, x_pass)
            del grad_logits, x_pass
        return deferred

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
                  norm_chunk: Optional[torch.Tensor], deferred: Optional[DeferredChosenScale]) -> None:
        """``dL/dlogits`` of every pass not yet contracted, contracted into the gradient sink."""
        # dL/dlogits[t] = coef[t] * (softmax - onehot); d logp_row / d logits[t] = -(softmax - onehot)/norm
        row_coef = -d_logps / norm_chunk if norm_chunk is not None else -d_logps
        if self.compute_nll_loss:
            row_coef[: chunk.end - chunk.start] += self.alpha / self.n_chosen_tokens
        coef = row_coef.unsqueeze(1) * stats.valid
        weight_acc_scale = deferred.finish(row_coef[0], defer_host=self.ops.defers_host_checks) \
            if deferred else None
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
