"""Per-token statistics of a chunk's logits (log-sum-exp, target logit, logit sum) and the loss totals."""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch

from agent_code.liger_kernel.chunked_loss.chunk_plan import Chunk, Piece, gather_pieces, scatter_pieces_


@dataclass
class ChunkStatistics:
    """A chunk's per-token statistics, (2p, T) each, and the last pass's logits if kept for its gradient."""

    target: torch.Tensor  # (2p, T): the chunk's chosen rows, then its rejected rows
    valid: torch.Tensor
    lse: torch.Tensor
    target_logit: torch.Tensor
    logit_sum: torch.Tensor
    last_pass: Optional["PassLogits"]  # logits of the last pass computed, if kept for the gradient

    def add_pass(self, ops, _input, pieces: List[Piece], computed: Optional["PassLogits"] = None) -> "PassLogits":
        """Logits of one pass (unless ``computed`` already) and their statistics, written into the per-token
        arrays; returns the pass's logits."""
        computed = computed if computed is not None else pass_logits(ops, _input, pieces)
        stats = ops.statistics(computed.logits, gather_pieces(self.target, pieces, local=True))
        for array, values in zip((self.lse, self.target_logit, self.logit_sum), stats):
            scatter_pieces_(array, pieces, values, local=True)
        return computed

    def gradient_(self, ops, logits: torch.Tensor, pieces: List[Piece], coef: torch.Tensor) -> torch.Tensor:
        """``dL/dlogits`` of one pass in place, from its statistics and the chunk's (2p, T) coefficients."""
        return ops.gradient_(logits, gather_pieces(self.lse, pieces, local=True),
                             gather_pieces(self.target, pieces, local=True), gather_pieces(coef, pieces, local=True))


class PassLogits(NamedTuple):
    """One pass's GEMM input (its rows and tokens of ``_input``, flattened) and the logits computed from it."""

    x: torch.Tensor
    logits: torch.Tensor


def pass_logits(ops, _input, pieces: List[Piece]) -> PassLogits:
    """The logits GEMM of one pass's rows and tokens."""
    x_pass = ops.prepare_input(gather_pieces(_input, pieces))
    return PassLogits(x_pass, ops.logits(x_pass))


def new_chunk_statistics(_input, target, chunk: Chunk, n_pairs: int, ignore_index: int,
                         acc_dtype: torch.dtype) -> ChunkStatistics:
    """The chunk's per-token arrays, before any pass has filled them."""
    target_chunk = chunk.target_rows(target, n_pairs, ignore_index)
    # positions no pass writes (a packed chunk's padding) must read as zero in the row sums
    allocate = torch.empty if chunk.covers_every_position else torch.zeros
    per_token = [allocate(target_chunk.shape, dtype=acc_dtype, device=_input.device) for _ in range(3)]
    return ChunkStatistics(target_chunk, target_chunk != ignore_index, *per_token, last_pass=None)


def add_passes(stats: ChunkStatistics, ops, _input, passes: List[List[Piece]], keep_last: bool,
               computed: Optional[PassLogits] = None) -> None:
    """Statistics of ``passes`` in turn (``computed``: the first pass's logits, already launched); with
    ``keep_last`` the last pass's logits stay on ``stats.last_pass`` for its gradient."""
    for pieces in passes:
        stats.last_pass = None  # free the previous pass's logits before the next GEMM allocates its own
        latest = stats.add_pass(ops, _input, pieces, computed)
        computed = None
        stats.last_pass = latest if keep_last else None
        del latest


def chunk_statistics(ops, _input, target, chunk: Chunk, n_pairs: int, ignore_index: int,
                     acc_dtype: torch.dtype) -> ChunkStatistics:
    """Logits and per-token statistics of every pass of ``chunk``; the last pass's logits are kept for the
    gradient."""
    # the first GEMM goes to the device before any bookkeeping launch
    computed = pass_logits(ops, _input, chunk.passes[0])
    stats = new_chunk_statistics(_input, target, chunk, n_pairs, ignore_index, acc_dtype)
    add_passes(stats, ops, _input, chunk.passes, keep_last=True, computed=computed)
    return stats


class LossTotals:
    """The loss and aux outputs, accumulated chunk by chunk on the device."""

    def __init__(self, n_pairs: int, acc_dtype: torch.dtype, device: torch.device):
        self.loss = torch.zeros((), dtype=acc_dtype, device=device)
        self.nll = torch.zeros((), dtype=acc_dtype, device=device)
        self.logit_sums = torch.zeros(2, dtype=acc_dtype, device=device)  # chosen, rejected
        self.row_logps = torch.zeros(2 * n_pairs, dtype=acc_dtype, device=device)
        self.chosen_rewards = torch.zeros(n_pairs, dtype=acc_dtype, device=device)
        self.rejected_rewards = torch.zeros(n_pairs, dtype=acc_dtype, device=device)

    def outputs(self, positions, compute_nll_loss: bool, out_dtype: torch.dtype):
        """``(loss, aux_outputs)`` in ``out_dtype``; ``positions`` (B * T * V) is the count behind each logits
        mean, or a pair of counts (chosen, rejected) (T = 0: a mean over no logits is 0, like an empty row's
        log-prob)."""
        n_pairs = self.chosen_rewards.shape[0]
        chosen_positions, rejected_positions = positions if isinstance(positions, tuple) else (positions, positions)
        aux_outputs = (
            self.row_logps[:n_pairs].to(out_dtype),
            self.row_logps[n_pairs:].to(out_dtype),
            (self.logit_sums[0] / max(chosen_positions, 1)).to(out_dtype),
            (self.logit_sums[1] / max(rejected_positions, 1)).to(out_dtype),
            (self.nll if compute_nll_loss else torch.zeros_like(self.nll)).to(out_dtype),
            self.chosen_rewards.to(out_dtype),
            self.rejected_rewards.to(out_dtype),
        )
        return self.loss.to(out_dtype), aux_outputs
