"""The chunk plan: which rows and tokens each logits GEMM covers, and how to gather and scatter them."""
from dataclasses import dataclass
from typing import List

import torch


@dataclass(frozen=True)
class Piece:
    """Rows ``rows`` (of ``_input``) at positions ``tokens``; ``local_rows`` index the chunk's (2p, T) arrays."""

    rows: slice
    tokens: slice
    local_rows: slice


@dataclass(frozen=True)
class Chunk:
    """Pairs ``[start, end)``; ``passes`` lists the pieces whose logits exist together (one GEMM each)."""

    start: int
    end: int
    passes: List[List[Piece]]

    #: every position of the chunk's (2p, T) statistics is written by a pass (a packed chunk's are not)
    covers_every_position = True

    def target_rows(self, target: torch.Tensor, n_pairs: int, ignore_index: int) -> torch.Tensor:
        """The chunk's (2p, T) targets: its chosen rows, then its rejected rows."""
        return pair_rows(target, self.start, self.end, n_pairs)


def plan_chunks(n_pairs: int, seq_len: int, vocab: int, chunk_size: int, logits_element_size: int,
                budget_bytes: int, fill_budget: bool = False) -> List[Chunk]:
    """Split the batch so that no chunk's logits exceed ``budget_bytes`` (down to one token per pass).

    Pair mode: ``chunk_size`` pairs per chunk (fewer if their logits exceed the budget), one pass each;
    with ``fill_budget`` (the CUDA fast path) as many pairs as the budget holds, at least ``chunk_size``
    unless that exceeds the budget: fewer, larger GEMMs and fewer float32 passes over the weight gradient.
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
        pairs_per_chunk = max(1, fitting if fill_budget else min(chunk_size, fitting))
        for start in range(0, n_pairs, pairs_per_chunk):
            end = min(start + pairs_per_chunk, n_pairs)
            p, whole = end - start, slice(0, seq_len)
            pieces = [Piece(slice(start, end), whole, slice(0, p)),
                      Piece(slice(n_pairs + start, n_pairs + end), whole, slice(p, 2 * p))]
            chunks.append(Chunk(start, end, [pieces]))
        return chunks
    tokens = max(1, budget_bytes // (vocab * logits_element_size))
    if tokens >= 128:
        tokens -= tokens % 128  # GEMM-friendly run length
    for pair in range(n_pairs):
        passes = [
            [Piece(slice(row, row + 1), slice(t0, min(t0 + tokens, seq_len)), slice(local, local + 1))]
            for local, row in enumerate((pair, n_pairs + pair))
            for t0 in range(0, seq_len, tokens)
        ]
        chunks.append(Chunk(pair, pair + 1, passes))
    return chunks


def piece_views(tensor: torch.Tensor, pieces: List[Piece], local: bool) -> List[torch.Tensor]:
    """The (rows, tokens, ...) views of ``tensor`` named by ``pieces``; pieces that continue each other's rows
    over the same tokens (a pair chunk's chosen and rejected rows, locally or in a whole-batch chunk) are one."""
    spans = []
    for p in pieces:
        rows = p.local_rows if local else p.rows
        if spans and spans[-1][0].stop == rows.start and spans[-1][1] == p.tokens:
            spans[-1] = (slice(spans[-1][0].start, rows.stop), p.tokens)
        else:
            spans.append((rows, p.tokens))
    return [tensor[rows, tokens] for rows, tokens in spans]


def gather_pieces(tensor: torch.Tensor, pieces: List[Piece], local: bool = False) -> torch.Tensor:
    """Rows/tokens of ``tensor`` named by ``pieces``, flattened to (tokens, ...) (a view for one span)."""
    if not isinstance(pieces[0], Piece):  # a packed batch's pass (packed_plan.SpanPiece)
        (piece,) = pieces
        return piece.gather(tensor, local)
    parts = [part.reshape(-1, *tensor.shape[2:]) for part in piece_views(tensor, pieces, local)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def scatter_pieces_(tensor: torch.Tensor, pieces: List[Piece], values: torch.Tensor, local: bool = False) -> None:
    """Inverse of :func:`gather_pieces`: write ``values`` (tokens, ...) back into ``tensor``."""
    if not isinstance(pieces[0], Piece):
        (piece,) = pieces
        piece.scatter_(tensor, values, local)
        return
    offset = 0
    for view in piece_views(tensor, pieces, local):
        n = view.shape[0] * view.shape[1]
        view.copy_(values[offset : offset + n].view(view.shape))
        offset += n


def pair_rows(tensor: torch.Tensor, start: int, end: int, n_pairs: int) -> torch.Tensor:
    """Rows of pairs [start, end) of a (2B, ...) tensor: chosen then rejected (the tensor itself for all pairs)."""
    if end - start == n_pairs:
        return tensor
    return torch.cat((tensor[start:end], tensor[n_pairs + start : n_pairs + end]))


def chosen_passes(chunk: Chunk) -> List[List[Piece]]:
    """Token mode: the passes over the chunk's chosen row (its pieces have local row 0)."""
    return [pieces for pieces in chunk.passes if pieces[0].local_rows.start < chunk.end - chunk.start]


def rejected_passes(chunk: Chunk) -> List[List[Piece]]:
    return [pieces for pieces in chunk.passes if pieces[0].local_rows.start >= chunk.end - chunk.start]
