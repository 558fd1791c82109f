"""``apply_fused_simpo(model)``: per-instance patch of a HF causal LM's forward with the fused SimPO loss.

Called with ``labels``, the patched forward replaces the model's own head and loss::

    hidden = model.get_decoder()(**inputs).last_hidden_state             # (2B, T, H)
    logits = lm_head(hidden)            # (* softcap: cap * tanh(logits / cap) for Gemma-2/3)
    logits, labels = logits[:, :-1], labels[:, 1:]                      # shift: position t predicts t + 1
    loss = SimPO(logits[:B], logits[B:], labels)                        # TRL CPOTrainer(loss_type="simpo")

without materialising ``logits``. Called without ``labels`` it runs the model's original forward as is.
"""
import contextlib
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
from patches.options import SimPOOptions
from patches.heads import UnsupportedModelError, head_softcap, plain_linear_head
from patches.outputs import AUX_OUTPUT_NAMES, SimPOCausalLMOutputWithPast

#: Instance attribute holding the patch state of a patched model.
_STATE_ATTRIBUTE = "_fused_simpo_state"
#: Instance attributes the patch sets, restored to their exact previous state (present or absent) by revert.
_PATCHED_ATTRIBUTES = ("forward", "accepts_loss_kwargs")
#: Loss-only keyword arguments of HF causal-LM forwards that the decoder must not receive.
_HEAD_ONLY_KWARGS = ("num_items_in_batch", "logits_to_keep", "shift_labels")


@dataclass
class _PatchState:
    loss_fn: LigerFusedLinearSimPOLoss
    #: the forward the instance had before patching (bound), run whenever ``labels`` is absent
    original_forward: Callable
    forward_signature: inspect.Signature
    #: instance ``__dict__`` entries of ``_PATCHED_ATTRIBUTES`` that existed before patching
    saved_attributes: Dict[str, Any]
    #: the function bound as the instance's ``forward`` (tells revert whether someone wrapped it since)
    patched_function: Callable


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a PEFT wrapper (the model itself otherwise): the one whose forward gets patched."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _patch_state(model: torch.nn.Module) -> Optional[_PatchState]:
    return unwrap_peft(model).__dict__.get(_STATE_ATTRIBUTE)


def _keyword_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """All arguments of a forward call as keywords (``**kwargs`` flattened); TypeError if they don't bind."""
    bound = signature.bind(*args, **kwargs)
    keywords: Dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            keywords.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"the fused SimPO forward cannot pass extra positional arguments {value!r}")
        else:
            keywords[name] = value
    return keywords


def _shifted_target(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels[:, 1:]`` padded with one ``ignore_index`` column, as HF's ``ForCausalLMLoss`` does.

    Position t of the hidden states then predicts ``labels[:, t + 1]``; the last position predicts nothing but
    still enters the logits means, which thus average over every position like TRL's metrics.
    """
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def _autocast_operands(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Cast the head's operands to the autocast dtype when autocast is on, as ``lm_head(hidden)`` would be."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _call_as_forward_of(module: torch.nn.Module, function: Callable, *args):
    """``function(*args)`` run as ``module``'s forward, i.e. inside ``module(*args)``, so module hooks run around it.

    The fused loss uses lm_head's weight without computing ``lm_head(hidden)``; wrappers acting through lm_head's
    hooks still need that call: FSDP2 (``fully_shard(lm_head)``, or accelerate's ``[norm, lm_head]`` unit)
    all-gathers the sharded weight before, frees it after, and reduce-scatters its gradient in backward.
    """
    previous_forward = module.__dict__.get("forward")
    module.forward = function
    try:
        return module(*args)
    finally:
        if previous_forward is None:
            del module.forward
        else:
            module.forward = previous_forward


def _simpo_forward(model, state: _PatchState, labels: torch.Tensor, inputs: Dict[str, Any]):
    """Decoder, then the fused head + SimPO loss; returns a :class:`SimPOCausalLMOutputWithPast` (or its tuple)."""
    shift_labels = inputs.get("shift_labels")
    return_dict = inputs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    decoder_inputs = {name: value for name, value in inputs.items() if name not in _HEAD_ONLY_KWARGS}

    head = plain_linear_head(model)  # checked on every call: an adapter may have been put on lm_head since
    softcap = head_softcap(model)
    decoder_outputs = model.get_decoder()(**decoder_inputs)
    hidden = decoder_outputs[0].to(head.weight.device)
    ignore_index = state.loss_fn.ignore_index
    target = shift_labels if shift_labels is not None else _shifted_target(labels, ignore_index)
    target = target.to(hidden.device)

    def fused_head_loss(hidden):
        # lm_head's parameters are read here, inside lm_head's own call (see _call_as_forward_of)
        hidden, weight, bias = _autocast_operands(hidden, head.weight, head.bias)
        # The Function computes its own gradients: autocast must not recast the matmuls inside it.
        with torch.autocast(hidden.device.type, enabled=False):
            return state.loss_fn(weight, hidden, target, bias, softcap=softcap)

    loss, aux_outputs = _call_as_forward_of(head, fused_head_loss, hidden)

    output = SimPOCausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(decoder_outputs, "past_key_values", None),
        hidden_states=getattr(decoder_outputs, "hidden_states", None),
        attentions=getattr(decoder_outputs, "attentions", None),
        **dict(zip(AUX_OUTPUT_NAMES, aux_outputs)),
    )
    return output if return_dict else output.to_tuple()


def _fused_simpo_forward(model, args: tuple, kwargs: dict):
    state: _PatchState = model.__dict__[_STATE_ATTRIBUTE]
    try:
        inputs = _keyword_arguments(state.forward_signature, args, kwargs)
    except TypeError:
        return state.original_forward(*args, **kwargs)  # let the original forward raise its own error
    labels = inputs.pop("labels", None)
    if labels is None:
        return state.original_forward(*args, **kwargs)
    return _simpo_forward(model, state, labels, inputs)


def _make_patched_forward(signature: inspect.Signature) -> Callable:
    """A fresh function to bind to one instance, advertising the original forward's signature.

    ``generate()`` and the Trainer inspect ``model.forward``'s parameters, so they must see the original ones.
    """

    def forward(self, *args, **kwargs):
        return _fused_simpo_forward(self, args, kwargs)

    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
    forward.__doc__ = "Fused SimPO forward (patches.apply_fused_simpo): with labels, SimPO loss, logits=None."
    return forward


def apply_fused_simpo(
    model: torch.nn.Module,
    beta: float = 2.0,
    gamma: float = 1.0,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    compute_nll_loss: bool = False,
    ignore_index: int = -100,
    chunk_size: int = 1,
    compiled: bool = True,
) -> torch.nn.Module:
    """Patch ``model`` (a HF causal LM or a PEFT wrapper of one) in place; returns the same object.

    Only this instance changes (its class and other instances don't). Applying again replaces the options
    (with the arguments given, defaults for the rest) without wrapping twice. The arguments are those of
    ``LigerFusedLinearSimPOLoss``; defaults follow the SimPO paper (gamma = 0.5 * beta, no NLL term).
    """
    options = SimPOOptions(beta=beta, gamma=gamma, alpha=alpha, label_smoothing=label_smoothing,
                           compute_nll_loss=compute_nll_loss, ignore_index=ignore_index, chunk_size=chunk_size,
                           compiled=compiled)  # checked here, before the model is touched
    target_model = unwrap_peft(model)
    head_softcap(target_model)
    plain_linear_head(target_model)
    loss_fn = options.loss_module()
    state = target_model.__dict__.get(_STATE_ATTRIBUTE)
    if state is not None:
        state.loss_fn = loss_fn
        return model

    original_forward = target_model.forward
    signature = inspect.signature(original_forward)
    saved = {name: target_model.__dict__[name] for name in _PATCHED_ATTRIBUTES if name in target_model.__dict__}
    patched_function = _make_patched_forward(signature)
    target_model.__dict__[_STATE_ATTRIBUTE] = _PatchState(loss_fn, original_forward, signature, saved, patched_function)
    target_model.forward = types.MethodType(patched_function, target_model)
    # The loss is a mean over pairs, not a sum over tokens: the Trainer must divide it by the accumulation steps
    # itself (docs/usage.md, "Hugging Face Trainer and gradient accumulation").
    target_model.accepts_loss_kwargs = False
    return model


def revert_fused_simpo(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_fused_simpo`: the instance gets back exactly the attributes it had. No-op if unpatched."""
    target_model = unwrap_peft(model)
    state = target_model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        return model
    current = target_model.__dict__.get("forward")
    if getattr(current, "__func__", None) is not state.patched_function:
        raise RuntimeError(
            f"cannot revert the fused SimPO patch of {type(target_model).__name__}: its forward was replaced by "
            f"{current!r} after patching; remove that wrapper first"
        )
    for name in _PATCHED_ATTRIBUTES:
        target_model.__dict__.pop(name, None)
    target_model.__dict__.update(state.saved_attributes)
    del target_model.__dict__[_STATE_ATTRIBUTE]
    return model


@contextlib.contextmanager
def fused_simpo(model: torch.nn.Module, **options) -> Iterator[torch.nn.Module]:
    """``with fused_simpo(model, beta=2.5) as m:`` patch for the block, then restore the previous state.

    The previous state is restored on exit, also after an exception: unpatched, or patched with its old options.
    """
    previous = _patch_state(model)
    previous_loss_fn = None if previous is None else previous.loss_fn  # apply replaces it, never mutates it
    apply_fused_simpo(model, **options)
    try:
        yield model
    finally:
        if previous_loss_fn is None:
            revert_fused_simpo(model)
        else:
            _patch_state(model).loss_fn = previous_loss_fn


__all__ = ["apply_fused_simpo", "revert_fused_simpo", "fused_simpo", "UnsupportedModelError"]
