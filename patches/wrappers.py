"""The layers around an instance's forward that a patched model re-runs around its fused path.

``apply_fused_simpo`` may find the instance's forward already wrapped (accelerate's mixed precision: autocast and
float32 outputs; accelerate hooks; ``functools.wraps`` chains). :func:`forward_wrappers` reads those layers,
outermost first, and refuses any it cannot see through; :func:`run_inside` re-runs a call inside them.
:func:`call_as_forward_of` runs the fused loss as lm_head's forward, so the hooks on lm_head (FSDP2, DeepSpeed)
run around it.
"""
import contextlib
import copy
import functools
import types
from typing import Any, Callable, Dict, Tuple

import torch

from patches.heads import UnsupportedModelError


class ForwardWrapper:
    """One understood layer around an instance's forward, re-run around the fused path when ``labels`` are given."""

    def run(self, model: torch.nn.Module, call: Callable, inputs: Dict[str, Any]):
        """``call(**inputs)`` inside this layer, as the layer would run the forward it wraps (the keyword
        ``inputs`` of the call, bound once by the patched forward)."""
        raise NotImplementedError


class _Autocast(ForwardWrapper):
    """``torch.autocast(...)`` used as a decorator (what accelerate's mixed precision puts around the forward)."""

    def __init__(self, autocast: torch.autocast):
        self.autocast = autocast

    def run(self, model, call, inputs):
        with copy.copy(self.autocast):  # a copy: an autocast instance keeps its enter/exit state on itself
            return call(**inputs)


class _OutputsToFp32(ForwardWrapper):
    """accelerate's ``convert_outputs_to_fp32``: half-precision output tensors are returned as float32."""

    def run(self, model, call, inputs):
        from accelerate.utils.operations import convert_to_fp32

        return convert_to_fp32(call(**inputs))


class _AccelerateHook(ForwardWrapper):
    """accelerate's ``add_hook_to_module`` (device-map dispatch, offload): ``model._hf_hook`` around the forward."""

    def run(self, model, call, inputs):
        hook = model._hf_hook
        args, kwargs = hook.pre_forward(model, **inputs)
        with torch.no_grad() if hook.no_grad else contextlib.nullcontext():
            output = call(*args, **kwargs)
        return hook.post_forward(model, output)


def _probe(*args, **kwargs):
    """Stand-in wrapped by :func:`_known_wrappers` to learn the code objects of known forward wrappers."""


@functools.lru_cache(maxsize=None)
def _known_wrappers() -> Dict[str, Any]:
    """Code objects (and classes) of the forward wrappers :func:`forward_wrappers` understands.

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


def _class_forwards(model: torch.nn.Module) -> Tuple[Any, ...]:
    """The class's forward and the functions its decorators wrap (its ``__wrapped__`` chain), which accelerate's
    ``unwrap_model`` may leave bound on the instance: all of them are the class's own forward."""
    forwards = [type(model).forward]
    while hasattr(forwards[-1], "__wrapped__") and len(forwards) < 100:
        forwards.append(forwards[-1].__wrapped__)
    return tuple(forwards)


def forward_wrappers(model: torch.nn.Module, forward: Any = None) -> Tuple[ForwardWrapper, ...]:
    """The layers between the instance's ``forward`` (or ``forward``, given) and its class's, outermost first.

    Raises UnsupportedModelError for a layer not understood: with labels the fused path would run outside it.
    """
    if forward is None:
        forward = model.__dict__.get("forward")
    class_forwards = _class_forwards(model)
    wrappers = []
    known = _known_wrappers()
    seen = set()
    while forward is not None and not any(forward is f for f in class_forwards) and id(forward) not in seen:
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
    if forward is not None and not any(forward is f for f in class_forwards):  # left the loop on a cycle
        raise UnsupportedModelError(f"the forward of this {type(model).__name__} wraps itself: {_describe(forward)}")
    return tuple(wrappers)


def accelerate_unwrapped(forward: Callable, original_forward: Callable, model: torch.nn.Module) -> Callable:
    """What accelerate's ``unwrap_model(model, keep_fp32_wrapper=False)`` makes of the instance forward ``forward``,
    ``original_forward`` being the ``model._original_forward`` that ``prepare`` saved (and unwrap pops): it follows the
    ``__wrapped__`` chain down to that forward or to its end and binds what it reaches to ``model``
    (``accelerate.utils.extract_model_from_parallel``)."""
    while hasattr(forward, "__wrapped__"):
        forward = forward.__wrapped__
        if forward == original_forward:
            break
    return types.MethodType(forward, model)


def run_inside(wrappers: Tuple[ForwardWrapper, ...], model: torch.nn.Module, call: Callable, inputs: Dict[str, Any]):
    """``call(**inputs)`` inside ``wrappers`` (outermost first), as the wrapped original forward would run."""
    if not wrappers:
        return call(**inputs)
    return wrappers[0].run(model, lambda **keywords: run_inside(wrappers[1:], model, call, keywords), inputs)


def call_as_forward_of(module: torch.nn.Module, function: Callable, *args):
    """``function(*args)`` run as ``module``'s forward, i.e. inside ``module(*args)``, so module hooks run around it.

    The fused loss uses lm_head's weight without computing ``lm_head(hidden)``; wrappers acting through lm_head's
    hooks still need that call: FSDP2 (``fully_shard(lm_head)``, or accelerate's ``[norm, lm_head]`` unit)
    all-gathers the sharded weight before, frees it after, and reduce-scatters its gradient in backward. The
    hooks' output is returned: DeepSpeed ZeRO-3 passes the tensors through autograd functions of its own (same
    shapes), whose backward hooks must stay in the graph. A hook that changes the output's structure (returns
    anything but the ``(loss, aux_outputs)`` of tensors of the same shapes) is refused: it expected logits.
    """
    results = []

    def forward(*args):
        results.append(function(*args))
        return results[-1]

    previous_forward = module.__dict__.get("forward")
    module.forward = forward
    try:
        output = module(*args)
    finally:
        if previous_forward is None:
            del module.forward
        else:
            module.forward = previous_forward
    if not results or not _same_structure(output, results[-1]):
        raise RuntimeError(
            f"a forward hook on {type(module).__name__} (the model's lm_head) replaced its output: with labels the "
            f"fused SimPO loss runs inside lm_head's call and never builds the logits such a hook would change. "
            f"Remove the hook (hooks that return None, like FSDP's, are fine) or call the model without labels"
        )
    return output

def _same_structure(output, expected) -> bool:
    """``output`` is ``expected`` or, tensor by tensor, a nest of the same types and tensor shapes."""
    if isinstance(expected, torch.Tensor):
        return isinstance(output, torch.Tensor) and output.shape == expected.shape
    if isinstance(expected, (tuple, list)):
        return isinstance(output, (tuple, list)) and len(output) == len(expected) and all(
            _same_structure(o, e) for o, e in zip(output, expected))
    return output is expected
