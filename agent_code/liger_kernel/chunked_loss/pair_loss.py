"""The smoothed sigmoid pair loss shared by SimPO, CPO's sigmoid/simpo losses and the plain reference."""
import torch
import torch.nn.functional as F


def smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair ``-(1 - label_smoothing) * log sigmoid(z) - label_smoothing * log sigmoid(-z)``.

    ``z`` is the scaled reward margin of each pair (SimPO: ``beta * (logp_chosen - logp_rejected) - gamma``);
    ``label_smoothing`` is the assumed probability that a pair's preference label is flipped (cDPO).
    """
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
