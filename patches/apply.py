"""``apply_fused_simpo(model)``: per-instance patch of a HF causal LM's forward with the fused SimPO loss.

Called with ``labels``, the patched forward replaces the model's own head and loss::

    hidden = model.get_decoder()(**inputs).last_hidden_state             # (2B, T, H)
    logits = lm_head(hidden)            # (* softcap: cap * tanh(logits / cap) for Gemma-2/3)
    logits, labels = logits[:, :-1], labels[:, 1:]                      # shift: position t predicts t + 1
    loss = SimPO(logits[:B], logits[B:], labels)                        # TRL CPOTrainer(loss_type="simpo")

without materialising ``logits``. Called without ``labels`` it runs the model's original forward as is.

If the instance's forward was already wrapped when patched (accelerate's mixed precision: autocast and float32
outputs; accelerate hooks), the labels path runs inside the same wrappers; wrappers it cannot see through are
refused, and wrapping after patching always works. The fused loss itself is an eager graph break under
``torch.compile``; a patched model pickles, deep-copies and reverts to exactly what it had before.
"""
import contextlib
import copy
import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
from patches.options import SimPOOptions
from patches.heads import UnsupportedModelError, check_class_forward, head_softcap, plain_linear_head
from patches.outputs import AUX_OUTPUT_NAMES, CACHE_FIELD, SimPOCausalLMOutputWithPast

#: Instance attribute holding the patch state of a patched model.
_STATE_ATTRIBUTE = "_fused_simpo_state"
#: Instance attributes the patch sets, restored to their exact previous state (present or absent) by revert.
_PATCHED_ATTRIBUTES = ("forward", "accepts_loss_kwargs")
#: Loss-only keyword arguments of HF causal-LM forwards that the decoder must not receive.
_HEAD_ONLY_KWARGS = ("num_items_in_batch", "logits_to_keep", "shift_labels")


@dataclass
class _PatchState:
    loss_fn: LigerFusedLinearSimPOLoss
    forward_signature: inspect.Signature
    #: instance ``__dict__`` entries of ``_PATCHED_ATTRIBUTES`` that existed before patching
    saved_attributes: Dict[str, Any]
    #: the unbound patched forward (tells revert whether someone replaced the instance's forward since)
    patched_function: "_FusedSimPOForward"
    #: what wrapped the instance's forward before patching (autocast, ...), outermost first; rerun with labels
    wrappers: Tuple["_ForwardWrapper", ...] = ()


def _original_forward(model: torch.nn.Module, state: _PatchState) -> Callable:
    """The forward the instance had before patching: its own (possibly wrapped) one, else the class's."""
    saved = state.saved_attributes.get("forward")
    return saved if saved is not None else types.MethodType(type(model).forward, model)


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a PEFT wrapper (the model itself otherwise): the one whose forward gets patched."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _patch_target(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model whose forward gets patched: inside a ``torch.compile`` wrapper and a PEFT wrapper.

    Patching the module inside ``torch.compile(model)`` keeps the compiled wrapper: dynamo notices the new forward
    and recompiles on the next call.
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return unwrap_peft(model)


def _patch_state(model: torch.nn.Module) -> Optional[_PatchState]:
    return _patch_target(model).__dict__.get(_STATE_ATTRIBUTE)


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


class _ForwardWrapper:
    """One understood layer around an instance's forward, re-run around the fused path when ``labels`` are given."""

    def run(self, model: torch.nn.Module, call: Callable, args: tuple, kwargs: dict):
        raise NotImplementedError


class _Autocast(_ForwardWrapper):
    """``torch.autocast(...)`` used as a decorator (what accelerate's mixed precision puts around the forward)."""

    def __init__(self, autocast: torch.autocast):
        self.autocast = autocast

    def run(self, model, call, args, kwargs):
        with copy.copy(self.autocast):  # a copy: an autocast instance keeps its enter/exit state on itself
            return call(*args, **kwargs)


class _OutputsToFp32(_ForwardWrapper):
    """accelerate's ``convert_outputs_to_fp32``: half-precision output tensors are returned as float32."""

    def run(self, model, call, args, kwargs):
        from accelerate.utils.operations import convert_to_fp32

        return convert_to_fp32(call(*args, **kwargs))


class _AccelerateHook(_ForwardWrapper):
    """accelerate's ``add_hook_to_module`` (device-map dispatch, offload): ``model._hf_hook`` around the forward."""

    def run(self, model, call, args, kwargs):
        hook = model._hf_hook
        args, kwargs = hook.pre_forward(model, *args, **kwargs)
        with torch.no_grad() if hook.no_grad else contextlib.nullcontext():
            output = call(*args, **kwargs)
        return hook.post_forward(model, output)


def _probe(*args, **kwargs):
    """Stand-in wrapped by :func:`_known_wrappers` to learn the code objects of known forward wrappers."""


@functools.lru_cache(maxsize=None)
def _known_wrappers() -> Dict[str, Any]:
    """Code objects (and classes) of the forward wrappers :func:`_forward_wrappers` understands.

    Recognised by their code objects, learnt by wrapping a probe, so that a lookalike is never mistaken for one.
    The accelerate entries are absent when accelerate is not installed.
    """
    known = {"autocast": torch.amp.autocast_mode.autocast_decorator(torch.autocast("cpu"), _probe).__code__}
    try:
        from accelerate.hooks import ModelHook, add_hook_to_module
        from accelerate.utils.operations import ConvertOutputsToFp32, convert_outputs_to_fp32
    except ImportError:
        return known
    known["outputs_to_fp32"] = convert_outputs_to_fp32(_probe).__code__
    known["outputs_to_fp32_class"] = ConvertOutputsToFp32
    known["accelerate_hook"] = add_hook_to_module(torch.nn.Identity(), ModelHook()).forward.func.__code__
    return known


def _closure_variables(function) -> Dict[str, Any]:
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in function.__closure__ or ())))


def _describe(function) -> str:
    """Where a wrapper comes from: ``functools.wraps`` copies the wrapped name, the code object keeps the real one."""
    code = getattr(function, "__code__", None)
    if code is None:
        return repr(function)
    return f"the function {code.co_qualname} ({code.co_filename}:{code.co_firstlineno})"


def _forward_wrappers(model: torch.nn.Module) -> Tuple[_ForwardWrapper, ...]:
    """The layers between the instance's ``forward`` and its class's forward, outermost first.

    Raises UnsupportedModelError for a layer not understood: with labels the fused path would run outside it.
    """
    forward = model.__dict__.get("forward")
    wrappers = []
    known = _known_wrappers()
    seen = set()
    while forward is not None and forward is not type(model).forward and id(forward) not in seen:
        seen.add(id(forward))
        code = getattr(forward, "__code__", None)
        if isinstance(forward, types.MethodType) and forward.__self__ is model:
            forward = forward.__func__
        elif isinstance(forward, functools.partial) and forward.args == (model,) and not forward.keywords:
            if getattr(forward.func, "__code__", None) is known.get("accelerate_hook"):
                wrappers.append(_AccelerateHook())
                forward = model._old_forward
            else:
                forward = forward.func
        elif code is not None and code is known["autocast"]:
            variables = _closure_variables(forward)
            wrappers.append(_Autocast(variables["autocast_instance"]))
            forward = variables["func"]
        elif code is not None and code is known.get("outputs_to_fp32"):
            forward = _closure_variables(forward)["model_forward"]  # the ConvertOutputsToFp32 below
        elif "outputs_to_fp32_class" in known and isinstance(forward, known["outputs_to_fp32_class"]):
            wrappers.append(_OutputsToFp32())
            forward = forward.model_forward
        else:
            raise UnsupportedModelError(
                f"apply_fused_simpo cannot see through {_describe(forward)}, which wraps the forward of this "
                f"{type(model).__name__}: with labels the fused loss would run outside that wrapper (e.g. without its "
                f"autocast). Patch the model first, then wrap or prepare it (apply_fused_simpo(model), then "
                f"accelerator.prepare(model) / torch.compile(model)); or remove the wrapper before patching."
            )
    if forward is not None and forward is not type(model).forward:  # left the loop on a cycle
        raise UnsupportedModelError(f"the forward of this {type(model).__name__} wraps itself: {_describe(forward)}")
    return tuple(wrappers)


def _run_inside(wrappers: Tuple[_ForwardWrapper, ...], model: torch.nn.Module, call: Callable, args, kwargs):
    """``call(*args, **kwargs)`` inside ``wrappers`` (outermost first), as the wrapped original forward would run."""
    if not wrappers:
        return call(*args, **kwargs)
    inner = functools.partial(_run_inside, wrappers[1:], model, call)
    return wrappers[0].run(model, lambda *a, **k: inner(a, k), args, kwargs)


def _check_labels(labels, inputs: Dict[str, Any]) -> None:
    """``labels`` (and ``shift_labels``) must be ``(2B, T)`` like ``input_ids``: B chosen rows, then B rejected."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"labels must be a (2B, T) tensor like input_ids (rows [0, B) chosen, [B, 2B) rejected), got {shape}"
        )
    for name in ("input_ids", "inputs_embeds"):
        if inputs.get(name) is not None:
            expected = tuple(inputs[name].shape[:2])
            if tuple(labels.shape) != expected:
                raise ValueError(
                    f"labels must have the shape of {name}, (2B, T) = {expected}; got {tuple(labels.shape)}"
                )
            break
    shift_labels = inputs.get("shift_labels")
    if shift_labels is not None and shift_labels.shape != labels.shape:
        raise ValueError(
            f"shift_labels must have the shape of labels {tuple(labels.shape)}; got {tuple(shift_labels.shape)}"
        )
    if labels.shape[0] % 2:
        raise ValueError(
            f"labels must have an even number of rows, 2B (B chosen rows, then their B rejected rows); "
            f"got {labels.shape[0]}"
        )


def _loss_dtype(operand_dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision operands (as HF's causal-LM loss), float64 for float64 ones."""
    return torch.promote_types(operand_dtype, torch.float32)


def _simpo_forward(model, state: _PatchState, labels: torch.Tensor, inputs: Dict[str, Any]):
    """Decoder, then the fused head + SimPO loss; returns a :class:`SimPOCausalLMOutputWithPast` (or its tuple)."""
    _check_labels(labels, inputs)
    shift_labels = inputs.get("shift_labels")
    return_dict = inputs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    decoder_inputs = {name: value for name, value in inputs.items() if name not in _HEAD_ONLY_KWARGS}
    # A loss forward needs no KV cache: don't let the decoder build one unless the caller asked for it.
    decoder_inputs.setdefault("use_cache", False)

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
            return _fused_loss(state.loss_fn, weight, hidden, target, bias, softcap, _loss_dtype(hidden.dtype))

    loss, aux_outputs = _call_as_forward_of(head, fused_head_loss, hidden)

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
def _fused_loss(loss_fn, weight, hidden, target, bias, softcap, output_dtype):
    """The fused loss, kept out of torch.compile graphs (a graph break): it is an autograd Function computing its
    own gradients chunk by chunk, which dynamo cannot trace; the decoder around it still compiles."""
    return loss_fn(weight, hidden, target, bias, softcap=softcap, output_dtype=output_dtype)


def _labelled_forward(model, state: _PatchState, *args, **kwargs):
    """The patched forward's labels path, called inside the original forward's wrappers."""
    inputs = _keyword_arguments(state.forward_signature, args, kwargs)
    labels = inputs.pop("labels")
    return _simpo_forward(model, state, labels, inputs)


def _fused_simpo_forward(model, args: tuple, kwargs: dict):
    state: _PatchState = model.__dict__[_STATE_ATTRIBUTE]
    try:
        inputs = _keyword_arguments(state.forward_signature, args, kwargs)
    except TypeError:
        return _original_forward(model, state)(*args, **kwargs)  # let the original forward raise its own error
    if inputs.get("labels") is None:
        return _original_forward(model, state)(*args, **kwargs)
    return _run_inside(state.wrappers, model, functools.partial(_labelled_forward, model, state), args, kwargs)


class _FusedSimPOForward:
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
        return self if model is None else _BoundFusedSimPOForward(self, model)


class _BoundFusedSimPOForward:
    """:class:`_FusedSimPOForward` bound to one model, like a method (``__func__``, ``__self__``).

    Not a ``types.MethodType``: that pickles as ``getattr(model, "forward")``, which, while the model is being
    unpickled, finds the class's forward. This one pickles and deep-copies with the model it is bound to.
    """

    def __init__(self, function: _FusedSimPOForward, model: torch.nn.Module):
        self.__func__ = function
        self.__self__ = model

    @property
    def __signature__(self) -> inspect.Signature:
        signature = self.__func__.__signature__
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    @property
    def __doc__(self):
        return self.__func__.__doc__

    __name__ = "forward"  # what functools.wraps and reprs read; the class keeps its own qualified name

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __repr__(self):
        return f"<fused SimPO forward of {type(self.__self__).__name__} at {id(self.__self__):#x}>"


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
    *,
    allow_custom_forward: bool = False,
) -> torch.nn.Module:
    """Patch ``model`` (a HF causal LM, or a PEFT / ``torch.compile`` wrapper of one) in place; returns it.

    Only this instance changes (its class and other instances don't). Applying again replaces the options
    (with the arguments given, defaults for the rest) without wrapping twice. The arguments are those of
    ``LigerFusedLinearSimPOLoss``; defaults follow the SimPO paper (gamma = 0.5 * beta, no NLL term).
    A model whose class overrides its HF class's ``forward`` is refused unless ``allow_custom_forward=True``.
    """
    options = SimPOOptions(beta=beta, gamma=gamma, alpha=alpha, label_smoothing=label_smoothing,
                           compute_nll_loss=compute_nll_loss, ignore_index=ignore_index, chunk_size=chunk_size,
                           compiled=compiled)  # checked here, before the model is touched
    if not isinstance(allow_custom_forward, bool):
        raise TypeError(f"allow_custom_forward must be a bool (True or False), got {allow_custom_forward!r}")
    target_model = _patch_target(model)
    head_softcap(target_model)
    plain_linear_head(target_model)
    check_class_forward(target_model, allow_custom_forward)
    loss_fn = options.loss_module()
    state = target_model.__dict__.get(_STATE_ATTRIBUTE)
    if state is not None:
        state.loss_fn = loss_fn
        return model

    wrappers = _forward_wrappers(target_model)
    signature = inspect.signature(target_model.forward)
    saved = {name: target_model.__dict__[name] for name in _PATCHED_ATTRIBUTES if name in target_model.__dict__}
    patched_function = _FusedSimPOForward(signature)
    target_model.__dict__[_STATE_ATTRIBUTE] = _PatchState(loss_fn, signature, saved, patched_function, wrappers)
    target_model.forward = _BoundFusedSimPOForward(patched_function, target_model)
    # The loss is a mean over pairs, not a sum over tokens: the Trainer must divide it by the accumulation steps
    # itself (docs/usage.md, "Hugging Face Trainer and gradient accumulation").
    target_model.accepts_loss_kwargs = False
    return model


def revert_fused_simpo(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_fused_simpo`: the instance gets back exactly the attributes it had. No-op if unpatched."""
    target_model = _patch_target(model)
    state = target_model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        return model
    current = target_model.__dict__.get("forward")
    # accelerate's unwrap_model rebinds the function it finds as a MethodType: still ours
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
