"""What the fused Function does to behave like plain autograd: grad mode, in-place checks, double backward,
torch.compile."""
import weakref
from typing import Optional, Tuple

import torch


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


def graph_links(*tensors: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """For each of ``tensors`` that requires grad, a tensor with its gradient edge and none of its memory.

    A leaf stands for itself (its gradient accumulator, which the call's node reaches, holds it anyway); any
    other tensor is represented by an empty copy of it (``narrow_copy`` of no rows: no storage, one tiny node
    pointing at the tensor's ``grad_fn``), so that the hidden states are not kept alive until backward. Built
    with grad mode on, as forward runs under no_grad.
    """
    with torch.enable_grad():
        return tuple(t if t.is_leaf else torch.narrow_copy(t, 0, 0, 0)
                     for t in tensors if t is not None and t.requires_grad)


def refuse_double_backward(grads: Tuple[Optional[torch.Tensor], ...], node_name: str,
                           links: Tuple[Optional[torch.Tensor], ...]):
    """``grads`` (values unchanged) as the outputs of a node that raises when differentiated.

    The gradients were computed in forward, outside any graph: without this they would come back from
    ``torch.autograd.grad(..., create_graph=True)`` as constants, and a gradient penalty built on them would
    silently contribute nothing. ``links`` are what the gradients depend on: the forward's inputs (their
    :func:`graph_links`) and the upstream gradient when it requires grad. The raising node is linked to them, so
    it lies on every path from the gradients back to those inputs and everything upstream of them: every
    second-order route runs it and raises this message (``torch.autograd.grad(g, x)``, also with
    ``allow_unused=True``, ``torch.autograd.functional.hvp``, ``.backward()``).
    ``torch.autograd.function.once_differentiable`` links its node to detached copies of the gradients instead,
    which only ``.backward()`` reaches: a gradient with respect to an input finds its node unused.
    """
    message = (
        f"{node_name}: double backward is not supported. The fused linear + preference loss computes its "
        "gradients in forward, so they cannot be differentiated again (e.g. a gradient penalty from "
        "torch.autograd.grad(loss, ..., create_graph=True)). Use an unfused loss for second-order terms."
    )
    links = tuple(t for t in links if t is not None and t.requires_grad)
    error_node = torch._C._functions.DelayedError(message, len(grads) + len(links))
    # The node gives every output it returns its grad_fn as soon as one input requires grad, which the links do.
    outputs = error_node(*(None if g is None else g.detach() for g in grads), *links)
    return outputs[:len(grads)]


def builds_graph(ctx) -> bool:
    """Whether autograd records this call (grad mode on and an input requiring grad).

    Inside ``forward`` grad mode is always off and ``ctx.needs_input_grad`` ignores the caller's grad mode;
    the graph edges to the inputs, however, exist only when the call is recorded: under ``torch.no_grad()``
    (or ``inference_mode``) only the loss is computed.
    """
    return len(ctx.next_functions) > 0


def needed_gradients(ctx, has_bias: bool) -> Tuple[bool, bool, bool]:
    """Whether the input, weight and bias gradients are needed: asked for, and the call recorded by autograd."""
    recorded = builds_graph(ctx)
    needs = ctx.needs_input_grad
    return recorded and needs[0], recorded and needs[1], recorded and has_bias and needs[3]


def run_eagerly_under_compile(forward):
    """``forward`` (a classmethod or staticmethod) behind ``torch.compiler.disable``.

    The fused loss reads device values on the host and loops over a chunk plan that depends on them, which
    torch.compile cannot trace (nor follow ``super()`` in a classmethod ``forward``): the compiled caller gets a
    graph break around ``apply``, which then runs eagerly, autograd node and all.
    """
    kind = type(forward) if isinstance(forward, (classmethod, staticmethod)) else staticmethod
    return kind(torch.compiler.disable(getattr(forward, "__func__", forward)))
