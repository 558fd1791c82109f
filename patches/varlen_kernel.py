"""The attention of packed sequences, computed without an ``(N, N)`` mask: FlashAttention's variable-length kernel
on CUDA, the sequences one by one elsewhere.

A packed batch (one row, ``position_ids`` restarting at each sequence, no attention mask) holds 2B sequences end to
end. This module computes its attention per sequence:

* on CUDA, FlashAttention's variable-length kernel as PyTorch ships it (``torch.nn.attention.varlen.varlen_attn``):
  one launch for all sequences, given their cumulative offsets ``cu_seqlens``; memory linear in N;
* elsewhere (CPU, older GPUs, a torch without the kernel, float32, and what the kernel cannot do: attention
  softcapping, attention dropout), the same sequences one by one through SDPA (or, with a softcap, the eager
  formula), still never an ``(N, N)`` matrix.

Both paths share everything but the kernel call (:func:`_call_kernel`): the sequence boundaries
(:class:`PackedSequences`, computed once per forward and reused by every layer), the ``(B, H, T, D)`` ↔ ``(T, H, D)``
layout, GQA, scaling and the sliding-window convention. How transformers' models reach it: :mod:`patches.varlen`.
"""
import inspect
import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from patches.labels import sequence_start_mask

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class PackedSequences:
    """Where the sequences of a flattened ``(B * T)`` row of tokens start and end.

    ``offsets``: host ints ``(0, end_0, end_1, ..., B * T)``; ``cu_seqlens``: the same as an int32 tensor on the
    model's device (what the kernel reads); ``max_length``: the longest sequence (the kernel's ``max_q``/``max_k``).
    Built once per forward on the host, so no layer synchronises with the device.
    """

    offsets: Tuple[int, ...]
    cu_seqlens: torch.Tensor
    max_length: int

    @classmethod
    def from_offsets(cls, offsets: Sequence[int], device) -> "PackedSequences":
        offsets = tuple(int(o) for o in offsets)
        if len(offsets) < 2 or offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"sequence offsets must start at 0 and increase strictly, got {offsets[:8]}...")
        cu_seqlens = torch.tensor(offsets, dtype=torch.int32).to(device)
        return cls(offsets, cu_seqlens, max(b - a for a, b in zip(offsets, offsets[1:])))

    @classmethod
    def from_position_ids(cls, position_ids: Optional[torch.Tensor], batch: int, length: int,
                          device) -> "PackedSequences":
        """The sequences of ``batch`` rows of ``length`` tokens: each row starts one, and within a row a sequence
        starts wherever the position does not follow the previous one (transformers' rule,
        ``masking_utils.find_packed_sequence_indices``). ``position_ids`` None: one sequence per row.
        Reads ``position_ids`` on the host once (one device synchronisation)."""
        if position_ids is None:
            return cls.from_offsets(range(0, batch * length + 1, length), device)
        offsets = sequence_start_mask(position_ids.expand(batch, length)).reshape(-1).nonzero().reshape(-1).tolist()
        return cls.from_offsets([*offsets, batch * length], device)


# ---------------------------------------------------------------------------------------------------------------
# the kernel: torch.nn.attention.varlen.varlen_attn (FlashAttention's variable-length kernel, CUDA only)
# ---------------------------------------------------------------------------------------------------------------


def _load_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch before 2.9
        return None
    return varlen_attn


#: ``torch.nn.attention.varlen.varlen_attn``, or None where this torch lacks it.
KERNEL = _load_kernel()


def kernel_parameters(kernel) -> frozenset:
    """Names of ``kernel``'s parameters: torch versions differ (``window_size``, ``scale``, ``enable_gqa`` or an older
    ``is_causal``), and :func:`_call_kernel` adapts to what is there."""
    # a plain dict, not functools.lru_cache, which torch.compile would trace through and warn about
    parameters = _KERNEL_PARAMETERS.get(kernel)
    if parameters is None:
        parameters = _KERNEL_PARAMETERS[kernel] = frozenset(inspect.signature(kernel).parameters)
    return parameters


_KERNEL_PARAMETERS: dict = {}


def _device_unsupported(query: torch.Tensor) -> Optional[str]:
    """Why the kernel cannot run on ``query``'s device and dtype (None: it can)."""
    if query.device.type != "cuda":
        return f"it runs on CUDA only (the tensors are on {query.device.type})"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention takes float16 or bfloat16, not {query.dtype}"
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return "FlashAttention needs a GPU of compute capability 8.0 or newer"
    return None


def kernel_unsupported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: Tuple[int, int],
                       softcap: Optional[float], dropout: float) -> Optional[str]:
    """Why this attention call cannot use the kernel (None: it can); the per-sequence path serves it instead."""
    if KERNEL is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if softcap:
        return "it has no attention logit softcapping (Gemma-2's attn_logit_softcapping)"
    if dropout:
        return "it has no attention dropout (attention_dropout > 0 in training)"
    head_dim = query.shape[-1]
    if value.shape[-1] != head_dim or head_dim > 256 or head_dim % 8:
        return f"it needs query and value head dimensions equal, at most 256 and a multiple of 8 (got {head_dim}, " \
               f"{value.shape[-1]})"
    parameters = kernel_parameters(KERNEL)
    if "window_size" not in parameters and "is_causal" not in parameters:  # causality could not be asked for
        return f"torch {torch.__version__}'s varlen_attn takes neither window_size nor is_causal"
    if window[0] >= 0 and "window_size" not in parameters:
        return f"torch {torch.__version__}'s varlen_attn has no window_size (sliding window attention)"
    return _device_unsupported(query)


def _call_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sequences: PackedSequences,
                 scale: float, window: Tuple[int, int]) -> torch.Tensor:
    """``varlen_attn`` on ``(T, H, D)`` tensors: the one place the CUDA kernel is called.

    Adapts to the kernel's signature: GQA through ``enable_gqa`` or by repeating the key/value heads, the scale
    through ``scale`` or folded into the query, the causal window through ``window_size`` or ``is_causal``.
    """
    parameters = kernel_parameters(KERNEL)
    options = {}
    # FlashAttention reads rows of (H, D): usually already so laid out (transformers' projections are (B, T, H, D))
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if "scale" in parameters:
        options["scale"] = scale
    else:  # the kernel's own scale is 1/sqrt(D)
        query = query * (scale * query.shape[-1] ** 0.5)
    if "window_size" in parameters:
        options["window_size"] = window  # a tuple: varlen_attn tests `window_size == (-1, 0)` for causal
    else:
        options["is_causal"] = window[1] == 0
    length = sequences.max_length
    cu_seqlens = sequences.cu_seqlens.to(query.device)  # a no-op unless the model spans several devices
    return KERNEL(query, key, value, cu_seqlens, cu_seqlens, length, length, **options)


# ---------------------------------------------------------------------------------------------------------------
# windows, and the per-sequence path (CPU and whatever the kernel cannot serve)
# ---------------------------------------------------------------------------------------------------------------


def window_size(sliding_window: Optional[int], causal: bool, max_length: int) -> Tuple[int, int]:
    """FlashAttention's ``(left, right)`` window (-1: unbounded) for transformers' ``sliding_window``.

    transformers' sliding window W lets query i attend keys i - W < j <= i: W tokens counting itself
    (``masking_utils.sliding_window_overlay``), so ``left = W - 1``. A window as long as every sequence is no
    window (``left = -1``: the plain causal kernel).
    """
    if not causal:
        if sliding_window is not None:
            raise ValueError("packed_varlen attention supports a sliding window only for causal attention")
        return (-1, -1)
    if sliding_window is None:
        return (-1, 0)
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if sliding_window >= max_length:
        return (-1, 0)
    return (int(sliding_window) - 1, 0)


def window_mask(length: int, window: Tuple[int, int], device) -> Optional[torch.Tensor]:
    """``(length, length)`` bool mask of FlashAttention's ``window`` within one sequence (None: causal or full)."""
    left, right = window
    if left < 0:
        return None
    positions = torch.arange(length, device=device)
    distance = positions[:, None] - positions[None, :]  # query - key
    allowed = distance <= left
    if right >= 0:
        allowed &= distance >= -right
    return allowed


def _one_sequence(query, key, value, scale, window, softcap, dropout) -> torch.Tensor:
    """Attention within one sequence, ``(L, H, D)`` tensors (key/value heads already repeated)."""
    query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (H, L, D)
    length = query.shape[1]
    mask = window_mask(length, window, query.device)
    causal = window[1] == 0
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                             is_causal=causal and mask is None, scale=scale)
    else:  # the eager formula of transformers' Gemma-2 attention: scale, softcap, mask, float32 softmax
        scores = torch.matmul(query, key.transpose(1, 2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        if mask is None and causal:
            mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        out = torch.matmul(weights, value)
    return out.transpose(0, 1)


def _per_sequence(query, key, value, sequences: PackedSequences, scale, window, softcap, dropout) -> torch.Tensor:
    """The kernel's result computed sequence by sequence: memory quadratic in the longest sequence only."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    offsets = sequences.offsets
    return torch.cat([_one_sequence(query[a:b], key[a:b], value[a:b], scale, window, softcap, dropout)
                      for a, b in zip(offsets, offsets[1:])])


_warned = set()


def _note_fallback(query: torch.Tensor, reason: str) -> None:
    """Say once per reason, on CUDA only (where the kernel was expected), that the per-sequence path runs."""
    if query.device.type == "cuda" and reason not in _warned:
        _warned.add(reason)
        logger.warning("packed attention: FlashAttention's varlen kernel cannot serve this call (%s); computing it "
                       "sequence by sequence instead (exact, slower)", reason)


@torch.compiler.disable  # under torch.compile: a graph break, not a recompilation for every packed length
def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sequences: PackedSequences, *,
                     scale: Optional[float] = None, sliding_window: Optional[int] = None,
                     softcap: Optional[float] = None, dropout: float = 0.0, causal: bool = True) -> torch.Tensor:
    """Attention of ``(B, H, T, D)`` query/key/value (transformers' layout; key/value may have fewer heads, GQA)
    within the sequences ``sequences`` of the flattened ``B * T`` tokens. Returns ``(B, T, H, D)``.

    ``scale`` defaults to ``1/sqrt(D)``; ``sliding_window`` follows transformers (W tokens counting the query's
    own); ``softcap`` is Gemma-2's ``cap * tanh(scores / cap)``.
    """
    batch, heads, length, head_dim = query.shape
    if heads % key.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({key.shape[1]})")
    if sequences.offsets[-1] != batch * length:
        raise ValueError(f"the packed sequences cover {sequences.offsets[-1]} tokens, the attention {batch * length}")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    window = window_size(sliding_window, causal, sequences.max_length)
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[3]) for t in (query, key, value)]
    reason = kernel_unsupported(*flat, window, softcap, dropout)
    if reason is None:
        out = _call_kernel(*flat, sequences, scale, window)
    else:
        _note_fallback(query, reason)
        out = _per_sequence(*flat, sequences, scale, window, softcap, dropout)
    return out.reshape(batch, length, heads, value.shape[-1])
