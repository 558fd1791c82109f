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
See docs/design.md for the derivation and docs/gpu_notes.md for the fast path.
"""
import math
import os
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from agent_code.liger_kernel.chunked_loss.input_checks import raise_for_target_values, validate_preference_inputs
from agent_code.liger_kernel.chunked_loss.logit_ops import matmul_accumulation_dtype, select_logit_ops
from agent_code.liger_kernel.utils import accumulation_dtype


class HostCopy:
    """A small device tensor copied to the host; with ``defer`` (CUDA) queued without waiting.

    The copy goes to pinned memory behind an event, so the host reads it (:meth:`get`) only when it needs the
    values, by which time the device has usually long passed that point of its queue.
    """

    def __init__(self, values: torch.Tensor, defer: bool):
        self._ready = None
        if defer and values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = values.cpu()

    def get(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host


class HostChecks:
    """The device-side facts the host loop needs, fetched in one copy: bad target ids, pairs with tokens.

    With ``defer`` (CUDA fast path) the copy is queued without waiting, so the first chunk's GEMM and kernels
    are already running when the host first needs the answer (its kernels clamp bad ids, so nothing reads
    out of bounds before the error is raised). Otherwise the answer is fetched, and checked, at once.
    Few launches, as they delay the first GEMM: the smallest and largest non-ignored id and the per-row token
    counts travel together; the host compares them with [0, V) and pairs them up itself.
    """

    def __init__(self, target, ignore_index, vocab, n_pairs, defer: bool):
        self._target, self._ignore_index, self._vocab, self._n_pairs = target, ignore_index, vocab, n_pairs
        valid = target != ignore_index
        self.token_counts = valid.sum(dim=1)  # (2B,) on the device
        if target.numel():
            id_range = [bound.view(1) for bound in torch.where(valid, target, 0).aminmax()]
        else:
            id_range = [torch.zeros(2, dtype=target.dtype, device=target.device)]
        self._copy = HostCopy(torch.cat((*id_range, self.token_counts.to(target.dtype))), defer)
        self._pairs_ok = None
        if not defer:
            self.pairs_ok()

    def pairs_ok(self) -> torch.Tensor:
        """Host bool tensor (B,): both rows of pair i have at least one non-ignored token."""
        if self._pairs_ok is None:
            host = self._copy.get()
            if int(host[0]) < 0 or int(host[1]) >= self._vocab:
                raise_for_target_values(self._target, self._ignore_index, self._vocab)
            counts = host[2:]
            self._pairs_ok = (counts[: self._n_pairs] > 0) & (counts[self._n_pairs :] > 0)
        return self._pairs_ok


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


def parse_byte_count(text: str, name: str) -> int:
    """A positive whole number of bytes written as an int or a float: "1073741824", "1_000_000_000", "1e9"."""
    try:
        value = int(text)  # exact, underscores allowed
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        value = int(number) if math.isfinite(number) and number.is_integer() else None
    if value is None or value < 1:
        raise ValueError(f"{name} must be a positive whole number of bytes, e.g. 1073741824, 1_000_000_000 or 1e9; "
                         f"got {text!r}")
    return value


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
    parts = [part.reshape(-1, *tensor.shape[2:]) for part in piece_views(tensor, pieces, local)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def scatter_pieces_(tensor: torch.Tensor, pieces: List[Piece], values: torch.Tensor, local: bool = False) -> None:
    """Inverse of :func:`gather_pieces`: write ``values`` (tokens, ...) back into ``tensor``."""
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


@dataclass
class ChunkStatistics:
    """A chunk's per-token statistics, (2p, T) each, and the logits (with their inputs) kept for its gradient."""

    target: torch.Tensor  # (2p, T): the chunk's chosen rows, then its rejected rows
    valid: torch.Tensor
    lse: torch.Tensor
    target_logit: torch.Tensor
    logit_sum: torch.Tensor
    kept: Optional[Tuple[torch.Tensor, torch.Tensor]]  # (x, logits) of the last pass computed, if kept

    def add_pass(self, ops, _input, pieces: List[Piece],
                 computed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits of one pass (unless ``computed`` already) and their statistics, written into the per-token
        arrays; returns (x, logits)."""
        x_pass, logits = computed if computed is not None else pass_logits(ops, _input, pieces)
        stats = ops.statistics(logits, gather_pieces(self.target, pieces, local=True))
        for array, values in zip((self.lse, self.target_logit, self.logit_sum), stats):
            scatter_pieces_(array, pieces, values, local=True)
        return x_pass, logits

    def gradient_(self, ops, logits: torch.Tensor, pieces: List[Piece], coef: torch.Tensor) -> torch.Tensor:
        """``dL/dlogits`` of one pass in place, from its statistics and the chunk's (2p, T) coefficients."""
        return ops.gradient_(logits, gather_pieces(self.lse, pieces, local=True),
                             gather_pieces(self.target, pieces, local=True), gather_pieces(coef, pieces, local=True))


def pass_logits(ops, _input, pieces: List[Piece]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, logits) of one pass: the GEMM of its rows and tokens."""
    x_pass = ops.prepare_input(gather_pieces(_input, pieces))
    return x_pass, ops.logits(x_pass)


def chunk_statistics(ops, _input, target, chunk: Chunk, n_pairs: int, ignore_index: int,
                     acc_dtype: torch.dtype, passes: Optional[List[List[Piece]]] = None) -> ChunkStatistics:
    """Logits and per-token statistics of ``passes`` (default: every pass of ``chunk``); with the default the
    last pass's logits are kept for the gradient, otherwise none are (the caller computes the rest)."""
    keep_last = passes is None
    passes = chunk.passes if keep_last else passes
    # the first GEMM goes to the device before any bookkeeping launch
    computed = pass_logits(ops, _input, passes[0])
    target_chunk = pair_rows(target, chunk.start, chunk.end, n_pairs)
    per_token = [torch.empty(target_chunk.shape, dtype=acc_dtype, device=_input.device) for _ in range(3)]
    stats = ChunkStatistics(target_chunk, target_chunk != ignore_index, *per_token, kept=None)
    for pieces in passes:
        stats.kept = None  # free the previous pass's logits before the next GEMM allocates its own
        kept = stats.add_pass(ops, _input, pieces, computed)
        computed = None
        stats.kept = kept if keep_last else None
        del kept
    return stats


def chosen_passes(chunk: Chunk) -> List[List[Piece]]:
    """Token mode: the passes over the chunk's chosen row (its pieces have local row 0)."""
    return [pieces for pieces in chunk.passes if pieces[0].local_rows.start < chunk.end - chunk.start]


def rejected_passes(chunk: Chunk) -> List[List[Piece]]:
    return [pieces for pieces in chunk.passes if pieces[0].local_rows.start >= chunk.end - chunk.start]


class LossTotals:
    """The loss and aux outputs, accumulated chunk by chunk on the device."""

    def __init__(self, n_pairs: int, acc_dtype: torch.dtype, device: torch.device):
        self.loss = torch.zeros((), dtype=acc_dtype, device=device)
        self.nll = torch.zeros((), dtype=acc_dtype, device=device)
        self.logit_sums = torch.zeros(2, dtype=acc_dtype, device=device)  # chosen, rejected
        self.row_logps = torch.zeros(2 * n_pairs, dtype=acc_dtype, device=device)
        self.chosen_rewards = torch.zeros(n_pairs, dtype=acc_dtype, device=device)
        self.rejected_rewards = torch.zeros(n_pairs, dtype=acc_dtype, device=device)


class GradientSink:
    """Contracts each pass's ``dL/dlogits`` into the input, weight and bias gradients."""

    def __init__(self, ops, _input, vocab, n_products, needs_input_grad, needs_weight_grad, needs_bias_grad,
                 acc_dtype):
        device = _input.device
        # no zero fill: the plan covers every token exactly once, so every row of dX is written by one pass
        self.grad_input = torch.empty(_input.shape, dtype=ops.grad_input_dtype, device=device) \
            if needs_input_grad else None
        self.grad_weight = None  # created by the first product (no zero-fill pass over (V, H))
        self.grad_bias = torch.zeros(vocab, dtype=acc_dtype, device=device) if needs_bias_grad else None
        self.needs_weight_grad = needs_weight_grad
        self.ops, self.n_products = ops, n_products

    def add(self, pieces: List[Piece], grad_logits, x_pass, weight_beta: Optional["HostCopy"] = None) -> None:
        """dX of the pass's tokens, ``dW = beta * dW + Gᵀ·X`` (``beta`` read from the host copy, else 1), db."""
        if self.grad_input is not None:
            scatter_pieces_(self.grad_input, pieces, self.ops.input_grad(grad_logits))
        if self.needs_weight_grad:
            beta = 1.0 if weight_beta is None else float(weight_beta.get()[0])
            self.grad_weight = self.ops.accumulate_weight_grad(self.grad_weight, grad_logits, x_pass,
                                                               self.n_products, beta)
        if self.grad_bias is not None:
            self.grad_bias += grad_logits.sum(dim=0, dtype=self.grad_bias.dtype)

    def results(self):
        grad_weight = self.grad_weight
        if grad_weight is not None:
            grad_weight = self.ops.finish_weight_grad(grad_weight)
        elif self.needs_weight_grad:  # no product at all (T = 0)
            grad_weight = torch.zeros_like(self.ops.weight)
        return self.grad_input, grad_weight, self.grad_bias


#: Single-pair token mode: compute the chosen row's gradients while its coefficient is still unknown (see
#: :class:`DeferredChosenScale`), so only the rejected row's logits are computed twice. False: both rows'.
DEFER_CHOSEN_SCALE = True


class DeferredChosenScale:
    """Single-pair token mode with the chosen row's gradient computed before its coefficient ``c`` is known.

    The chosen row's ``dL/dlogits`` is ``c * valid * (softmax - onehot)`` with one scalar ``c`` for the row, so
    its runs are contracted unscaled, in the pass that also computes their statistics, and ``c`` is applied
    afterwards: dX is kept in float32 and rounded once after scaling (for bf16/fp16 inputs in the bytes of
    both rows of dX, which the rejected row fills only later), ``db`` is scaled on the device, and the float32
    weight accumulator, which holds only this pair's chosen products, is scaled by the first rejected
    product (``beta = c``, read on the host while the device runs that product's logits GEMM). Only the
    rejected row's logits are computed twice: ``3R`` logits GEMMs for ``R`` runs per row instead of ``4R - 1``.
    """

    def __init__(self, sink: GradientSink, seq_len: int, acc_dtype: torch.dtype):
        self.sink = sink
        grad_input = sink.grad_input
        self.dx = None
        if grad_input is not None:  # (T, H) in the accumulation dtype; one pair: rows 0 and 1 are contiguous
            self.in_place = grad_input.dtype == acc_dtype
            self.dx = grad_input[0] if self.in_place else grad_input.view(-1).view(acc_dtype).view(seq_len, -1)
        self.bias_sum = torch.zeros_like(sink.grad_bias) if sink.grad_bias is not None else None

    def add(self, pieces: List[Piece], grad_logits, x_pass) -> None:
        """Contract one run of the chosen row's unscaled gradient."""
        ops = self.sink.ops
        if self.dx is not None:
            (piece,) = pieces
            self.dx[piece.tokens].copy_(matmul_accumulation_dtype(grad_logits, ops.weight))
        if self.sink.needs_weight_grad:
            self.sink.grad_weight = ops.accumulate_weight_grad(self.sink.grad_weight, grad_logits, x_pass,
                                                               self.sink.n_products)
        if self.bias_sum is not None:
            self.bias_sum += grad_logits.sum(dim=0, dtype=self.bias_sum.dtype)

    def finish(self, coef: torch.Tensor, defer_host: bool) -> Optional[HostCopy]:
        """Scale dX and db by the chosen row's coefficient; returns its host copy for the weight (or None)."""
        grad_input = self.sink.grad_input
        if self.dx is not None:
            if self.in_place:
                self.dx.mul_(coef)
            else:  # round once; the product goes through a temporary as it overlaps its source
                scaled = torch.empty_like(grad_input[0])
                torch.mul(self.dx, coef, out=scaled)
                grad_input[0].copy_(scaled)
        if self.bias_sum is not None:
            self.sink.grad_bias += self.bias_sum * coef
        return HostCopy(coef.view(1), defer_host) if self.sink.needs_weight_grad else None


class InputVersions:
    """Version counters of the tensors forward read, checked before backward hands out the gradients.

    The gradients are computed in forward, so a tensor changed in place between forward and backward would
    silently get gradients of its old values; plain autograd raises for the tensors it saved, and so does this.
    Weak references only: keeping ``_input`` alive until backward would hold the hidden states, which the
    fused loss otherwise frees right after forward. A view is watched through its base too (one version
    counter), so changing the base still counts when the temporary view passed in is gone.
    """

    def __init__(self, **tensors: Optional[torch.Tensor]):
        self._watched = []
        for name, tensor in tensors.items():
            if tensor is None or tensor.is_inference():  # inference tensors have no version counter
                continue
            aliases = [tensor] if tensor._base is None else [tensor, tensor._base]
            self._watched.append((name, tuple(tensor.shape), tensor._version,
                                  [weakref.ref(alias) for alias in aliases]))

    def check(self, node_name: str) -> None:
        for name, shape, version, refs in self._watched:
            alias = next((t for t in (ref() for ref in refs) if t is not None), None)
            if alias is not None and alias._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: {name} of shape {shape}, read by {node_name} in forward, is at version "
                    f"{alias._version}; expected version {version} instead. The fused loss computed its "
                    f"gradients from the values {name} had in forward: call backward before changing it in place."
                )


def refuse_double_backward(grads: Tuple[Optional[torch.Tensor], ...], node_name: str):
    """``grads`` (values unchanged) attached to a node that raises when differentiated.

    The gradients were computed in forward, outside any graph: without this they would come back from
    ``torch.autograd.grad(..., create_graph=True)`` as constants, and a gradient penalty built on them would
    silently contribute nothing (as ``torch.autograd.function.once_differentiable`` does when no input of
    backward requires grad).
    """
    message = (
        f"{node_name}: double backward is not supported. The fused linear + preference loss computes its "
        "gradients in forward, so they cannot be differentiated again (e.g. a gradient penalty from "
        "torch.autograd.grad(loss, ..., create_graph=True)). Use an unfused loss for second-order terms."
    )
    error_node = torch._C._functions.DelayedError(message, len(grads))
    return error_node(*(None if g is None else g.detach().requires_grad_() for g in grads))


def builds_graph(ctx) -> bool:
    """Whether autograd records this call (grad mode on and an input requiring grad).

    Inside ``forward`` grad mode is always off and ``ctx.needs_input_grad`` ignores the caller's grad mode;
    the graph edges to the inputs, however, exist only when the call is recorded: under ``torch.no_grad()``
    (or ``inference_mode``) only the loss is computed.
    """
    return len(ctx.next_functions) > 0


def run_eagerly_under_compile(forward):
    """``forward`` (a classmethod or staticmethod) behind ``torch.compiler.disable``.

    The fused loss reads device values on the host and loops over a chunk plan that depends on them, which
    torch.compile cannot trace (nor follow ``super()`` in a classmethod ``forward``): the compiled caller gets a
    graph break around ``apply``, which then runs eagerly, autograd node and all.
    """
    kind = type(forward) if isinstance(forward, (classmethod, staticmethod)) else staticmethod
    return kind(torch.compiler.disable(getattr(forward, "__func__", forward)))


class LigerFusedLinearPreferenceBase(torch.autograd.Function):
    """Base of fused-linear preference losses.

    A subclass supplies ``preference_loss_fn(chosen_logps, rejected_logps, full_target, **hyperparams)``
    returning ``(loss, chosen_rewards, rejected_rewards)`` — the loss summed over the pairs given and
    divided by the number of pairs in the whole batch — and calls :meth:`forward` / :meth:`backward`.
    The gradient of ``preference_loss_fn`` is taken by autograd on the tiny per-pair tensors, so a new
    loss (DPO, CPO, ORPO, ...) needs no hand-written derivative; a subclass may add a closed form
    (``preference_loss_and_grad``), used when every pair of the chunk has tokens.
    """

    #: True: a row's log-prob is the mean over its non-ignored tokens (SimPO); False: the sum (DPO).
    average_log_prob = True

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
    def forward(
        cls,
        ctx,
        _input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        chunk_size: int = 1,
        softcap: Optional[float] = None,
        loss_kwargs: Optional[Dict[str, Any]] = None,
        pair_kwargs: Optional[Dict[str, torch.Tensor]] = None,
        output_dtype: Optional[torch.dtype] = None,
    ):
        """Loss and aux outputs (SPEC §7); input/weight/bias gradients are computed here and kept on ctx.

        ``loss_kwargs`` go to ``preference_loss_fn`` as they are; ``pair_kwargs`` are per-pair tensors of
        leading size B (e.g. reference log-probs) sliced to each chunk's pairs before being passed.
        One chunk's logits stay within :func:`logits_budget_bytes`; a pair over it is processed in token chunks.
        ``output_dtype`` (default: the input dtype) is the dtype of the loss and the aux outputs, rounded once from the float32 (float64) accumulators: ``torch.float32`` gives a
        half-precision model the float32 loss that HF's own causal-LM loss returns.

        A row whose tokens are all ignored has log-prob 0 and its pair adds no loss and no gradient. A sequence
        length of 0 (``_input`` of shape ``(2B, 0, H)``) makes every row such a row: the loss, log-probs,
        rewards, NLL and logits means are 0 (a mean over no values is 0 here, not NaN) and the gradients are
        zeros of the inputs' shapes.
        """
        validate_preference_inputs(_input, weight, target, bias, ignore_index, chunk_size, softcap, output_dtype)
        loss_kwargs = dict(loss_kwargs or {})
        pair_kwargs = dict(pair_kwargs or {})
        needs_grad = [builds_graph(ctx) and needed for needed in ctx.needs_input_grad]
        needs_input_grad, needs_weight_grad = needs_grad[0], needs_grad[1]
        needs_bias_grad = bias is not None and needs_grad[3]
        needs_any_grad = needs_input_grad or needs_weight_grad or needs_bias_grad

        rows, seq_len, _ = _input.shape
        n_pairs = rows // 2
        vocab = weight.shape[0]
        device, dtype = _input.device, _input.dtype
        acc_dtype = accumulation_dtype(dtype)
        target = target.long()
        ops = select_logit_ops(_input, weight, bias, softcap, ignore_index, compiled)
        budget = logits_budget_bytes()
        plan = plan_chunks(n_pairs, seq_len, vocab, chunk_size, ops.logits_element_size, budget,
                           fill_budget=ops.fills_budget)

        # queued ahead of the first GEMM, so its answer is on the host long before the first pair loss asks
        host_checks = HostChecks(target, ignore_index, vocab, n_pairs, defer=ops.defers_host_checks)
        token_counts = host_checks.token_counts
        def deferred_scale(chunk: Chunk) -> bool:
            return DEFER_CHOSEN_SCALE and needs_any_grad and n_pairs == 1 and len(chunk.passes) > 1

        def first_passes(chunk: Chunk) -> Optional[List[List[Piece]]]:
            """Passes whose statistics come first: all (logits of the last kept), or the rejected row's alone."""
            return rejected_passes(chunk) if deferred_scale(chunk) else None

        # The first chunk's GEMM and statistics go to the device before the rest of the host-side set-up,
        # which then runs while the device is busy instead of leaving it idle.
        next_stats = chunk_statistics(ops, _input, target, plan[0], n_pairs, ignore_index, acc_dtype,
                                      first_passes(plan[0])) if plan else None
        # NLL is normalised by the chosen tokens of the whole batch, never of the chunk.
        n_chosen_tokens = token_counts[:n_pairs].sum().clamp(min=1).to(acc_dtype)
        row_norm = token_counts.clamp(min=1).to(acc_dtype) if cls.average_log_prob else None

        totals = LossTotals(n_pairs, acc_dtype, device)
        n_products = sum(len(c.passes) for c in plan)
        sink = GradientSink(ops, _input, vocab, n_products, needs_input_grad, needs_weight_grad, needs_bias_grad,
                            acc_dtype)

        for index, chunk in enumerate(plan):
            start, end = chunk.start, chunk.end
            pairs = end - start
            stats = next_stats if index == 0 else chunk_statistics(
                ops, _input, target, chunk, n_pairs, ignore_index, acc_dtype, first_passes(chunk))
            next_stats = None
            deferred = DeferredChosenScale(sink, seq_len, acc_dtype) if deferred_scale(chunk) else None
            if deferred is not None:  # the chosen row: statistics and unscaled gradient from one logits GEMM
                unit_coef = stats.valid.to(acc_dtype)
                for pieces in chosen_passes(chunk):
                    x_pass, logits = stats.add_pass(ops, _input, pieces)
                    grad_logits = stats.gradient_(ops, logits, pieces, unit_coef)
                    del logits
                    deferred.add(pieces, grad_logits, x_pass)
                    del grad_logits, x_pass

            valid_chunk = stats.valid
            norm_chunk = pair_rows(row_norm, start, end, n_pairs) if row_norm is not None else None
            token_logp = (stats.target_logit - stats.lse) * valid_chunk
            logp_sum = token_logp.sum(dim=1)
            logps = logp_sum / norm_chunk if norm_chunk is not None else logp_sum
            totals.row_logps[start:end], totals.row_logps[n_pairs + start : n_pairs + end] = logps[:pairs], logps[pairs:]
            totals.logit_sums += stats.logit_sum.view(2, -1).sum(dim=1)

            chunk_pair_kwargs = {k: v[start:end] for k, v in pair_kwargs.items()}
            pair_loss, d_logps, rewards = cls._pair_loss_and_grad(
                logps, pairs, host_checks.pairs_ok()[start:end], target, loss_kwargs, chunk_pair_kwargs, needs_any_grad
            )
            totals.chosen_rewards[start:end], totals.rejected_rewards[start:end] = rewards
            totals.loss += pair_loss
            nll_chunk = -logp_sum[:pairs].sum() / n_chosen_tokens
            if compute_nll_loss:
                totals.loss += alpha * nll_chunk
            totals.nll += nll_chunk

            if not needs_any_grad:
                continue
            # dL/dlogits[t] = coef[t] * (softmax - onehot); d logp_row / d logits[t] = -(softmax - onehot)/norm
            row_coef = -d_logps / norm_chunk if norm_chunk is not None else -d_logps
            if compute_nll_loss:
                row_coef[:pairs] += alpha / n_chosen_tokens
            coef = row_coef.unsqueeze(1) * valid_chunk
            weight_beta = deferred.finish(row_coef[0], defer_host=ops.defers_host_checks) if deferred else None
            kept = stats.kept
            stats.kept = None
            for pieces in reversed(rejected_passes(chunk) if deferred else chunk.passes):
                if kept is not None:
                    x_pass, logits = kept
                    kept = None
                else:  # token mode: recompute this run's logits now that the sequence coefficients are known
                    x_pass, logits = pass_logits(ops, _input, pieces)
                grad_logits = stats.gradient_(ops, logits, pieces, coef)
                del logits
                sink.add(pieces, grad_logits, x_pass, weight_beta)
                weight_beta = None  # the chosen row's products are scaled by the first product alone
                del grad_logits, x_pass
            del stats

        grad_input, grad_weight, grad_bias = sink.results()
        ctx.save_for_backward(grad_input, grad_weight, grad_bias)
        ctx.grad_dtype = dtype
        ctx.input_versions = InputVersions(_input=_input, weight=weight, target=target, bias=bias) \
            if needs_any_grad else None
        positions = max(n_pairs * seq_len * vocab, 1)  # T = 0: a mean over no logits is 0, like an empty row's logp
        out_dtype = dtype if output_dtype is None else output_dtype
        aux_outputs = (
            totals.row_logps[:n_pairs].to(out_dtype),
            totals.row_logps[n_pairs:].to(out_dtype),
            (totals.logit_sums[0] / positions).to(out_dtype),
            (totals.logit_sums[1] / positions).to(out_dtype),
            (totals.nll if compute_nll_loss else torch.zeros_like(totals.nll)).to(out_dtype),
            totals.chosen_rewards.to(out_dtype),
            totals.rejected_rewards.to(out_dtype),
        )
        return totals.loss.to(out_dtype), aux_outputs

    @classmethod
    def _pair_loss_and_grad(
        cls,
        logps: torch.Tensor,
        pairs: int,
        pair_ok: torch.Tensor,
        full_target: torch.Tensor,
        loss_kwargs: Dict[str, Any],
        pair_kwargs: Dict[str, torch.Tensor],
        needs_grad: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Run ``preference_loss_fn`` on a chunk's pairs; return its loss, ``dloss/dlogps`` and rewards.

        A pair with a row whose tokens are all ignored has no defined log-prob: it adds zero loss and
        zero gradient (its rewards are still reported, from log-prob 0), the mean still divides by B.
        ``pair_ok`` is a host tensor, so the chunk loop never waits for the device.
        """
        all_ok = bool(pair_ok.all())
        if needs_grad and all_ok and cls.preference_loss_and_grad is not None:
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
            if not all_ok:
                loss = torch.zeros_like(loss)
                if bool(pair_ok.any()):
                    ok_index = pair_ok.nonzero().squeeze(1).to(logps.device)
                    kept = {k: v[ok_index] for k, v in pair_kwargs.items()}
                    loss = cls.preference_loss_fn(
                        chosen[ok_index], rejected[ok_index], full_target, **loss_kwargs, **kept
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

        Returns ``(grad_input, grad_weight, None, grad_bias)``; subclasses append one None per extra argument.
        """
        if ctx.input_versions is not None:
            ctx.input_versions.check(type(ctx).__name__)
        grad_input, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output[0]
        dtype = ctx.grad_dtype

        # one host read of the upstream scalar (all forward work is done by now): at exactly 1 (plain
        # loss.backward()) the (V, H) weight gradient needs no extra read and write
        unit = scale.numel() == 1 and float(scale) == 1.0

        def scaled(grad):
            if grad is None:
                return None
            return grad.to(dtype) if unit else (grad * scale.to(grad.dtype)).to(dtype)

        grads = (scaled(grad_input), scaled(grad_weight), None, scaled(grad_bias))
        if torch.is_grad_enabled():  # backward(create_graph=True): the caller will differentiate these
            return refuse_double_backward(grads, type(ctx).__name__)
        return grads
