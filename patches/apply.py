"""``apply_fused_simpo(model)``: per-instance patch of a HF causal LM's forward with the fused SimPO loss.

Called with ``labels``, the patched forward replaces the model's own head and loss::

    hidden = model.get_decoder()(**inputs).last_hidden_state             # (2B, T, H)
    logits = lm_head(hidden)            # (* softcap: cap * tanh(logits / cap) for Gemma-2/3)
    logits, labels = logits[:, :-1], labels[:, 1:]                      # shift: position t predicts t + 1
    loss = SimPO(logits[:B], logits[B:], labels)                        # TRL CPOTrainer(loss_type="simpo")

without materialising ``logits``. Called without ``labels`` it runs the model's original forward as is.

If the instance's forward was already wrapped when patched (accelerate's mixed precision: autocast and float32
outputs; accelerate hooks), the labels path runs inside the same wrappers; wrappers it cannot see through are
refused, and wrapping after patching always works. accelerate's ``unwrap_model(model, keep_fp32_wrapper=False)``
takes its mixed precision off a patched model in either order, as it does off an unpatched one. The fused loss itself is an eager graph break under
``torch.compile``; a patched model pickles, deep-copies and reverts to exactly what it had before.

This module holds the public API and the patch state; the patched forward is :mod:`patches.fused_forward`, the
handling of forward wrappers :mod:`patches.wrappers`.
"""
import contextlib
import inspect
from typing import Iterator, Optional

import torch

from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
from patches.fused_forward import STATE_ATTRIBUTE as _STATE_ATTRIBUTE
from patches.fused_forward import BoundFusedSimPOForward, FusedSimPOForward, follow_accelerate_unwrap
from patches.fused_forward import PatchState as _PatchState
from patches.heads import UnsupportedModelError, check_class_forward, head_softcap, plain_linear_head
from patches.options import SimPOOptions
from patches.wrappers import forward_wrappers

#: Instance attributes the patch sets, restored to their exact previous state (present or absent) by revert.
_PATCHED_ATTRIBUTES = ("forward", "accepts_loss_kwargs")


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


def patched_loss_fn(model: torch.nn.Module) -> Optional[LigerFusedLinearSimPOLoss]:
    """The loss module the patched forward of ``model`` (or of the model inside its PEFT / ``torch.compile``
    wrapper) calls, with the options it was patched with; None when it is not patched."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patched_loss_fn needs a torch.nn.Module (a HF causal LM), got {_type_name(model)}")
    state = _patch_state(model)
    return None if state is None else state.loss_fn


def apply_fused_simpo(
    model: torch.nn.Module,
    beta: float = SimPOOptions.beta,
    gamma: float = SimPOOptions.gamma,
    alpha: float = SimPOOptions.alpha,
    label_smoothing: float = SimPOOptions.label_smoothing,
    compute_nll_loss: bool = SimPOOptions.compute_nll_loss,
    ignore_index: int = SimPOOptions.ignore_index,
    chunk_size: int = SimPOOptions.chunk_size,
    compiled: bool = SimPOOptions.compiled,
    *,
    allow_custom_forward: bool = False,
    loss_fn: Optional[LigerFusedLinearSimPOLoss] = None,
) -> torch.nn.Module:
    """Patch ``model`` (a HF causal LM, or a PEFT / ``torch.compile`` wrapper of one) in place; returns it.

    Only this instance changes (its class and other instances don't). Applying again replaces the options
    (with the arguments given, defaults for the rest) without wrapping twice. The arguments are those of
    ``LigerFusedLinearSimPOLoss``; the defaults, :class:`patches.options.SimPOOptions`'s, follow the SimPO paper
    (gamma = 0.5 * beta, no NLL term).
    A model whose class overrides its HF class's ``forward`` is refused unless ``allow_custom_forward=True``.

    ``loss_fn`` (keyword only): the loss module the patched forward calls instead of the SimPO loss built from the
    options, a ``LigerFusedLinearSimPOLoss`` or a subclass of it (``LigerFusedLinearCPOLoss``, say); its own
    ``ignore_index`` then applies. The SimPO options must then stay at their defaults (TypeError otherwise).

    Patch before creating a ``transformers.Trainer`` on the model: the Trainer reads ``accepts_loss_kwargs``
    (set to ``False`` here) when it is created. A labelled call with ``num_items_in_batch`` (what a Trainer created
    before patching passes) raises ``ValueError``.
    """
    options = SimPOOptions.from_arguments(locals())  # checked here, before the model is touched
    _check_loss_fn(loss_fn, options)
    if not isinstance(allow_custom_forward, bool):
        raise TypeError(f"allow_custom_forward must be a bool (True or False), got {allow_custom_forward!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply_fused_simpo needs a torch.nn.Module (a HF causal LM), got {_type_name(model)}")
    target_model = _patch_target(model)
    head_softcap(target_model)
    plain_linear_head(target_model)
    check_class_forward(target_model, allow_custom_forward)
    if loss_fn is None:
        loss_fn = options.loss_module()
    state = target_model.__dict__.get(_STATE_ATTRIBUTE)
    if state is not None:
        follow_accelerate_unwrap(target_model, state)
        state.loss_fn = loss_fn
        return model

    wrappers = forward_wrappers(target_model)
    signature = inspect.signature(target_model.forward)
    saved = {name: target_model.__dict__[name] for name in _PATCHED_ATTRIBUTES if name in target_model.__dict__}
    patched_function = FusedSimPOForward(signature)
    # accelerate's prepare (mixed precision) keeps the forward it wrapped here; its unwrap_model pops it again
    accelerate_original = target_model.__dict__.get("_original_forward") if "forward" in saved else None
    target_model.__dict__[_STATE_ATTRIBUTE] = _PatchState(loss_fn, signature, saved, patched_function, wrappers,
                                                          accelerate_original)
    target_model.forward = BoundFusedSimPOForward(patched_function, target_model)
    # The loss is a mean over pairs, not a sum over tokens: the Trainer must divide it by the accumulation steps
    # itself (docs/usage.md, "Hugging Face Trainer and gradient accumulation"). A Trainer created before this line
    # has already decided otherwise; the patched forward refuses the num_items_in_batch such a Trainer passes.
    target_model.accepts_loss_kwargs = False
    return model


def _check_loss_fn(loss_fn, options: SimPOOptions) -> None:
    """A given ``loss_fn`` must be a fused SimPO-family loss module, and comes alone: options it would ignore are
    refused rather than dropped."""
    if loss_fn is None:
        return
    if not isinstance(loss_fn, LigerFusedLinearSimPOLoss):
        raise TypeError(f"loss_fn must be a LigerFusedLinearSimPOLoss (or a subclass, e.g. LigerFusedLinearCPOLoss), "
                        f"got {_type_name(loss_fn)}")
    changed = [f"{name}={value!r}" for name, value in options.as_dict().items()
               if value != getattr(_DEFAULT_OPTIONS, name)]
    if changed:
        raise TypeError(f"apply_fused_simpo takes either loss_fn or the SimPO options, not both: loss_fn carries its "
                        f"own options, so {', '.join(changed)} would be ignored")


_DEFAULT_OPTIONS = SimPOOptions()


def _type_name(value) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def revert_fused_simpo(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_fused_simpo`: the instance gets back exactly the attributes it had. No-op if unpatched."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"revert_fused_simpo needs a torch.nn.Module (a HF causal LM), got {_type_name(model)}")
    target_model = _patch_target(model)
    state = target_model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        return model
    follow_accelerate_unwrap(target_model, state)
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
    previous_loss_fn = patched_loss_fn(model)  # apply replaces it, never mutates it
    apply_fused_simpo(model, **options)
    try:
        yield model
    finally:
        if previous_loss_fn is None:
            revert_fused_simpo(model)
        else:
            _patch_state(model).loss_fn = previous_loss_fn


__all__ = ["apply_fused_simpo", "revert_fused_simpo", "fused_simpo", "patched_loss_fn", "UnsupportedModelError"]
