"""Variable-length attention for packed batches: no mask, no compilation per length.

A packed batch (one row, ``position_ids`` restarting at each sequence, no attention mask) holds 2B sequences end to
end. transformers' ``sdpa`` turns the restarts into a dense ``(N, N)`` block-diagonal mask (attention paid over the
whole row, and SDPA with a mask cannot use its flash kernel); ``flex_attention`` compiles a new kernel for every new
packed length. This module routes a packed batch's attention to :func:`patches.varlen_kernel.packed_attention`
instead: FlashAttention's variable-length kernel on CUDA, the sequences one by one elsewhere, never an ``(N, N)``
matrix; the sequence boundaries are computed once per forward and reused by every layer.

Two ways in:

* automatically: the patched forward (``apply_fused_simpo``) runs a packed batch of a model on ``sdpa`` or
  ``flex_attention`` through this path (:func:`packed_forward`). Nothing is set on the model: the layers find the
  sequences in the keyword arguments transformers threads to attention functions, and transformers' ``sdpa`` and
  ``flex_attention`` entries are wrapped (once, process-wide, :func:`install_dispatch`) so that a call carrying them
  runs here and every other call runs the original function unchanged. Gradient checkpointing recomputes the
  layers with the same keyword arguments, so the recomputation takes this path too.
* by name: ``attn_implementation="packed_varlen"`` (:data:`ATTENTION_NAME`, registered with transformers'
  ``AttentionInterface`` and ``AttentionMaskInterface`` when this module is imported, which importing
  :mod:`patches.apply` does). Calls without a padding mask and without a KV cache (training rows, packed or not)
  run here, with the sequences read from ``position_ids``; the rest (padding masks, cached generation) run
  transformers' ``sdpa``.
"""
import contextlib
import contextvars
import functools
import inspect
import threading
import weakref
from typing import Iterator, Optional, Sequence

import torch

from patches.varlen_kernel import PackedSequences, packed_attention, window_size

#: The name this attention is registered under with transformers (``attn_implementation=ATTENTION_NAME``).
ATTENTION_NAME = "packed_varlen"
#: The keyword argument that carries a forward's :class:`PackedSequences` to every attention call.
SEQUENCES_KWARG = "packed_sequences"
#: transformers' implementations a packed batch of the patched forward is routed away from (:func:`packed_forward`).
ROUTED_IMPLEMENTATIONS = ("sdpa", "flex_attention")

# ---------------------------------------------------------------------------------------------------------------
# transformers integration
# ---------------------------------------------------------------------------------------------------------------

#: Set while the patched forward runs the decoder on a packed batch: transformers' mask builders then build none.
_PACKED_FORWARD: contextvars.ContextVar = contextvars.ContextVar("packed_forward", default=None)
#: How many packed forwards run now, in any thread. Read before the context variable, so that a call outside any
#: packed forward never touches it (torch.compile breaks its graph on a context variable; an int it guards on).
_active_packed_forwards = 0


def _packed_forward() -> Optional[str]:
    """What this thread's packed forward runs (``"LlamaForCausalLM (attn_implementation='sdpa')"``), or None."""
    return _PACKED_FORWARD.get() if _active_packed_forwards else None


class UnservedAttentionError(ValueError):
    """A model's attention cannot be computed per packed sequence."""


#: Keyword arguments whose meaning the packed path does not reproduce (an error names them).
_UNSERVED_KWARGS = ("s_aux", "position_bias", "head_mask")


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _position_sequences(position_ids, batch, length, device) -> PackedSequences:
    """:meth:`PackedSequences.from_position_ids`, memoised for the ``position_ids`` tensor a forward gives every
    layer, so a forward reads it on the host once rather than once per layer."""
    key = None if position_ids is None else (id(position_ids), position_ids._version, batch, length)
    cached = _POSITION_CACHE.get(key) if key is not None else None
    if cached is not None and cached[0]() is position_ids:
        return cached[1]
    sequences = PackedSequences.from_position_ids(position_ids, batch, length, device)
    if key is not None:
        if len(_POSITION_CACHE) >= 8:
            _POSITION_CACHE.clear()
        _POSITION_CACHE[key] = (weakref.ref(position_ids), sequences)
    return sequences


_POSITION_CACHE: dict = {}


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                             softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function contract: ``(B, H, T, D)`` inputs, returns ``((B, T, H, D), None)``.

    The sequences come from the ``packed_sequences`` keyword argument (the patched forward passes it), else from
    ``position_ids`` (one host read per forward). A call with a padding mask or a KV cache (query and key lengths
    differ) runs transformers' ``sdpa`` instead.
    """
    sequences = kwargs.pop(SEQUENCES_KWARG, None)
    unserved = [name for name in _UNSERVED_KWARGS if kwargs.get(name) is not None]
    if unserved:
        raise UnservedAttentionError(
            f"packed attention cannot serve {type(module).__name__}: it passes {', '.join(unserved)} to its "
            f"attention; use attn_implementation='eager' (or padded batches) for this model")
    if sequences is None:
        _refuse_during_packed_forward(module)
        if attention_mask is not None or query.shape[2] != key.shape[2]:
            return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                           is_causal=is_causal, **kwargs)
        sequences = _position_sequences(kwargs.get("position_ids"), query.shape[0], query.shape[2], query.device)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = packed_attention(query, key, value, sequences, scale=scaling, sliding_window=sliding_window,
                           softcap=softcap, dropout=dropout, causal=causal)
    return out, None


def _refuse_during_packed_forward(module: torch.nn.Module) -> None:
    """An attention call without the packed sequences while the patched forward runs a packed batch: no mask was
    built for this forward, so the layer would let the sequences attend to each other. Raise, naming the model."""
    active = _packed_forward()
    if active is not None:
        raise UnservedAttentionError(
            f"packed attention cannot serve {active}: its attention layer {type(module).__name__} did not receive "
            f"the packed sequences (the model does not pass its keyword arguments on to its attention function); "
            f"load it with attn_implementation='eager' or 'flash_attention_2', or use padded batches")


def _plain_mask_call(kwargs) -> bool:
    """A mask builder call that needs no mask for :func:`varlen_attention_forward`: no padding mask, no KV cache
    (as many keys as queries, no offset) and no custom mask overlay (transformers 5's ``use_vmap``)."""
    if kwargs.get("attention_mask") is not None or kwargs.get("use_vmap") or kwargs.get("kv_offset", 0):
        return False
    q_length = kwargs.get("q_length")
    if q_length is None and kwargs.get("cache_position") is not None:  # transformers 4.57
        q_length = kwargs["cache_position"].shape[0]
    return q_length is not None and q_length == kwargs.get("kv_length") and not kwargs.get("q_offset", 0)


def varlen_mask(*args, **kwargs):
    """The mask builder registered for :data:`ATTENTION_NAME`: no mask where the sequences (read from
    ``position_ids``) say all there is; otherwise transformers' sdpa mask (padding, KV cache)."""
    if _packed_forward() is not None or (not args and _plain_mask_call(kwargs)):
        return None
    return _mask_registry()["sdpa"](*args, **kwargs)


def _attention_registry() -> dict:
    from transformers import AttentionInterface

    return AttentionInterface._global_mapping


def _mask_registry() -> dict:
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionMaskInterface._global_mapping


def register() -> None:
    """Register :data:`ATTENTION_NAME` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, varlen_mask)


class _RoutedAttention:
    """What :func:`install_dispatch` puts in place of transformers' ``sdpa``/``flex_attention`` attention function:
    calls carrying ``packed_sequences`` run :func:`varlen_attention_forward`, all others the original unchanged."""

    def __init__(self, name: str, original):
        self.name, self.original = name, original
        functools.update_wrapper(self, original)

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        if kwargs.get(SEQUENCES_KWARG) is not None:
            return varlen_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        _refuse_during_packed_forward(module)
        return self.original(module, query, key, value, attention_mask, *args, **kwargs)


class _RoutedMask:
    """What :func:`install_dispatch` puts in place of transformers' ``sdpa``/``flex_attention`` mask builders: none
    while the patched forward runs a packed batch (its layers do not use one), the original otherwise."""

    def __init__(self, name: str, original):
        self.name, self.original = name, original
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        if _packed_forward() is not None:
            return None
        return self.original(*args, **kwargs)


_ORIGINALS: dict = {}
_INSTALL_LOCK = threading.Lock()


def install_dispatch() -> None:
    """Wrap transformers' ``sdpa`` and ``flex_attention`` attention functions and mask builders (process-wide,
    idempotent, re-done if someone registered another function under those names since). The wrappers change
    nothing for calls outside a packed forward of the patched model."""
    with _INSTALL_LOCK:
        for kind, registry, wrapper in (("attention", _attention_registry(), _RoutedAttention),
                                        ("mask", _mask_registry(), _RoutedMask)):
            for name in ROUTED_IMPLEMENTATIONS:
                current = registry.get(name)
                if current is None or isinstance(current, wrapper):
                    continue
                _ORIGINALS[(kind, name)] = current
                registry[name] = wrapper(name, current)


def accepts_packed_sequences(decoder: torch.nn.Module) -> bool:
    """Whether ``decoder``'s forward takes ``**kwargs`` (what carries the sequences on to its attention layers)."""
    try:
        parameters = inspect.signature(decoder.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@contextlib.contextmanager
def packed_forward(model: torch.nn.Module, offsets: Sequence[int], device) -> Iterator[dict]:
    """While the patched forward runs the decoder of ``model`` on a packed row with sequence ``offsets``: yields
    the keyword arguments to add to the decoder call (``{"packed_sequences": ...}``), with transformers' mask
    builders building no mask meanwhile (this thread or task only). Empty when ``model``'s implementation is not
    routed (eager, flash_attention_2/3 keep their own packed handling)."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in (*ROUTED_IMPLEMENTATIONS, ATTENTION_NAME):
        yield {}
        return
    global _active_packed_forwards
    install_dispatch()
    sequences = PackedSequences.from_offsets(offsets, device)
    token = _PACKED_FORWARD.set(f"{type(model).__name__} (attn_implementation={implementation!r})")
    with _INSTALL_LOCK:
        _active_packed_forwards += 1
    try:
        yield {SEQUENCES_KWARG: sequences}
    finally:
        with _INSTALL_LOCK:
            _active_packed_forwards -= 1
        _PACKED_FORWARD.reset(token)


register()

__all__ = ["ATTENTION_NAME", "PackedSequences", "UnservedAttentionError", "packed_attention",
           "varlen_attention_forward", "register", "install_dispatch", "packed_forward", "window_size"]
