"""patches.labels: the one home of the label conventions (shift, packed sequences, checks) that the patched
forward, the trainers and the packed attention share."""
import inspect

import torch

from patches import fused_forward, labels, trainer, varlen
from tests.helpers import padded_and_packed, preference_sequences


def random_packed_batch(seed):
    """A padded batch and its packed twin, of random pairs (prompt, chosen and rejected lengths drawn from ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    n_pairs = int(torch.randint(1, 4, (), generator=generator))
    pairs = [tuple(int(n) for n in torch.randint(1, 6, (3,), generator=generator)) for _ in range(n_pairs)]
    return padded_and_packed(preference_sequences(pairs, seed=seed))


def test_the_packed_offsets_of_the_loss_and_of_the_attention_agree():
    for seed in torch.randint(0, 2**31, (5,)).tolist():
        padded, packed = random_packed_batch(seed)
        position_ids = packed["position_ids"]
        lengths = padded["attention_mask"].sum(dim=1).tolist()
        expected = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        assert labels.packed_sequence_offsets(position_ids).tolist() == expected
        sequences = varlen.PackedSequences.from_position_ids(position_ids, 1, position_ids.shape[1], "cpu")
        assert list(sequences.offsets) == expected


def test_aligned_target_of_a_packed_row_is_the_padded_rows_shifted_target():
    for seed in torch.randint(0, 2**31, (5,)).tolist():
        padded, packed = random_packed_batch(seed)
        offsets = labels.packed_sequence_offsets(packed["position_ids"])
        packed_target = labels.aligned_target(packed["labels"], -100, offsets)[0]
        padded_target = labels.aligned_target(padded["labels"], -100)
        keep = padded["attention_mask"].bool()
        assert torch.equal(packed_target, padded_target[keep])
        shift_labels = torch.randint(0, 9, packed["labels"].shape)
        given = labels.aligned_target(packed["labels"], -100, offsets, shift_labels)
        assert torch.equal(given[0, offsets[1:] - 1], torch.full((len(offsets) - 1,), -100))


def test_label_conventions_are_defined_in_patches_labels_alone():
    """The modules that shift labels, read packed offsets or check labels use patches.labels, not their own copy."""
    shared = {"shifted_target", "within_sequences", "aligned_target", "packed_sequence_offsets", "sequence_start_mask",
              "is_packed_batch", "loss_target", "check_labels", "raise_for_label_values", "pairs_with_tokens",
              "predicted_label_mask"}
    for module in (fused_forward, trainer, varlen):
        own = {name for name, value in vars(module).items()
               if inspect.isfunction(value) and value.__module__ == module.__name__}
        assert not own & shared, module.__name__
    for name in shared:
        assert getattr(labels, name).__module__ == "patches.labels"
