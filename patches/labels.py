"""Labels of a preference batch: their shift to the loss's targets, the sequences of a packed row, their checks.

The one place that knows the label conventions the patched forward (:mod:`patches.fused_forward`), the trainers
(:mod:`patches.trainer`, :mod:`patches.trl`) and the packed attention (:mod:`patches.varlen`) share:

* ``labels`` are Hugging Face's: unshifted (position t of the hidden states predicts ``labels[:, t + 1]``), with
  ``ignore_index`` on prompt and padding; a padded batch is ``(2B, T)``, rows ``[0, B)`` chosen, ``[B, 2B)`` the
  rejected answers of the same pairs;
* a packed batch is one row ``(1, N)`` holding the 2B sequences end to end, ``position_ids`` restarting at each
  sequence and no attention mask; a sequence starts wherever the position does not follow the previous one.
"""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from agent_code.liger_kernel.chunked_loss.input_checks import target_out_of_range

#: The label value Hugging Face and TRL put on prompt and padding tokens (the default ``ignore_index``).
IGNORE_INDEX = -100


def shifted_target(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels[:, 1:]`` padded with one ``ignore_index`` column, as HF's ``ForCausalLMLoss`` does.

    Position t of the hidden states then predicts ``labels[:, t + 1]``; the last position predicts nothing but
    still enters the logits means, which thus average over every position like TRL's metrics.
    """
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def within_sequences(target: torch.Tensor, offsets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """A packed row's shifted target with each sequence's last position ignored: position t predicts
    ``labels[t + 1]`` within its sequence, never the next sequence's first token."""
    target = target.clone()
    target[0, offsets[1:] - 1] = ignore_index
    return target


def aligned_target(labels: torch.Tensor, ignore_index: int, offsets: Optional[torch.Tensor] = None,
                   shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The target the fused loss reads for ``labels``: ``shift_labels`` when the caller gave them, else
    :func:`shifted_target`; in a packed row (its sequence ``offsets``) shifted within each sequence
    (:func:`within_sequences`)."""
    target = shift_labels if shift_labels is not None else shifted_target(labels, ignore_index)
    return target if offsets is None else within_sequences(target, offsets, ignore_index)


def has_packed_layout(inputs: Dict[str, Any]) -> bool:
    """``position_ids`` and no attention mask: the keys of a packed batch (``PreferenceCollator(padding_free=True)``),
    the trainer's rule for which keys it passes the model. Whether the model reads the batch as packed is
    :func:`is_packed_batch`."""
    return inputs.get("position_ids") is not None and inputs.get("attention_mask") is None


def is_packed_batch(labels, inputs: Dict[str, Any]) -> bool:
    """One row of labels in :func:`has_packed_layout`: the patched forward's rule for a packed batch, its 2B
    sequences end to end in that row (more rows without a mask are a padded batch without padding)."""
    return (isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[0] == 1
            and has_packed_layout(inputs))


def sequence_start_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """``(rows, T)`` bool: where a sequence starts in rows of ``position_ids``: at each row's first token, and
    wherever the position does not follow the previous one, the rule transformers' masks use
    (``masking_utils.find_packed_sequence_indices``)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def _sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Host indices of the first tokens of a packed row's sequences (:func:`sequence_start_mask`)."""
    return sequence_start_mask(position_ids.reshape(1, -1)).reshape(-1).nonzero().reshape(-1).cpu()


def packed_sequence_offsets(position_ids: torch.Tensor) -> torch.Tensor:
    """(2B + 1,) host offsets of the sequences of a packed row (see :func:`_sequence_starts`); ValueError, with the
    count and the starts found, when the row does not hold an even number of sequences."""
    starts = _sequence_starts(position_ids)
    n_sequences = starts.numel()
    if n_sequences % 2:
        shown = ", ".join(str(int(start)) for start in starts[:8]) + (", ..." if n_sequences > 8 else "")
        restarts = "never restart" if n_sequences == 1 else f"restart {n_sequences - 1} times"
        raise ValueError(
            f"position_ids {restarts}, so this packed batch (one row, position_ids, no attention_mask) holds "
            f"{n_sequences} sequence{'s' if n_sequences > 1 else ''} (starting at tokens {shown}); a packed batch "
            f"needs an even number of sequences, 2B: B chosen, then their B rejected, position_ids restarting at 0 "
            f"at each"
        )
    return torch.cat((starts, torch.tensor([position_ids.numel()])))


def loss_target(labels, inputs: Dict[str, Any], ignore_index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The patched forward's ``labels`` (its other ``inputs`` beside them), checked, as the fused loss's target
    (:func:`aligned_target`), with the sequence offsets of a packed batch (:func:`is_packed_batch`; None when
    padded). ValueError, saying what to pass instead, for labels of the wrong shape."""
    if is_packed_batch(labels, inputs):
        check_packed_labels(labels, inputs)
        offsets = packed_sequence_offsets(inputs["position_ids"])
    else:
        check_labels(labels, inputs)
        offsets = None
    return aligned_target(labels, ignore_index, offsets, inputs.get("shift_labels")), offsets


def _check_token_ids(labels: torch.Tensor, inputs: Dict[str, Any]) -> None:
    """``labels`` and ``shift_labels`` hold integer ids: TypeError naming them (the loss would name its target)."""
    for name, value in (("labels", labels), ("shift_labels", inputs.get("shift_labels"))):
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()
                                                 or value.dtype == torch.bool):
            raise TypeError(f"{name} must hold integer token ids (ignore_index where nothing is predicted), got "
                            f"{value.dtype}")


def check_labels(labels, inputs: Dict[str, Any]) -> None:
    """``labels`` (and ``shift_labels``) must be ``(2B, T)`` like ``input_ids``: B chosen rows, then B rejected."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"labels must be a (2B, T) tensor like input_ids (rows [0, B) chosen, [B, 2B) rejected), got {shape}"
        )
    _check_token_ids(labels, inputs)
    for name in ("input_ids", "inputs_embeds"):
        if inputs.get(name) is not None:
            expected = tuple(inputs[name].shape[:2])
            if tuple(labels.shape) != expected:
                raise ValueError(
                    f"labels must have the shape of {name}, (2B, T) = {expected}; got {tuple(labels.shape)}"
                )
            break
    _check_shift_labels(labels, inputs)
    if labels.shape[0] % 2:
        if labels.shape[0] == 1:
            _raise_for_one_row(labels, inputs)
        raise ValueError(
            f"labels must have an even number of rows, 2B (B chosen rows, then their B rejected rows); "
            f"got {labels.shape[0]}"
        )


def _check_shift_labels(labels: torch.Tensor, inputs: Dict[str, Any]) -> None:
    """``shift_labels``, when given, are the caller's own targets: the shape of ``labels``."""
    shift_labels = inputs.get("shift_labels")
    if shift_labels is not None and shift_labels.shape != labels.shape:
        raise ValueError(
            f"shift_labels must have the shape of labels {tuple(labels.shape)}; got {tuple(shift_labels.shape)}"
        )


def _raise_for_one_row(labels: torch.Tensor, inputs: Dict[str, Any]) -> None:
    """A one-row batch that is not read as packed: say why, since one row is only ever valid packed."""
    position_ids = inputs.get("position_ids")
    if (inputs.get("attention_mask") is not None and isinstance(position_ids, torch.Tensor)
            and tuple(position_ids.shape) == tuple(labels.shape) and labels.numel() > 0):
        n_sequences = _sequence_starts(position_ids).numel()
        if n_sequences > 1:
            # With a mask, transformers builds the attention from the mask alone: every token would see the
            # sequences packed before it.
            raise ValueError(
                f"this looks like a packed batch (one row whose position_ids restart at 0 for each of {n_sequences} "
                f"sequences) given together with an attention_mask: pass it without attention_mask, "
                f"since transformers keeps packed sequences apart only when none is given (or pass a padded "
                f"(2B, T) batch with its attention_mask)"
            )
    raise ValueError(
        "labels must have an even number of rows, 2B (B chosen rows, then their B rejected rows); got 1. A "
        "packed batch (all 2B sequences in one row) needs position_ids restarting at 0 at each sequence and no "
        "attention_mask"
    )


def check_packed_labels(labels: torch.Tensor, inputs: Dict[str, Any]) -> None:
    """A packed batch's ``labels`` ``(1, N)`` must have the shape of its ``input_ids`` (or ``inputs_embeds``),
    ``position_ids`` and ``shift_labels``."""
    _check_token_ids(labels, inputs)
    for name in ("input_ids", "inputs_embeds"):
        if inputs.get(name) is not None and tuple(inputs[name].shape[:2]) != tuple(labels.shape):
            raise ValueError(f"labels must have the shape of {name}, (1, N) = {tuple(inputs[name].shape[:2])} for "
                             f"a packed batch; got {tuple(labels.shape)}")
    if tuple(inputs["position_ids"].shape) != tuple(labels.shape):
        raise ValueError(f"position_ids must have the shape of labels {tuple(labels.shape)} for a packed batch; got "
                         f"{tuple(inputs['position_ids'].shape)}")
    _check_shift_labels(labels, inputs)


def raise_for_label_values(error: ValueError, target: torch.Tensor, shift_labels_given: bool, ignore_index: int,
                           vocab: int) -> None:
    """Re-raise the loss's ``error`` about a target id outside the vocabulary in the caller's coordinates.

    The loss sees the shifted target: its position ``(r, t)`` is ``labels[r, t + 1]`` (``shift_labels[r, t]`` when
    those were given). Checked only once the loss has failed, so a good batch pays no second device sync.
    """
    out_of_range = target_out_of_range(target, ignore_index, vocab)
    if not bool(out_of_range.any()):
        return  # another ValueError: the caller re-raises it as it is
    row, column = (int(i) for i in out_of_range.nonzero()[0])
    name, position = ("shift_labels", (row, column)) if shift_labels_given else ("labels", (row, column + 1))
    raise ValueError(
        f"{name} holds id {int(target[row, column])} at position {position}, outside [0, V={vocab}) and not "
        f"ignore_index={ignore_index}"
    ) from error


def predicted_label_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(rows, T - 1)``: which labels the model predicts. Position ``t`` predicts ``labels[:, t + 1]`` (HF shift)."""
    return labels[:, 1:] != ignore_index


def pairs_with_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B,)`` bool: pair ``i`` (rows ``i`` and ``B + i``) has a label to predict in both its answers.

    A packed batch (``labels`` ``(1, N)`` with the ``position_ids`` that delimit its 2B sequences) is read per
    sequence, shifted inside each one as the patched model shifts it.
    """
    if position_ids is not None and labels.shape[0] == 1:
        offsets = packed_sequence_offsets(position_ids)
        predicted = aligned_target(labels, ignore_index, offsets)[0] != ignore_index
        counts = torch.cat((predicted.new_zeros(1, dtype=torch.long), predicted.cumsum(0)))
        offsets = offsets.to(counts.device)
        has_tokens = counts[offsets[1:]] > counts[offsets[:-1]]
    else:
        has_tokens = predicted_label_mask(labels, ignore_index).any(dim=1)
    n_pairs = has_tokens.shape[0] // 2
    return has_tokens[:n_pairs] & has_tokens[n_pairs:]
