"""The base is generic: a second preference loss needs only its ``preference_loss_fn`` and a thin Function.

A DPO-style loss (summed, not averaged, log-probs; per-pair reference log-probs passed as ``pair_kwargs``) is
written here in a few lines and checked against a float64 reference with the full logits. It has no closed-form
gradient, so it also exercises the base's autograd path for the pair loss.
"""
import pytest
import torch
import torch.nn.functional as F

from agent_code.liger_kernel.chunked_loss import LigerFusedLinearPreferenceBase
from tests.helpers import F32_TOL, forward_backward, make_inputs


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, n_pairs_total, beta):
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).sum() / n_pairs_total
    return loss, chosen_rewards, rejected_rewards


class FusedLinearDPOForTest(LigerFusedLinearPreferenceBase):
    average_log_prob = False

    @staticmethod
    def preference_loss_fn(chosen_logps, rejected_logps, full_target, beta=0.1, ref_chosen_logps=None,
                           ref_rejected_logps=None):
        return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        full_target.shape[0] // 2, beta)

    @classmethod
    def forward(cls, ctx, _input, weight, target, bias, ref_chosen_logps, ref_rejected_logps, beta, chunk_size):
        return super().forward(ctx, _input, weight, target, bias, chunk_size=chunk_size, loss_kwargs=dict(beta=beta),
                               pair_kwargs=dict(ref_chosen_logps=ref_chosen_logps,
                                                ref_rejected_logps=ref_rejected_logps))

    # no backward: the base's returns one None for each argument after (_input, weight, target, bias)


def dpo_reference(x, w, target, b, ref_chosen, ref_rejected, beta, ignore_index=-100):
    logits = x.double() @ w.double().T + b.double()
    valid = target != ignore_index
    token_logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    row = token_logp.sum(-1)
    n_pairs = x.shape[0] // 2
    loss, chosen_rewards, rejected_rewards = dpo_loss(row[:n_pairs], row[n_pairs:], ref_chosen.double(),
                                                      ref_rejected.double(), n_pairs, beta)
    return loss, (row[:n_pairs].detach(), row[n_pairs:].detach(), chosen_rewards.detach(), rejected_rewards.detach())


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_dpo_written_on_the_base_matches_float64(chunk_size):
    n_pairs, beta = 5, 0.3
    x, w, target, b = make_inputs(n_pairs, 23, 16, 61, torch.float32, seed=70)
    ref_chosen, ref_rejected = -20 * torch.rand(n_pairs), -20 * torch.rand(n_pairs)
    upstream = torch.rand(()) + 0.5

    def ours(x_, w_, t_, b_):
        loss, aux = FusedLinearDPOForTest.apply(x_, w_, t_, b_, ref_chosen, ref_rejected, beta, chunk_size)
        return loss, (aux[0], aux[1], aux[5], aux[6])

    got = forward_backward(ours, x, w, target, b, upstream)
    want = forward_backward(lambda *t: dpo_reference(*t, ref_chosen, ref_rejected, beta), x, w, target, b, upstream)
    torch.testing.assert_close(got[0].double(), want[0], **F32_TOL)
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a.double(), e, **F32_TOL)
    for a, e in zip(got[2], want[2]):
        torch.testing.assert_close(a.double(), e.double(), **F32_TOL)


def test_dpo_written_on_the_base_passes_gradcheck():
    x, w, target, b = make_inputs(3, 6, 5, 9, torch.float64, seed=71)
    ref_chosen, ref_rejected = -5 * torch.rand(3, dtype=torch.float64), -5 * torch.rand(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *t: FusedLinearDPOForTest.apply(*t[:2], target, t[2], ref_chosen, ref_rejected, 0.7, 2)[0], (x, w, b)
    )
