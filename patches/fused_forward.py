"""The patched forward: with ``labels``, the decoder then the fused head + SimPO loss; without, the original forward.

:class:`FusedSimPOForward` is what ``apply_fused_simpo`` installs on the instance. It reads the patch state
(:class:`PatchState`) from the instance's ``STATE_ATTRIBUTE`` on every call, so re-applying with new options only
swaps the state's loss.
"""
import contextlib
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
from patches import varlen
from patches.heads import head_softcap, plain_linear_head
from patches.labels import loss_target, raise_for_label_values
from patches.outputs import AUX_OUTPUT_NAMES, CACHE_FIELD, SimPOCausalLMOutputWithPast
from patches.wrappers import ForwardWrapper, accelerate_unwrapped, call_as_forward_of, forward_wrappers, run_inside

#: Instance attribute holding the patch state of a patched model.
STATE_ATTRIBUTE = "_fused_simpo_state"
#: Loss-only keyword arguments of HF causal-LM forwards that the decoder must not receive.
_HEAD_ONLY_KWARGS = ("num_items_in_batch", "logits_to_keep", "shift_labels")
#: Why a labelled call with ``num_items_in_batch`` is refused. A transformers Trainer passes it only when it decided,
#: at construction, that the model takes loss kwargs (the unpatched forward's ``**kwargs``); it then expects a sum
#: over label tokens divided by that count and skips its own division by the accumulation steps. The SimPO loss is
#: a mean over pairs: no rescaling by a token count gives the big-batch gradient, so ignoring the count would make
#: every update ``gradient_accumulation_steps`` times too large (times ``world_size`` more under DDP with
#: ``average_tokens_across_devices``, the default: the Trainer then multiplies the loss by the process count).
TOKEN_COUNT_REFUSAL = (
    "the fused SimPO loss is a mean over pairs and cannot be normalised by num_items_in_batch (a count of label "
    "tokens). A transformers Trainer passes it when it was created before apply_fused_simpo: it then skips its "
    "division by gradient_accumulation_steps, and every update would be that many times too large. Patch the model "
    "before creating the Trainer (or use patches.trainer.SimPOTrainer), or set trainer.model_accepts_loss_kwargs = "
    "False on the existing one."
)


@dataclass
class PatchState:
    """What ``apply_fused_simpo`` keeps on a patched instance (under ``STATE_ATTRIBUTE``)."""

    loss_fn: LigerFusedLinearSimPOLoss
    forward_signature: inspect.Signature
    #: instance ``__dict__`` entries of the attributes the patch sets (apply.py) that existed before patching
    saved_attributes: Dict[str, Any]
    #: the unbound patched forward (tells revert whether someone replaced the instance's forward since)
    patched_function: "FusedSimPOForward"
    #: what wrapped the instance's forward before patching (autocast, ...), outermost first; rerun with labels
    wrappers: Tuple[ForwardWrapper, ...] = ()
    #: the ``_original_forward`` that accelerate's ``prepare`` (mixed precision) had set when patched, until
    #: accelerate's ``unwrap_model(keep_fp32_wrapper=False)`` pops it (see :func:`follow_accelerate_unwrap`)
    accelerate_original_forward: Optional[Callable] = None


def _original_forward(model: torch.nn.Module, state: "PatchState") -> Callable:
    """The forward the instance had before patching: its own (possibly wrapped) one, else the class's."""
    saved = state.saved_attributes.get("forward")
    return saved if saved is not None else types.MethodType(type(model).forward, model)


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


def _autocast_operands(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Cast the head's operands to the autocast dtype when autocast is on, as ``lm_head(hidden)`` would be."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _loss_dtype(operand_dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision operands (as HF's causal-LM loss), float64 for float64 ones."""
    return torch.promote_types(operand_dtype, torch.float32)


#: Attention implementations that keep packed sequences apart given only ``position_ids`` (no attention mask, no
#: cache). sdpa and flex_attention run the variable-length path of :mod:`patches.varlen` for a packed batch of the
#: patched forward, as ``packed_varlen`` (that path by name) does; eager keeps transformers' block-diagonal mask
#: (checked with transformers 4.57, 5.17 and 5.24); flash_attention_2/3 their own variable-length kernels (their
#: documented padding-free path).
PACKED_ATTENTION = ("sdpa", "flex_attention", varlen.ATTENTION_NAME, "eager", "flash_attention_2",
                    "flash_attention_3")


def _check_packed_attention(model, inputs: Dict[str, Any]) -> None:
    """Refuse, with what to do instead, a packed batch whose sequences the decoder would let attend to each other."""
    if inputs.get("past_key_values") is not None or inputs.get("use_cache"):
        raise ValueError(
            "a packed batch (one row, position_ids restarting at each sequence) cannot use a KV cache: transformers "
            "only separates packed sequences when no cache is passed; call the model with use_cache=False and no "
            "past_key_values"
        )
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in PACKED_ATTENTION:
        raise ValueError(
            f"attn_implementation={implementation!r} does not separate packed sequences given position_ids alone, "
            f"so each sequence would attend to the ones before it; load the model with attn_implementation= one of "
            f"{', '.join(PACKED_ATTENTION)} (sdpa and flex_attention run packed batches through the variable-length "
            f"path), or use padded batches"
        )


def _packed_attention(model, decoder, offsets: torch.Tensor):
    """The context the decoder runs a packed batch in: for sdpa, flex_attention and packed_varlen, the keyword
    arguments that send every attention layer through the variable-length path (:func:`patches.varlen.packed_forward`);
    for eager and flash_attention_2/3, transformers' own packed handling."""
    if not varlen.accepts_packed_sequences(decoder):
        if getattr(model.config, "_attn_implementation", None) in ("flex_attention", varlen.ATTENTION_NAME):
            raise ValueError(
                f"{type(decoder).__name__}.forward takes no **kwargs, so the packed sequences cannot reach its "
                f"attention layers: attn_implementation={model.config._attn_implementation!r} would compile a "
                f"flex_attention kernel for every packed length or mix the sequences; load the model with "
                f"attn_implementation='flash_attention_2' or 'sdpa', or use padded batches")
        return contextlib.nullcontext({})
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device if embeddings is not None else offsets.device
    return varlen.packed_forward(model, offsets.tolist(), device)


def _simpo_forward(model, state: "PatchState", inputs: Dict[str, Any]):
    """Decoder, then the fused head + SimPO loss, for the keyword ``inputs`` of a call with labels; returns a
    :class:`SimPOCausalLMOutputWithPast` (or its tuple).

    A packed batch (one row, ``position_ids`` restarting at each sequence, no attention mask) is computed as the
    padded batch of its 2B sequences would be (``LigerFusedLinearPreferenceBase.apply_packed``).
    """
    labels = inputs.pop("labels")
    ignore_index = state.loss_fn.ignore_index
    target, offsets = loss_target(labels, inputs, ignore_index)
    if offsets is not None:
        _check_packed_attention(model, inputs)
    return_dict = inputs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    decoder_inputs = {name: value for name, value in inputs.items() if name not in _HEAD_ONLY_KWARGS}
    # A loss forward needs no KV cache: don't let the decoder build one unless the caller asked for it.
    decoder_inputs.setdefault("use_cache", False)

    head = plain_linear_head(model)  # checked on every call: an adapter may have been put on lm_head since
    softcap = head_softcap(model)
    decoder = model.get_decoder()
    if offsets is not None:
        with _packed_attention(model, decoder, offsets) as attention_kwargs:
            decoder_outputs = decoder(**decoder_inputs, **attention_kwargs)
    else:  # no with block: torch.compile cannot resume a graph broken inside one around a dict
        decoder_outputs = decoder(**decoder_inputs)
    hidden = decoder_outputs[0].to(head.weight.device)
    target = target.to(hidden.device)

    def fused_head_loss(hidden):
        # lm_head's parameters are read here, inside lm_head's own call (see wrappers.call_as_forward_of)
        hidden, weight, bias = _autocast_operands(hidden, head.weight, head.bias)
        # The Function computes its own gradients: autocast must not recast the matmuls inside it.
        with torch.autocast(hidden.device.type, enabled=False):
            return _fused_loss(state.loss_fn, weight, hidden, target, bias, softcap, _loss_dtype(hidden.dtype),
                               offsets)

    try:
        loss, aux_outputs = call_as_forward_of(head, fused_head_loss, hidden)
    except ValueError as error:
        raise_for_label_values(error, target, inputs.get("shift_labels") is not None, ignore_index,
                               head.weight.shape[0])
        raise

    output = SimPOCausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=getattr(decoder_outputs, "hidden_states", None),
        attentions=getattr(decoder_outputs, "attentions", None),
        **{CACHE_FIELD: getattr(decoder_outputs, CACHE_FIELD, None)},
        **dict(zip(AUX_OUTPUT_NAMES, aux_outputs)),
    )
    return output if return_dict else output.to_tuple()


@torch.compiler.disable
def _fused_loss(loss_fn, weight, hidden, target, bias, softcap, output_dtype, sequence_offsets):
    """The fused loss, kept out of torch.compile graphs (a graph break): it is an autograd Function computing its
    own gradients chunk by chunk, which dynamo cannot trace; the decoder around it still compiles. The loss sees
    a packed row (its ``sequence_offsets``; None when padded) as its 2B sequences."""
    if sequence_offsets is None:
        return loss_fn(weight, hidden, target, bias, softcap=softcap, output_dtype=output_dtype)
    return loss_fn(weight, hidden, target, bias, softcap=softcap, output_dtype=output_dtype,
                   sequence_offsets=sequence_offsets)


def follow_accelerate_unwrap(model: torch.nn.Module, state: "PatchState") -> None:
    """Bring the patch up to date with an ``accelerator.unwrap_model(model, keep_fp32_wrapper=False)`` run since.

    That unwrap pops ``model._original_forward``, follows the instance forward's ``__wrapped__`` chain (the patched
    forward's leads to the unbound :class:`FusedSimPOForward`) and rebinds what it reaches with ``MethodType``. Its
    intent, taking accelerate's autocast and float32 outputs off, is carried over to the forward saved when
    patching (if accelerate had wrapped it by then) and so to the wrappers the labels path re-runs: the model
    then runs, and reverts, as an unpatched model unwrapped the same way. The rebound forward becomes a
    :class:`BoundFusedSimPOForward` again, which pickles with the model.
    """
    original = state.accelerate_original_forward
    if original is not None and "_original_forward" not in model.__dict__:
        state.accelerate_original_forward = None
        unwrapped = accelerate_unwrapped(state.saved_attributes["forward"], original, model)
        state.wrappers = forward_wrappers(model, unwrapped)
        state.saved_attributes["forward"] = unwrapped
    current = model.__dict__.get("forward")
    if type(current) is types.MethodType and current.__func__ is state.patched_function:
        model.__dict__["forward"] = BoundFusedSimPOForward(state.patched_function, model)


def _fused_simpo_forward(model, args: tuple, kwargs: dict):
    """The patched forward: the call's arguments bound once, as keywords; with labels, :func:`_simpo_forward` on
    them inside the wrappers the original forward had, else the original forward as called."""
    state: "PatchState" = model.__dict__[STATE_ATTRIBUTE]
    follow_accelerate_unwrap(model, state)
    try:
        inputs = _keyword_arguments(state.forward_signature, args, kwargs)
    except TypeError:
        return _original_forward(model, state)(*args, **kwargs)  # let the original forward raise its own error
    if inputs.get("labels") is None:
        return _original_forward(model, state)(*args, **kwargs)
    if inputs.get("num_items_in_batch") is not None:
        raise ValueError(TOKEN_COUNT_REFUSAL)
    return run_inside(state.wrappers, model, lambda **inputs: _simpo_forward(model, state, inputs), inputs)


class FusedSimPOForward:
    """The patched forward, unbound: ``(model, *args, **kwargs)``. A module-level class, not a closure, so that a
    patched model pickles; it advertises the original forward's signature, which ``generate()`` and the Trainer
    inspect."""

    __name__ = "forward"  # what functools.wraps and reprs read; the class keeps its own qualified name

    def __init__(self, signature: inspect.Signature):
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.__signature__ = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
        self.__doc__ = "Fused SimPO forward (patches.apply_fused_simpo): with labels, SimPO loss, logits=None."

    def __call__(self, model, *args, **kwargs):
        return _fused_simpo_forward(model, args, kwargs)

    def __get__(self, model, owner=None):
        return self if model is None else BoundFusedSimPOForward(self, model)


class BoundFusedSimPOForward:
    """:class:`FusedSimPOForward` bound to one model, like a method (``__func__``, ``__self__``).

    Not a ``types.MethodType``: that pickles as ``getattr(model, "forward")``, which, while the model is being
    unpickled, finds the class's forward. This one pickles and deep-copies with the model it is bound to.
    """

    def __init__(self, function: FusedSimPOForward, model: torch.nn.Module):
        self.__func__ = function
        self.__self__ = model

    @property
    def __signature__(self) -> inspect.Signature:
        signature = self.__func__.__signature__
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    @property
    def __doc__(self):
        return self.__func__.__doc__

    @property
    def __wrapped__(self) -> FusedSimPOForward:
        """The unbound patched forward: accelerate's ``unwrap_model(keep_fp32_wrapper=False)`` follows
        ``__wrapped__`` and binds what it reaches to the model with ``MethodType``, which then calls it as
        ``function(model, *args)``; binding this object itself would pass the model twice."""
        return self.__func__

    __name__ = "forward"  # what functools.wraps and reprs read; the class keeps its own qualified name

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __repr__(self):
        return f"<fused SimPO forward of {type(self.__self__).__name__} at {id(self.__self__):#x}>"
