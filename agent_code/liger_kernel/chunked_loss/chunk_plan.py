"""The chunk plan: which rows and tokens each logits GEMM covers, for a padded ``(2B, T, H)`` batch or a packed one.

A chunk covers pairs ``[start, end)``; its ``passes`` are the pieces of the input whose logits exist together
(one GEMM each). Every piece, padded (:class:`Piece`) or packed (:class:`SpanPiece`), answers the same two
questions: :meth:`gather` its tokens of a tensor (the input, or the chunk's ``(2p, T)`` statistics with
``local=True``) flattened to ``(tokens, ...)``, and :meth:`scatter_` values back there. A chunk lays out those
statistics itself (:meth:`Chunk.per_token_arrays`: its target rows, their validity, and the arrays its passes fill).

A packed ("padding-free") batch holds 2B sequences end to end in one flat ``(N, H)`` input: sequence ``s`` holds
the flat tokens ``[offsets[s], offsets[s + 1])``; sequences ``[0, B)`` are the chosen answers, ``[B, 2B)`` the
rejected ones, pair ``i`` = sequences ``i`` and ``B + i``. A chunk of pairs ``[start, end)`` then covers two
contiguous flat spans (its chosen sequences, then its rejected ones), so the GEMM input of a pass is a view of the
packed input (two slices concatenated at most) and its input gradient two slice copies: nothing is ever padded
to the longest sequence except the chunk's per-token statistics ``(2p, T_chunk)`` (a few float32 values per
position, never ``H`` or ``V`` of them). Those statistics are written and read through the flat positions of
the chunk's real tokens, so the chunk loop (row sums over dim 1, per-row coefficients) is the padded batch's,
with the padding positions of the statistics left at zero and ignored.
"""
import operator
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class Piece:
    """One pass of a padded chunk: rows ``rows`` (slices of ``_input``'s rows, in order) at positions ``tokens``;
    ``local_rows`` (contiguous) index the same rows in the chunk's (2p, T) arrays."""

    rows: Tuple[slice, ...]
    tokens: slice
    local_rows: slice

    def gather(self, tensor: torch.Tensor, local: bool = False) -> torch.Tensor:
        """The piece's rows/tokens of ``tensor``, flattened to (tokens, ...) (a view for one row span)."""
        parts = [view.reshape(-1, *tensor.shape[2:]) for view in self._views(tensor, local)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def scatter_(self, tensor: torch.Tensor, values: torch.Tensor, local: bool = False) -> None:
        """Inverse of :meth:`gather`: write ``values`` (tokens, ...) back into ``tensor``."""
        offset = 0
        for view in self._views(tensor, local):
            n = view.shape[0] * view.shape[1]
            view.copy_(values[offset : offset + n].view(view.shape))
            offset += n

    def _views(self, tensor: torch.Tensor, local: bool) -> List[torch.Tensor]:
        return [tensor[self.local_rows, self.tokens]] if local else [tensor[rows, self.tokens] for rows in self.rows]


@dataclass(frozen=True)
class Chunk:
    """Pairs ``[start, end)``; ``passes`` lists the pieces whose logits exist together (one GEMM each)."""

    start: int
    end: int
    passes: List[Any]  # Piece, or SpanPiece for a packed batch
    #: token mode: the passes over the chosen row come first, this many (pair mode: 0, its pass covers both halves)
    n_chosen_passes: int = 0

    #: every position of the chunk's (2p, T) statistics is written by a pass (a packed chunk's are not)
    covers_every_position = True

    def target_rows(self, target: torch.Tensor, n_pairs: int, ignore_index: int) -> torch.Tensor:
        """The chunk's (2p, T) targets: its chosen rows, then its rejected rows."""
        return pair_rows(target, self.start, self.end, n_pairs)

    def per_token_arrays(self, layout: "BatchLayout", ignore_index: int,
                         dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
        """The chunk's (2p, T) per-token arrays, in the order ``(target, valid, lse, target_logit, logit_sum)``:
        its target rows, where they are not ``ignore_index``, and three arrays in ``dtype`` for the passes'
        statistics, zero where no pass writes."""
        target_chunk = self.target_rows(layout.target, layout.n_pairs, ignore_index)
        # positions no pass writes (a packed chunk's padding) must read as zero in the row sums
        allocate = torch.empty if self.covers_every_position else torch.zeros
        per_token = [allocate(target_chunk.shape, dtype=dtype, device=layout.input.device) for _ in range(3)]
        return (target_chunk, target_chunk != ignore_index, *per_token)


def _rows(*spans: slice) -> Tuple[slice, ...]:
    """Row spans with those that continue each other merged (a whole-batch chunk's chosen and rejected rows)."""
    merged = [spans[0]]
    for span in spans[1:]:
        if merged[-1].stop == span.start:
            merged[-1] = slice(merged[-1].start, span.stop)
        else:
            merged.append(span)
    return tuple(merged)


def plan_chunks(n_pairs: int, seq_len: int, vocab: int, chunk_size: int, logits_element_size: int,
                budget_bytes: int, chunk_size_is_minimum: bool = False) -> List[Chunk]:
    """Split the batch so that no chunk's logits exceed ``budget_bytes`` (down to one token per pass).

    Pair mode: ``chunk_size`` pairs per chunk (fewer if their logits exceed the budget), one pass each.
    With ``chunk_size_is_minimum`` (the CUDA fast path) ``chunk_size`` is a floor, not the size: as many pairs as
    the budget holds, at least ``chunk_size`` unless that exceeds the budget (fewer, larger GEMMs and fewer
    float32 passes over the weight gradient).
    Token mode (one pair's logits exceed the budget): one pair per chunk, each of its two rows cut into
    runs of tokens whose logits fit the budget; the chunk then needs the statistics of every run before
    any gradient exists, so its logits are computed twice.
    """
    if seq_len == 0:  # no positions, no logits: nothing to plan
        return []
    pair_bytes = 2 * seq_len * vocab * logits_element_size
    chunks = []
    if pair_bytes <= budget_bytes:
        fitting = budget_bytes // pair_bytes
        pairs_per_chunk = max(1, fitting if chunk_size_is_minimum else min(chunk_size, fitting))
        for start in range(0, n_pairs, pairs_per_chunk):
            end = min(start + pairs_per_chunk, n_pairs)
            rows = _rows(slice(start, end), slice(n_pairs + start, n_pairs + end))
            chunks.append(Chunk(start, end, [Piece(rows, slice(0, seq_len), slice(0, 2 * (end - start)))]))
        return chunks
    tokens = max(1, budget_bytes // (vocab * logits_element_size))
    if tokens >= 128:
        tokens -= tokens % 128  # GEMM-friendly run length
    runs_per_row = -(-seq_len // tokens)
    for pair in range(n_pairs):
        passes = [
            Piece((slice(row, row + 1),), slice(t0, min(t0 + tokens, seq_len)), slice(local, local + 1))
            for local, row in enumerate((pair, n_pairs + pair))
            for t0 in range(0, seq_len, tokens)
        ]
        chunks.append(Chunk(pair, pair + 1, passes, n_chosen_passes=runs_per_row))
    return chunks


def pair_rows(tensor: torch.Tensor, start: int, end: int, n_pairs: int) -> torch.Tensor:
    """Rows of pairs [start, end) of a (2B, ...) tensor: chosen then rejected (the tensor itself for all pairs)."""
    if end - start == n_pairs:
        return tensor
    return torch.cat((tensor[start:end], tensor[n_pairs + start : n_pairs + end]))


# --- packed batches -------------------------------------------------------------------------------------------


def _range_or_index(positions: torch.Tensor):
    """A slice when ``positions`` (host int64) are consecutive (a view then serves), else the index itself."""
    if positions.numel() and int(positions[-1]) - int(positions[0]) == positions.numel() - 1:
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


@dataclass(eq=False)
class SpanPiece:
    """One pass of a packed chunk: the flat input tokens ``spans`` (in order), which are the chunk's
    statistics positions ``local`` (a slice or a device index into the flattened ``(2p, T_chunk)`` arrays)."""

    spans: Tuple[slice, ...]
    local: object  # slice or torch.Tensor
    local_rows: slice  # the chunk's rows the pass touches (chosen rows first), as Piece.local_rows

    def gather(self, tensor: torch.Tensor, local: bool = False) -> torch.Tensor:
        """The pass's values of a chunk array (``local``) or of the flat input, flattened to (tokens, ...)."""
        if local:
            flat = tensor.reshape(-1, *tensor.shape[2:])
            return flat[self.local] if isinstance(self.local, slice) else flat.index_select(0, self.local)
        parts = [tensor[span] for span in self.spans]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def scatter_(self, tensor: torch.Tensor, values: torch.Tensor, local: bool = False) -> None:
        """Inverse of :meth:`gather`: write ``values`` (tokens, ...) back."""
        if local:
            flat = tensor.view(-1, *tensor.shape[2:])
            if isinstance(self.local, slice):
                flat[self.local].copy_(values)
            else:
                flat.index_copy_(0, self.local, values.to(flat.dtype))
            return
        offset = 0
        for span in self.spans:
            n = span.stop - span.start
            tensor[span].copy_(values[offset : offset + n])
            offset += n


@dataclass(frozen=True, eq=False)
class PackedChunk(Chunk):
    """A chunk of pairs of a packed batch. Its statistics are ``(2p, T_chunk)`` arrays, ``T_chunk`` the chunk's
    longest sequence; ``token_index`` holds the flattened positions of its real tokens in that layout."""

    seq_len: int = 0
    spans: Tuple[slice, ...] = ()  # the chunk's flat tokens: chosen sequences, then rejected ones
    token_index: object = None  # slice or device tensor

    covers_every_position = False  # the statistics' padding positions must start at zero

    def target_rows(self, target: torch.Tensor, n_pairs: int, ignore_index: int) -> torch.Tensor:
        rows = torch.full((2 * (self.end - self.start), self.seq_len), ignore_index, dtype=target.dtype,
                          device=target.device)
        SpanPiece(self.spans, self.token_index, slice(None)).scatter_(
            rows, SpanPiece(self.spans, None, slice(None)).gather(target, local=False), local=True)
        return rows


def sequence_offsets_list(offsets, n_tokens: int) -> List[int]:
    """``offsets`` (a 1-D integer tensor or sequence of 2B + 1 ints) as host ints, checked: they start at 0, end at
    ``n_tokens`` and increase strictly (every sequence holds at least one token), and 2B is even and non-zero."""
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 1 or offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
            raise ValueError(f"sequence_offsets must be a 1-D integer tensor, got {offsets.dtype} of shape "
                             f"{tuple(offsets.shape)}")
        offsets = offsets.tolist()
    try:
        offsets = list(offsets)
        if any(isinstance(o, bool) for o in offsets):
            raise TypeError
        # operator.index, not int: a fractional offset (2.5) must not be silently truncated to a token
        offsets = [operator.index(o) for o in offsets]
    except TypeError:
        raise ValueError(f"sequence_offsets must be a 1-D integer tensor or a sequence of ints, got "
                         f"{offsets!r}") from None
    n_sequences = len(offsets) - 1
    if n_sequences < 2 or n_sequences % 2:
        raise ValueError(f"sequence_offsets must hold 2B + 1 offsets (B chosen then B rejected sequences, B >= 1), "
                         f"got {len(offsets)} values")
    if offsets[0] != 0 or offsets[-1] != n_tokens:
        raise ValueError(f"sequence_offsets must start at 0 and end at the number of packed tokens {n_tokens}, got "
                         f"{offsets[0]} ... {offsets[-1]}")
    for s, (a, b) in enumerate(zip(offsets, offsets[1:])):
        if b <= a:
            raise ValueError(f"sequence_offsets must increase strictly (every sequence holds a token); sequence "
                             f"{s} spans [{a}, {b})")
    return offsets


def _chunk(start: int, end: int, rows: Sequence[int], offsets: List[int], passes_runs, device) -> PackedChunk:
    """A chunk over pairs ``[start, end)`` whose local rows ``rows`` (chosen, then rejected) are cut into
    ``passes_runs``: per pass, a list of ``(local_row, t0, t1)`` token runs."""
    lengths = [offsets[r + 1] - offsets[r] for r in rows]
    seq_len = max(lengths)
    passes, all_positions = [], []
    for runs in passes_runs:
        positions = torch.cat([torch.arange(t0, t1) + k * seq_len for k, t0, t1 in runs])
        spans = []
        for k, t0, t1 in runs:  # merge runs that continue each other in the flat input
            first = offsets[rows[k]]
            if spans and spans[-1].stop == first + t0:
                spans[-1] = slice(spans[-1].start, first + t1)
            else:
                spans.append(slice(first + t0, first + t1))
        local_rows = slice(runs[0][0], runs[-1][0] + 1)
        local = _range_or_index(positions)
        passes.append(SpanPiece(tuple(spans), local if isinstance(local, slice) else local.to(device), local_rows))
        all_positions.append(positions)
    token_index = _range_or_index(torch.cat(all_positions))
    if not isinstance(token_index, slice):
        token_index = token_index.to(device)
    n_pairs = (len(offsets) - 1) // 2
    spans = (slice(offsets[start], offsets[end]), slice(offsets[n_pairs + start], offsets[n_pairs + end]))
    n_chosen_passes = sum(1 for runs in passes_runs if runs[-1][0] < end - start)  # passes over chosen rows alone
    return PackedChunk(start, end, passes, n_chosen_passes, seq_len=seq_len, spans=spans, token_index=token_index)


def plan_packed_chunks(offsets: List[int], vocab: int, chunk_size: int, logits_element_size: int,
                       budget_bytes: int, device: torch.device, chunk_size_is_minimum: bool = False) -> List[PackedChunk]:
    """Split a packed batch so that no pass's logits exceed ``budget_bytes``, counting real tokens only.

    Pair mode: consecutive pairs while their tokens' logits fit the budget, at most ``chunk_size`` pairs (as
    many as fit with ``chunk_size_is_minimum``), one pass each. Token mode (one pair's logits exceed the budget): that pair
    alone, each of its two sequences cut into runs of tokens that fit, as in :func:`plan_chunks`.
    """
    n_pairs = (len(offsets) - 1) // 2
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    max_tokens = max(1, budget_bytes // (vocab * logits_element_size))
    run = max_tokens - max_tokens % 128 if max_tokens >= 128 else max_tokens  # GEMM-friendly run length
    chunks, start = [], 0
    while start < n_pairs:
        rows_of = lambda s, e: list(range(s, e)) + list(range(n_pairs + s, n_pairs + e))  # noqa: E731
        pair_tokens = lengths[start] + lengths[n_pairs + start]
        if pair_tokens > max_tokens:
            rows = rows_of(start, start + 1)
            passes = [[(k, t0, min(t0 + run, lengths[row]))] for k, row in enumerate(rows)
                      for t0 in range(0, lengths[row], run)]
            chunks.append(_chunk(start, start + 1, rows, offsets, passes, device))
            start += 1
            continue
        end, tokens = start + 1, pair_tokens
        while end < n_pairs and (chunk_size_is_minimum or end - start < chunk_size):
            more = lengths[end] + lengths[n_pairs + end]
            if tokens + more > max_tokens:
                break
            tokens, end = tokens + more, end + 1
        rows = rows_of(start, end)
        chunks.append(_chunk(start, end, rows, offsets, [[(k, 0, lengths[row]) for k, row in enumerate(rows)]],
                             device))
        start = end
    return chunks


def row_token_counts(target: torch.Tensor, offsets: List[int], ignore_index: int) -> torch.Tensor:
    """(2B,) number of non-ignored targets of each sequence of the flat ``target`` (N,), on its device."""
    cumulative = torch.cat((target.new_zeros(1), (target != ignore_index).cumsum(0)))
    bounds = torch.tensor(offsets, device=target.device)
    return cumulative[bounds[1:]] - cumulative[bounds[:-1]]


# --- one call's batch -----------------------------------------------------------------------------------------


@dataclass
class BatchLayout:
    """How one call's batch meets the chunk loop: padded ``(2B, T, ...)`` rows, or a packed batch's flat tokens."""

    input: torch.Tensor  # (2B, T, H), or the flat (N, H) of a packed batch
    target: torch.Tensor  # int64, laid out like ``input``
    n_pairs: int
    plan: List[Chunk]
    token_counts: Optional[torch.Tensor]  # (2B,) real tokens per row when known here (packed), else None
    positions: Any  # logit positions the logits means divide by: one int per half, or (chosen, rejected)
    full_target: torch.Tensor  # what preference_loss_fn gets as full_target (its shape[0] is 2B)

    @property
    def packed(self) -> bool:
        return self.token_counts is not None

    @property
    def n_passes(self) -> int:
        """How many logits GEMMs the plan makes at least (one weight-gradient product each)."""
        return sum(len(chunk.passes) for chunk in self.plan)


def lay_out_batch(_input, target, ops, params, offsets: Optional[List[int]]) -> BatchLayout:
    """The chunk plan of one call: ``ops`` (a logit_ops implementation) gives the logits' element size and whether
    ``chunk_size`` is a minimum, ``params`` (``FusedLossParams``) the chunk size and the budget; ``offsets``: the
    2B + 1 sequence offsets of a packed batch, else None."""
    vocab, budget = ops.weight.shape[0], params.logits_budget_bytes
    if offsets is None:
        n_pairs, seq_len = _input.shape[0] // 2, _input.shape[1]
        plan = plan_chunks(n_pairs, seq_len, vocab, params.chunk_size, ops.logits_element_size, budget,
                           ops.chunk_size_is_minimum)
        return BatchLayout(_input, target, n_pairs, plan, None, n_pairs * seq_len * vocab, target)
    # one flat (N, H) input; chunks cover flat spans
    n_pairs = (len(offsets) - 1) // 2
    flat_input, flat_target = _input.reshape(-1, _input.shape[-1]), target.reshape(-1)
    plan = plan_packed_chunks(offsets, vocab, params.chunk_size, ops.logits_element_size, budget, _input.device,
                              ops.chunk_size_is_minimum)
    positions = (offsets[n_pairs] * vocab, (offsets[-1] - offsets[n_pairs]) * vocab)
    # preference_loss_fn divides by full_target.shape[0] // 2, so it gets 2B rows: a broadcast view of the
    # packed target (no copy; only its shape is meaningful)
    return BatchLayout(flat_input, flat_target, n_pairs, plan, row_token_counts(flat_target, offsets,
                                                                                 params.ignore_index),
                       positions, flat_target.expand(2 * n_pairs, -1))
