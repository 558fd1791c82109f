"""End-to-end example of the fused linear + SimPO loss on CPU (runs in a few seconds).

Builds random "final hidden states" for 4 preference pairs, an LM head with a 32k vocabulary, computes the SimPO
loss and all gradients with the fused chunked loss, and checks them against plain PyTorch that materialises the
full logits.
"""
import time

import torch
import torch.nn.functional as F

from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss


def plain_simpo(hidden, weight, target, beta, gamma, ignore_index=-100):
    logits = (hidden @ weight.T).float()  # the (2B, T, V) tensor the fused loss never builds
    valid = target != ignore_index
    logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    row = logp.sum(-1) / valid.sum(-1)
    n_pairs = hidden.shape[0] // 2
    return -F.logsigmoid(beta * (row[:n_pairs] - row[n_pairs:]) - gamma).mean()


def main():
    torch.manual_seed(0)
    n_pairs, seq_len, hidden_size, vocab = 4, 256, 256, 32000
    hidden = torch.randn(2 * n_pairs, seq_len, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).requires_grad_()
    target = torch.randint(0, vocab, (2 * n_pairs, seq_len))
    target[:, :64] = -100  # the prompt: no loss there

    loss_fn = LigerFusedLinearSimPOLoss(beta=2.0, gamma=1.0, compute_nll_loss=False)
    start = time.perf_counter()
    loss, (chosen_logps, rejected_logps, *_, chosen_rewards, rejected_rewards) = loss_fn(weight, hidden, target)
    loss.backward()
    fused_s = time.perf_counter() - start
    fused_grads = hidden.grad.clone(), weight.grad.clone()

    hidden.grad = weight.grad = None
    start = time.perf_counter()
    reference = plain_simpo(hidden, weight, target, beta=2.0, gamma=1.0)
    reference.backward()
    plain_s = time.perf_counter() - start

    logits_gib = 2 * n_pairs * seq_len * vocab * 4 / 2**30
    chunk_gib = 2 * seq_len * vocab * 4 / 2**30
    print(f"SimPO loss          fused {loss.item():.6f}   plain {reference.item():.6f}")
    print(f"max |d hidden| diff {(fused_grads[0] - hidden.grad).abs().max().item():.2e}")
    print(f"max |d weight| diff {(fused_grads[1] - weight.grad).abs().max().item():.2e}")
    print(f"rewards chosen      {[round(r, 4) for r in chosen_rewards.tolist()]}")
    print(f"rewards rejected    {[round(r, 4) for r in rejected_rewards.tolist()]}")
    print(f"logits held at once fused {chunk_gib:.3f} GiB (one pair)   plain {logits_gib:.3f} GiB (+ its gradient)")
    print(f"time (CPU)          fused {fused_s:.2f} s   plain {plain_s:.2f} s")
    assert torch.allclose(loss, reference, atol=1e-5)


if __name__ == "__main__":
    main()
