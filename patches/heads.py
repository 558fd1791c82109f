"""Registry of LM-head quirks, keyed by ``config.model_type``.

The patched forward replaces ``loss(lm_head(hidden_states))`` by the fused SimPO loss, which only knows
``hidden @ W.T + b`` and, optionally, Gemma-2/3's ``softcap * tanh(logits / softcap)``. A model type is
supported only if its ``*ForCausalLM.forward`` does exactly that between the decoder and the loss; every
other head (logit scaling, MoE auxiliary loss, anything not checked) is refused with a message naming it.
"""
from typing import Callable, Dict, Optional

import torch


def _plain_head(config) -> Optional[float]:
    """``logits = lm_head(hidden)``: nothing more to apply."""
    return None


def _final_logit_softcapping(config) -> Optional[float]:
    """``logits = cap * tanh(lm_head(hidden) / cap)`` with ``cap = config.final_logit_softcapping`` (None: off)."""
    return config.final_logit_softcapping


#: model_type -> function(config) returning the softcap the head applies (None for a plain head).
#: Each entry was checked against the ``*ForCausalLM.forward`` of transformers 5.17 (and 4.57).
HEAD_SOFTCAP: Dict[str, Callable[[object], Optional[float]]] = {
    "llama": _plain_head,
    "mistral": _plain_head,
    "qwen2": _plain_head,
    "qwen3": _plain_head,
    "phi3": _plain_head,
    "gemma": _plain_head,
    "gemma2": _final_logit_softcapping,
    "gemma3_text": _final_logit_softcapping,
}

#: Known model types whose head the fused loss would get wrong, with the reason (for the error message).
REFUSED_HEADS: Dict[str, str] = {
    "cohere": "its head multiplies the logits by config.logit_scale",
    "cohere2": "its head multiplies the logits by config.logit_scale",
    "granite": "its head divides the logits by config.logits_scaling",
    "granitemoe": "its head divides the logits by config.logits_scaling and adds a router auxiliary loss",
    "mixtral": "it adds the router load-balancing loss (output_router_logits) to the LM loss",
    "qwen2_moe": "it adds the router load-balancing loss (output_router_logits) to the LM loss",
    "qwen3_moe": "it adds the router load-balancing loss (output_router_logits) to the LM loss",
    "gemma3": "Gemma3ForConditionalGeneration is multimodal; load the text-only Gemma3ForCausalLM (gemma3_text)",
}


class UnsupportedModelError(ValueError):
    """The model's head or wrapping cannot be reproduced exactly by the fused loss."""


def head_softcap(model) -> Optional[float]:
    """Softcap the head of ``model`` (an unwrapped HF causal LM) applies; raise if the head is not supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in HEAD_SOFTCAP:
        return HEAD_SOFTCAP[model_type](model.config)
    reason = REFUSED_HEADS.get(model_type, "its head has not been checked against the fused loss")
    raise UnsupportedModelError(
        f"apply_fused_simpo does not support model type {model_type!r} ({type(model).__name__}): {reason}. "
        f"Supported model types: {', '.join(sorted(HEAD_SOFTCAP))}."
    )


def _class_before_fsdp(module: torch.nn.Module) -> type:
    """The module's own class: FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Name>(FSDPModule, <Name>)``."""
    cls = type(module)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if issubclass(cls, FSDPModule):
            return next(base for base in cls.__mro__ if not issubclass(base, FSDPModule))
    return cls


def check_class_forward(model, allow_custom_forward: bool = False) -> None:
    """Refuse a model whose class overrides the forward of the HF causal-LM class registered for its model type.

    With labels the patched forward runs the decoder and the fused head + loss itself, so whatever an overriding
    forward does (rescale logits, add a loss term) would silently be dropped. ``allow_custom_forward=True`` is the
    user saying the override changes nothing between the decoder's hidden states and the loss.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = _class_before_fsdp(model)
    try:
        registered = MODEL_FOR_CAUSAL_LM_MAPPING[type(model.config)]
    except KeyError:
        registered = None
    if allow_custom_forward or (registered is not None and cls.forward is registered.forward):
        return
    what = (
        f"overrides {registered.__name__}.forward" if registered is not None
        else f"is not the causal-LM class registered for model type {model.config.model_type!r}"
    )
    raise UnsupportedModelError(
        f"apply_fused_simpo does not patch {cls.__module__}.{cls.__qualname__}: it {what}, and with labels the "
        f"patched forward runs the decoder, lm_head and the fused loss without calling that forward, so whatever it "
        f"changes would be silently dropped. Pass allow_custom_forward=True only if it changes nothing between the "
        f"decoder's hidden states and the loss."
    )


def plain_linear_head(model) -> torch.nn.Linear:
    """The model's ``lm_head``, checked to be a plain ``nn.Linear`` (what the fused loss reproduces)."""
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embeddings (lm_head): not a causal LM")
    if _class_before_fsdp(head) is not torch.nn.Linear:
        hint = ""
        if hasattr(head, "base_layer") or hasattr(head, "lora_A") or hasattr(head, "modules_to_save"):
            hint = (
                " It is wrapped by a PEFT adapter, whose contribution the fused loss would silently drop: "
                "keep lm_head out of target_modules / modules_to_save."
            )
        raise UnsupportedModelError(
            f"lm_head of {type(model).__name__} is a {type(head).__module__}.{type(head).__name__}, not a plain "
            f"torch.nn.Linear; the fused loss only uses lm_head.weight and lm_head.bias.{hint}"
        )
    return head
