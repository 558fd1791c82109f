"""Packed ("padding-free") batches in the fused loss: equal to the padded batch of the same sequences (loss, the
log-prob outputs, gradients) and to a float64 reference; the logits means average real positions only."""
import pytest
import torch

from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
from agent_code.liger_kernel.chunked_loss import fused_linear_preference as flp
from agent_code.liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOLoss
from agent_code.liger_kernel.chunked_loss.chunk_plan import plan_packed_chunks
from agent_code.liger_kernel.chunked_loss.reference import reference_simpo

HIDDEN, VOCAB, IGNORE = 6, 23, -100
#: (prompt, answer) lengths of the sequences: chosen ones, then the rejected ones. Ragged, with an empty answer
#: (pair 1's rejected: its pair adds no loss) and a one-token sequence.
SEQUENCES = [(3, 4), (2, 6), (1, 0), (4, 9), (2, 1), (3, 0), (1, 2), (5, 3)]
OPTIONS = dict(beta=2.5, gamma=0.7, alpha=0.6, label_smoothing=0.15, compute_nll_loss=True, compiled=False)


def packed_batch(sequences, dtype=torch.float64, seed=0, vocab=VOCAB):
    """``(x (1, N, H), target (1, N), offsets, lengths)``: each sequence's target ignores its prompt positions
    and its last position (aligned targets, shifted inside the sequence)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [prompt + answer for prompt, answer in sequences]
    n = sum(lengths)
    x = torch.randn(1, n, HIDDEN, generator=generator, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, vocab, (n,), generator=generator)
    target, start = torch.full((n,), IGNORE), 0
    for (prompt, answer), length in zip(sequences, lengths):
        # position t predicts token t + 1: answer tokens are predicted from the prompt's last position on
        predicted = slice(start + max(prompt - 1, 0), start + length - 1)
        target[predicted] = ids[predicted.start + 1 : predicted.stop + 1]
        start += length
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return x, target[None], offsets, lengths


def padded_from_packed(x, target, lengths):
    """The same sequences as a right-padded (2B, T_max) batch (zero hidden states, ignored targets on padding)."""
    width, rows, starts = max(lengths), len(lengths), [0, *torch.tensor(lengths).cumsum(0).tolist()]
    padded_x = torch.zeros(rows, width, x.shape[-1], dtype=x.dtype)
    padded_target = torch.full((rows, width), IGNORE)
    for row, length in enumerate(lengths):
        padded_x[row, :length] = x[0, starts[row] : starts[row] + length]
        padded_target[row, :length] = target[0, starts[row] : starts[row] + length]
    return padded_x, padded_target


def unpad(padded, lengths):
    return torch.cat([padded[row, :length] for row, length in enumerate(lengths)])[None]


def run(loss_fn, x, w, target, b, **kwargs):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    upstream = torch.tensor(0.7, dtype=x.dtype)
    loss, aux = loss_fn(w, x, target, b, **kwargs)
    (loss * upstream).backward()
    return loss, aux, (x.grad, w.grad, b.grad)


def weights(dtype, seed=1, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, HIDDEN, generator=generator, dtype=torch.float64).to(dtype)
    b = torch.randn(vocab, generator=generator, dtype=torch.float64).to(dtype)
    return w, b


@pytest.mark.parametrize("budget_tokens", [None, 7, 1])  # default (all pairs, one pass), pair mode, token runs of 1
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_packed_equals_padded_float64(monkeypatch, budget_tokens, chunk_size):
    if budget_tokens is not None:
        monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", budget_tokens * VOCAB * 8)
    x, target, offsets, lengths = packed_batch(SEQUENCES)
    w, b = weights(torch.float64)
    loss_fn = LigerFusedLinearSimPOLoss(**{**OPTIONS, "chunk_size": chunk_size})
    loss, aux, grads = run(loss_fn, x, w, target, b, softcap=3.0, sequence_offsets=offsets)
    padded_x, padded_target = padded_from_packed(x, target, lengths)
    padded_loss, padded_aux, padded_grads = run(loss_fn, padded_x, w, padded_target, b, softcap=3.0)

    tolerance = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, padded_loss, **tolerance)
    for index in (0, 1, 4, 5, 6):  # log-probs, NLL, rewards; the logits means differ by definition
        torch.testing.assert_close(aux[index], padded_aux[index], **tolerance)
    assert aux[1][1] == 0  # the empty answer: log-prob 0, its pair no loss
    torch.testing.assert_close(grads[0], unpad(padded_grads[0], lengths), **tolerance)
    for grad, padded_grad in zip(grads[1:], padded_grads[1:]):
        torch.testing.assert_close(grad, padded_grad, **tolerance)

    # the float64 reference, its logits means over the real positions of each half only
    n_pairs = len(lengths) // 2
    math_options = {name: OPTIONS[name] for name in ("beta", "gamma", "alpha", "label_smoothing", "compute_nll_loss")}
    reference_loss, reference_aux = reference_simpo(padded_x, w, padded_target, b, softcap=3.0, ignore_index=IGNORE,
                                                    **math_options)
    torch.testing.assert_close(loss, reference_loss, **tolerance)
    logits = 3.0 * torch.tanh((x[0] @ w.T + b) / 3.0)
    chosen_tokens = int(offsets[n_pairs])
    torch.testing.assert_close(aux[2], logits[:chosen_tokens].mean(), **tolerance)
    torch.testing.assert_close(aux[3], logits[chosen_tokens:].mean(), **tolerance)


def test_packed_equals_padded_float32_summed_log_probs():
    """A CPO loss (log-probs summed, not averaged), float32, against the padded batch and float64."""
    x, target, offsets, lengths = packed_batch(SEQUENCES, torch.float32, seed=3)
    w, b = weights(torch.float32, seed=4)
    loss_fn = LigerFusedLinearCPOLoss("sigmoid", beta=0.3, alpha=0.5, label_smoothing=0.1, compiled=False,
                                      chunk_size=2)
    loss, aux, grads = run(loss_fn, x, w, target, b, sequence_offsets=offsets)
    padded_x, padded_target = padded_from_packed(x, target, lengths)
    padded_loss, padded_aux, padded_grads = run(loss_fn, padded_x, w, padded_target, b)
    truth_loss, truth_aux, truth_grads = run(loss_fn, *(t.double() for t in (x, w)), target, b.double(),
                                             sequence_offsets=offsets)
    tolerance = dict(rtol=5e-4, atol=1e-5)
    for ours, padded, truth in ((loss, padded_loss, truth_loss), *zip(aux, padded_aux, truth_aux)):
        torch.testing.assert_close(ours.double(), truth, **tolerance)
    for index in (0, 1, 4, 5, 6):
        torch.testing.assert_close(aux[index], padded_aux[index], **tolerance)
    torch.testing.assert_close(grads[0], unpad(padded_grads[0], lengths), **tolerance)
    for ours, padded, truth in zip(grads, padded_grads, truth_grads):
        torch.testing.assert_close(ours.double(), truth, **tolerance)


def test_packed_plan_counts_real_tokens_and_covers_each_once():
    offsets = [0, 3, 10, 11, 20, 24, 26]  # lengths 3, 7, 1 | 9, 4, 2
    plan = plan_packed_chunks(offsets, vocab=10, chunk_size=2, logits_element_size=4, budget_bytes=16 * 10 * 4,
                              device=torch.device("cpu"))
    # pair tokens 3+9=12, 7+4=11, 1+2=3 against 16 tokens: 12 + 11 do not fit together, 11 + 3 do
    assert [(c.start, c.end) for c in plan] == [(0, 1), (1, 3)]
    assert [c.seq_len for c in plan] == [9, 7]  # each chunk's statistics are as wide as its longest sequence
    covered = sorted(t for c in plan for p in c.passes for s in p.spans
                     for t in range(s.start, s.stop))
    assert covered == list(range(26))
    token_mode = plan_packed_chunks(offsets, vocab=10, chunk_size=1, logits_element_size=4,
                                    budget_bytes=4 * 10 * 4, device=torch.device("cpu"))
    # pairs over 4 tokens are cut into runs of at most 4 tokens per sequence; the last pair (3 tokens) fits
    assert [len(c.passes) for c in token_mode] == [1 + 3, 2 + 1, 1]


@pytest.mark.parametrize("offsets, message", [
    ([0, 5, 9, 12], "2B \\+ 1 offsets"),
    ([0, 12], "2B \\+ 1 offsets"),
    ([1, 5, 9, 10, 12], "start at 0 and end at the number of packed tokens 12"),
    ([0, 5, 5, 9, 12], "increase strictly"),
    (torch.tensor([0.0, 6.0, 12.0]), "1-D integer tensor"),
    ([0, 5.5, 9, 10, 12], "sequence of ints"),  # never truncated to 5
    ([0, True, 9, 10, 12], "sequence of ints"),
    (6, "sequence of ints"),
])
def test_bad_sequence_offsets_are_refused(offsets, message):
    x, target = torch.randn(1, 12, HIDDEN), torch.zeros(1, 12, dtype=torch.long)
    w, b = weights(torch.float32)
    with pytest.raises(ValueError, match=message):
        LigerFusedLinearSimPOLoss()(w, x, target, b, sequence_offsets=offsets)
    with pytest.raises(ValueError, match="packed _input must be \\(1, N, H\\)"):
        LigerFusedLinearSimPOLoss()(w, x.expand(2, -1, -1), target.expand(2, -1), b, sequence_offsets=[0, 6, 12])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, dict(rtol=5e-4, atol=1e-5)),
                                             (torch.bfloat16, dict(rtol=5e-1, atol=5e-2))])
@pytest.mark.parametrize("budget_tokens", [None, 7, 1])
def test_packed_fast_path_on_cuda(monkeypatch, dtype, tolerance, budget_tokens):
    """The CUDA fast path (cuBLAS + Triton) on a packed batch: the float64 truth and the padded batch's result."""
    if budget_tokens is not None:
        monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", budget_tokens * 9001 * 4)
    x, target, offsets, lengths = packed_batch(SEQUENCES, torch.float64, seed=5, vocab=9001)
    w, b = weights(torch.float64, seed=6, vocab=9001)
    loss_fn = LigerFusedLinearSimPOLoss(**{**OPTIONS, "compiled": True})
    truth = run(loss_fn, x, w, target, b, softcap=4.0, sequence_offsets=offsets)
    cuda = lambda t: t.to("cuda", dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    packed = run(loss_fn, cuda(x), cuda(w), cuda(target), cuda(b), softcap=4.0, sequence_offsets=offsets)
    padded_x, padded_target = padded_from_packed(x, target, lengths)
    padded = run(loss_fn, cuda(padded_x), cuda(w), cuda(padded_target), cuda(b), softcap=4.0)
    flat = lambda r: [r[0], *r[1], *r[2]]  # noqa: E731
    for index, (got, want) in enumerate(zip(flat(packed), flat(truth))):
        torch.testing.assert_close(got.double().cpu(), want, **tolerance, msg=lambda m: f"output {index}: {m}")
    torch.testing.assert_close(packed[0], padded[0], **tolerance)
    torch.testing.assert_close(packed[2][0], unpad(padded[2][0], lengths), **tolerance)
