"""Argument checks of the fused preference losses: each error names the argument and what is expected."""
import math
import numbers
from typing import List, Optional

import torch

from agent_code.liger_kernel.chunked_loss.chunk_plan import sequence_offsets_list


def _is_finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range (10**400): as good as infinite for the loss's float math
        return False


def check_real(name: str, value, minimum: Optional[float] = None, strict: bool = False) -> None:
    """``value`` is a finite real number (not a bool), ``>= minimum`` (``> minimum`` with ``strict``)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not _is_finite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):  # "False" or 0 would silently mean something else
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")


def check_int(name: str, value, minimum: Optional[int] = None, what: str = "an int") -> None:
    """``value`` is a Python int (not a bool, not an integral float), ``>= minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_loss_options(ignore_index, alpha, compute_nll_loss, compiled, chunk_size, softcap=None,
                       output_dtype=None) -> None:
    """The options every fused preference loss takes, checked in one place: ``TypeError``/``ValueError`` naming
    the first of the wrong type or out of range.

    ignore_index an int, alpha >= 0, compute_nll_loss and compiled bools, chunk_size a positive int, softcap None or
    > 0, output_dtype None or a floating-point dtype.
    """
    check_real("alpha", alpha, 0.0)
    check_bool("compute_nll_loss", compute_nll_loss)
    check_bool("compiled", compiled)
    check_int("ignore_index", ignore_index)
    check_int("chunk_size", chunk_size, 1, what="a positive int (pairs per chunk)")
    if softcap is not None:
        check_real("softcap", softcap, 0.0, strict=True)
    if output_dtype is not None and not (isinstance(output_dtype, torch.dtype) and output_dtype.is_floating_point):
        raise TypeError(f"output_dtype must be None or a floating-point torch.dtype, got {output_dtype!r}")


def validate_preference_inputs(
    _input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the offending tensor; silent on valid input (the options are
    :func:`check_loss_options`'s).

    Reads no device memory: the target ids are checked against [0, V) by :func:`raise_for_target_values`,
    which the caller runs once the device has answered (see ``HostChecks``).
    """
    for name, value in (("_input", _input), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if _input.dim() != 3:
        raise ValueError(f"_input must be 3-D (2B, T, H), got shape {tuple(_input.shape)}")
    rows, seq_len, hidden = _input.shape
    if rows == 0 or rows % 2 != 0:
        raise ValueError(
            f"_input must hold an even, non-zero number of rows (B chosen then B rejected), got {rows} rows "
            f"(shape {tuple(_input.shape)})"
        )
    if not _input.is_floating_point():
        raise TypeError(f"_input must be floating point, got {_input.dtype}")
    if tuple(target.shape) != (rows, seq_len):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal _input.shape[:2] = {(rows, seq_len)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer token ids, got {target.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(
            f"weight must be (V, H) with H = _input.shape[-1] = {hidden}, got shape {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight has an empty vocabulary (shape (0, H))")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is None:
            continue
        if value.dtype != _input.dtype:
            raise TypeError(f"{name} dtype {value.dtype} must match _input dtype {_input.dtype}")
        if value.device != _input.device:
            raise ValueError(f"{name} is on {value.device} but _input is on {_input.device}")
    if target.device != _input.device:
        raise ValueError(f"target is on {target.device} but _input is on {_input.device}")


def validate_packed_inputs(_input, weight, target, bias, sequence_offsets) -> List[int]:
    """Checks of a packed batch (``_input`` (1, N, H), ``target`` (1, N)); returns the offsets as host ints.

    Everything but the shapes is checked as for the padded layout.
    """
    for name, value in (("_input", _input), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if _input.dim() != 3 or _input.shape[0] != 1:
        raise ValueError(f"a packed _input must be (1, N, H) (sequences end to end), got shape {tuple(_input.shape)}")
    if tuple(target.shape) != tuple(_input.shape[:2]):
        raise ValueError(f"target shape {tuple(target.shape)} must equal _input.shape[:2] = {tuple(_input.shape[:2])}")
    offsets = sequence_offsets_list(sequence_offsets, _input.shape[1])
    # the remaining checks read shapes, dtypes and devices only: a two-row view of the same tensors serves
    validate_preference_inputs(_input.expand(2, -1, -1), weight, target.expand(2, -1), bias)
    return offsets


def target_out_of_range(target: torch.Tensor, ignore_index: int, vocab: int) -> torch.Tensor:
    return (target != ignore_index) & ((target < 0) | (target >= vocab))


def raise_for_target_values(target: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """``ValueError`` naming the first target id outside [0, V) that is not ``ignore_index``."""
    out_of_range = target_out_of_range(target, ignore_index, vocab)
    if bool(out_of_range.any()):
        position = tuple(int(i) for i in out_of_range.nonzero()[0])
        raise ValueError(
            f"target holds id {int(target[position])} at position {position}, outside [0, V={vocab}) and not "
            f"ignore_index={ignore_index}"
        )


def parse_byte_count(text: str, name: str) -> int:
    """A positive whole number of bytes written as an int or a float: "1073741824", "1_000_000_000", "1e9"."""
    try:
        value = int(text)  # exact, underscores allowed
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        value = int(number) if math.isfinite(number) and number.is_integer() else None
    if value is None or value < 1:
        raise ValueError(f"{name} must be a positive whole number of bytes, e.g. 1073741824, 1_000_000_000 or 1e9; "
                         f"got {text!r}")
    return value
