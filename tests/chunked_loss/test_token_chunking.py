"""Token-chunk mode (one pair's logits over the memory budget): equal to pair-chunk mode and to float64 (CPU)."""
import importlib.util

import pytest
import torch

from agent_code.liger_kernel.chunked_loss import fused_linear_preference as flp
from agent_code.liger_kernel.chunked_loss import logit_ops
from agent_code.liger_kernel.chunked_loss.chunk_plan import plan_chunks
from tests.helpers import F32_TOL, MatmulCounter, assert_all_close, forward_backward, make_inputs, ours, truth

FP32_BYTES = 4


@pytest.fixture
def budget_tokens(monkeypatch):
    """Set the logits budget to ``tokens`` float32 logits rows of width ``vocab``; record every logits shape."""
    shapes = []
    real_logits = logit_ops.EagerLogitOps.logits

    def recording_logits(self, x2d):
        out = real_logits(self, x2d)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(logit_ops.EagerLogitOps, "logits", recording_logits)

    def set_budget(tokens, vocab):
        monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", tokens * vocab * FP32_BYTES)
        shapes.clear()
        return shapes

    return set_budget


@pytest.mark.parametrize(
    "n_pairs,seq_len,run_tokens,bias,softcap,label_smoothing,ignore_index",
    [
        (3, 23, 5, True, None, 0.0, -100),   # ragged last run (23 = 4*5 + 3)
        (2, 17, 1, False, 2.5, 0.2, -100),   # one token per run
        (1, 31, 16, True, 6.0, 0.0, 3),      # positive ignore_index
    ],
)
def test_token_mode_equals_pair_mode_and_float64(budget_tokens, n_pairs, seq_len, run_tokens, bias, softcap,
                                                  label_smoothing, ignore_index):
    vocab = 29
    x, w, target, b = make_inputs(n_pairs, seq_len, 8, vocab, torch.float32, bias=bias, ignore_index=ignore_index,
                                  seed=60 + run_tokens)
    kwargs = dict(compute_nll_loss=True, softcap=softcap, label_smoothing=label_smoothing, ignore_index=ignore_index)
    upstream = torch.rand(()) + 0.5
    pair_shapes = budget_tokens(4 * seq_len, vocab)  # two pairs fit: pair mode
    pair_mode = forward_backward(ours, x, w, target, b, upstream, chunk_size=2, **kwargs)
    assert max(s[0] for s in pair_shapes) == 2 * min(2, n_pairs) * seq_len
    token_shapes = budget_tokens(run_tokens, vocab)  # one pair's logits exceed the budget: token mode
    token_mode = forward_backward(ours, x, w, target, b, upstream, chunk_size=2, **kwargs)
    assert max(s[0] for s in token_shapes) == run_tokens, "a logits tensor exceeded the budget"
    runs_per_row = -(-seq_len // run_tokens)
    if n_pairs == 1:  # chosen row: statistics and unscaled gradient; rejected: statistics, then gradient
        assert len(token_shapes) == 3 * runs_per_row - 1  # its last run's logits are kept
    else:  # per pair: a statistics pass over both rows, then a gradient pass reusing the last run's logits
        assert len(token_shapes) == n_pairs * (4 * runs_per_row - 1)
    assert_all_close(token_mode, pair_mode, "token vs pair mode", **F32_TOL)
    assert_all_close(token_mode, forward_backward(truth, x, w, target, b, upstream, **kwargs), "token", **F32_TOL)


# (compute_nll_loss, alpha, logits GEMMs per call for R runs per row): the NLL term ties the chosen row's
# coefficient to no other, so only the chosen row is deferred; without it (or at alpha 0) both rows are
@pytest.mark.parametrize("nll,alpha,gemms", [(True, 1.0, lambda r: 3 * r - 1), (False, 1.0, lambda r: 2 * r),
                                             (True, 0.0, lambda r: 2 * r)])
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_single_pair_deferred_scale_equals_both_rows_recomputed(budget_tokens, monkeypatch, frozen_weight, nll, alpha,
                                                                gemms):
    """One pair in token mode: gradients scaled afterwards equal scaling them in the kernel."""
    x, w, target, b = make_inputs(1, 26, 8, 31, torch.float32, seed=72)
    target[1, :7] = -100  # rows of different lengths: the two rows' known factors differ
    w.requires_grad_(not frozen_weight)
    kwargs = dict(compute_nll_loss=nll, alpha=alpha, softcap=3.0, label_smoothing=0.1)
    upstream = torch.rand(()) + 0.5
    shapes = budget_tokens(6, 31)  # 5 runs per row, the last one ragged
    deferred = forward_backward(ours, x, w, target, b, upstream, **kwargs)
    assert len(shapes) == gemms(5)
    monkeypatch.setattr(flp, "DEFER_CHOSEN_SCALE", False)
    shapes = budget_tokens(6, 31)
    recomputed = forward_backward(ours, x, w, target, b, upstream, **kwargs)
    assert len(shapes) == 4 * 5 - 1
    assert_all_close(deferred, recomputed, "deferred vs recomputed", **F32_TOL)
    assert_all_close(deferred, forward_backward(truth, x, w, target, b, upstream, **kwargs), "deferred", **F32_TOL)


def test_pair_deferral_with_an_empty_row_gives_zero_pair_gradient(budget_tokens):
    """A row without tokens: the pair adds no loss and no gradient (its deferred scale is 0)."""
    x, w, target, b = make_inputs(1, 12, 8, 17, torch.float32, seed=73)
    target[1] = -100
    upstream = torch.rand(()) + 0.5
    budget_tokens(5, 17)
    got = forward_backward(ours, x, w, target, b, upstream, compute_nll_loss=False)
    assert_all_close(got, forward_backward(truth, x, w, target, b, upstream, compute_nll_loss=False), "empty row",
                     **F32_TOL)
    assert float(got[0]) == 0.0 and all(float(g.abs().max()) == 0.0 for g in got[2] if g is not None)


# with the NLL term the chosen row alone is deferred; without it both rows are (one pair in token mode)
@pytest.mark.parametrize("compute_nll_loss,label_smoothing", [(True, 0.0), (False, 0.2)])
def test_token_mode_float64_gradcheck(budget_tokens, compute_nll_loss, label_smoothing):
    x, w, target, b = make_inputs(1, 7, 3, 5, torch.float64, seed=70)
    budget_tokens(3, 5)

    def loss_of(x_, w_, b_):
        return ours(x_, w_, target, b_, compute_nll_loss=compute_nll_loss, label_smoothing=label_smoothing,
                    softcap=2.0)[0]

    assert torch.autograd.gradcheck(loss_of, (x, w, b))


# (the one trainable input, tokens per run of a 9-token row): one token per run, a ragged last run, one run per row
@pytest.mark.parametrize("trainable,run_tokens", [("x", 1), ("w", 4), ("b", 9)])
@pytest.mark.parametrize("compute_nll_loss", [False, True])
def test_single_pair_deferral_with_one_trainable_input(budget_tokens, trainable, run_tokens, compute_nll_loss):
    """One pair in token mode whose only trainable input is x, the weight or the bias: each deferred branch
    (dX rows, weight accumulator scale, bias sum) alone; under the NLL term with an empty rejected row (the
    pair adds no loss, the chosen row's scale is the NLL term's alone)."""
    x, w, target, b = make_inputs(1, 9, 6, 13, torch.float32, ignore_index=2, seed=74)
    target[1, :5] = 2  # rows of very different lengths
    if compute_nll_loss:
        target[1] = 2
    for name, t in zip("xwb", (x, w, b)):
        t.requires_grad_(name == trainable)
    upstream = torch.tensor(-1.7)
    kwargs = dict(compute_nll_loss=compute_nll_loss, ignore_index=2, softcap=4.0)
    shapes = budget_tokens(run_tokens, 13)
    got = forward_backward(ours, x, w, target, b, upstream, **kwargs)
    runs = -(-9 // run_tokens)
    assert max(s[0] for s in shapes) == run_tokens and len(shapes) == (3 * runs - 1 if compute_nll_loss else 2 * runs)
    assert_all_close(got, forward_backward(truth, x, w, target, b, upstream, **kwargs), trainable, **F32_TOL)
    assert [g is not None for g in got[2]] == [name == trainable for name in "xwb"]


def test_token_mode_frozen_weight_and_no_grad(budget_tokens):
    x, w, target, b = make_inputs(2, 13, 8, 23, torch.float32, seed=71)
    w.requires_grad_(False)
    budget_tokens(4, 23)
    upstream = torch.rand(()) + 0.5
    got = forward_backward(ours, x, w, target, b, upstream, compute_nll_loss=True)
    assert w.grad is None
    want = forward_backward(truth, x, w, target, b, upstream, compute_nll_loss=True)
    torch.testing.assert_close(got[2][0], want[2][0].float(), **F32_TOL)
    torch.testing.assert_close(got[2][2], want[2][2].float(), **F32_TOL)
    shapes = budget_tokens(4, 23)
    loss, _ = ours(x.detach(), w, target, b.detach(), compute_nll_loss=True)
    assert len(shapes) == 2 * 2 * 4, "nothing needs a gradient: statistics pass only"
    torch.testing.assert_close(loss.double(), want[0], **F32_TOL)


@pytest.mark.parametrize("chunk_size_is_minimum", [False, True])
@pytest.mark.parametrize(
    "seq_len,cases",
    [
        (37, ((1, 1), (9, 2), (74, 1), (74, 3), (400, 2), (10**6, 2))),
        # runs of >= 128 tokens are rounded down to a multiple of 128: still within budget, every token once
        (1000, ((130, 1), (300, 2), (999, 1), (1000, 1), (1999, 2), (2000, 2), (5000, 3))),
    ],
)
def test_plan_covers_every_token_once_within_budget(chunk_size_is_minimum, seq_len, cases):
    n_pairs, vocab, size = 5, 11, 4
    for budget_tokens_, chunk_size in cases:
        plan = plan_chunks(n_pairs, seq_len, vocab, chunk_size, size, budget_tokens_ * vocab * size,
                           chunk_size_is_minimum)
        seen = torch.zeros(2 * n_pairs, seq_len, dtype=torch.int64)
        for chunk in plan:
            for p in chunk.passes:
                tokens = sum(rows.stop - rows.start for rows in p.rows) * (p.tokens.stop - p.tokens.start)
                assert tokens <= max(budget_tokens_, 1) or len(chunk.passes) == 1 and chunk.end - chunk.start == 1 \
                    and tokens <= budget_tokens_, (budget_tokens_, chunk_size, tokens)
                for rows in p.rows:
                    seen[rows, p.tokens] += 1
        assert bool((seen == 1).all()), (budget_tokens_, chunk_size)
        runs = [p.tokens.stop - p.tokens.start for c in plan for p in c.passes]
        if 128 <= budget_tokens_ < seq_len:
            assert max(runs) % 128 == 0 and max(runs) <= budget_tokens_, (budget_tokens_, max(runs))
        pairs = [c.end - c.start for c in plan]
        if budget_tokens_ >= 2 * seq_len:  # pair mode
            fitting = budget_tokens_ // (2 * seq_len)
            assert max(pairs) == min(fitting if chunk_size_is_minimum else chunk_size, fitting, n_pairs)
        else:
            assert pairs == [1] * n_pairs


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
def test_simpo_closed_form_gradient_equals_autograd(label_smoothing):
    """The closed form the chunk loop uses instead of autograd (every pair has tokens) vs autograd, in float64."""
    from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction as simpo

    gen = torch.Generator().manual_seed(73)
    chosen, rejected = (torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    full_target = torch.zeros(14, 3)  # 7 pairs in the whole batch
    hyper = dict(beta=2.0, gamma=0.7, label_smoothing=label_smoothing)
    loss, chosen_rewards, rejected_rewards = simpo.preference_loss_fn(chosen, rejected, full_target, **hyper)
    want = (loss, *torch.autograd.grad(loss, (chosen, rejected)), chosen_rewards, rejected_rewards)
    got = simpo.preference_loss_and_grad(chosen.detach(), rejected.detach(), full_target, **hyper)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.detach(), rtol=1e-12, atol=1e-15)


def test_budget_env_variable_is_read_when_the_loss_runs_and_the_module_attribute_overrides_it(monkeypatch):
    """``LIGER_LOGITS_BUDGET_BYTES`` (float notation too) is read when the loss runs, not at import: set after the
    import it picks the chunk mode, and importing the module under it works; the module attribute overrides it."""
    monkeypatch.delenv(flp.BUDGET_ENV_VAR, raising=False)
    monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", None)
    x, w, target, b = make_inputs(2, 40, 8, 17, torch.float32, seed=90)
    with MatmulCounter() as pair_mode:
        ours(x.detach(), w.detach(), target, b.detach())
    monkeypatch.setenv("LIGER_LOGITS_BUDGET_BYTES", "6.8e2")  # 10 tokens of logits (17 x 4 bytes each)
    assert flp.logits_budget_bytes() == 680
    with MatmulCounter() as token_mode:
        loss, _ = ours(x.detach(), w.detach(), target, b.detach())
    assert (pair_mode.count, token_mode.count) == (2, 2 * 2 * 4)  # 2 pairs; then 2 rows x 4 runs each
    torch.testing.assert_close(loss.double(), truth(x, w, target, b)[0], **F32_TOL)
    monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", 1 << 30)
    with MatmulCounter() as overridden:
        ours(x.detach(), w.detach(), target, b.detach())
    assert overridden.count == pair_mode.count
    # A fresh copy of the module executed under the variable (the loaded one, which the other modules hold, is
    # left alone): what a new interpreter's import does, without starting one.
    spec = importlib.util.spec_from_file_location("fresh_fused_linear_preference", flp.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.LOGITS_BUDGET_BYTES is None and fresh.logits_budget_bytes() == 680
