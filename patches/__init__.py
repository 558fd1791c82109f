"""Model patching for the fused linear + SimPO loss.

    from patches import apply_fused_simpo
    model = apply_fused_simpo(model)          # model(..., labels=labels).loss is the SimPO loss

Names are resolved lazily (PEP 562) so that importing a submodule of ``patches`` does not import transformers.
"""
import importlib

_EXPORTS = {
    "apply_fused_simpo": "patches.apply",
    "revert_fused_simpo": "patches.apply",
    "fused_simpo": "patches.apply",
    "patched_loss_fn": "patches.apply",
    "SimPOCausalLMOutputWithPast": "patches.outputs",
    "UnsupportedModelError": "patches.heads",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'patches' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
