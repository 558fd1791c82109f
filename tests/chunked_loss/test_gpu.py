"""CUDA fast path (cuBLAS + Triton kernels) against the float64 reference; skipped without a GPU."""
import pytest
import torch

from agent_code.liger_kernel.chunked_loss import fused_linear_preference, logit_ops
from agent_code.liger_kernel.chunked_loss.chunk_plan import plan_chunks
from tests.helpers import (BF16_TOL, F32_TOL, MatmulCounter, assert_all_close, forward_backward, make_inputs, ours,
                           plain, relative_error, truth)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def on_cuda(*tensors):
    return tuple(None if t is None else t.detach().cuda().requires_grad_(t.requires_grad) for t in tensors)


def cuda_inputs(n_pairs, seq_len, hidden, vocab, dtype, seed, **kwargs):
    x, w, target, b = make_inputs(n_pairs, seq_len, hidden, vocab, dtype, seed=seed, **kwargs)
    x, w, b = on_cuda(x, w, b)
    return x, w, target.cuda(), b


def assert_no_worse_than_plain(got, base, want, label):
    """Every output's error vs float64 within 5 % (+1e-3) of plain PyTorch's in the same dtype."""
    flat = lambda r: [r[0], *r[1], *(g for g in r[2] if g is not None)]  # noqa: E731
    for i, (o, p, t) in enumerate(zip(flat(got), flat(base), flat(want))):
        assert relative_error(o, t) <= 1.05 * relative_error(p, t) + 1e-3, f"{label}: output {i} worse than plain"


@pytest.fixture(params=[None, torch.float32], ids=["logits-input-dtype", "logits-fp32"])
def fast_logits_dtype(request, monkeypatch):
    monkeypatch.setattr(logit_ops, "FAST_PATH_LOGITS_DTYPE", request.param)
    return request.param


def test_fast_path_is_selected_on_cuda():
    x, w, target, b = cuda_inputs(1, 5, 16, 33, torch.bfloat16, seed=1)
    from agent_code.liger_kernel.chunked_loss.triton_logit_ops import TritonLogitOps

    assert isinstance(logit_ops.select_logit_ops(x, w, b, None, -100, True), TritonLogitOps)
    assert type(logit_ops.select_logit_ops(x, w, b, None, -100, False)) is logit_ops.EagerLogitOps


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("compute_nll_loss,label_smoothing", [(True, 0.1), (False, 0.0)])
def test_float32_matches_float64(bias, softcap, compute_nll_loss, label_smoothing):
    """vocab over several kernel blocks with a ragged tail; TF32 stays off (torch's default)."""
    assert not torch.backends.cuda.matmul.allow_tf32
    x, w, target, b = cuda_inputs(3, 37, 64, 9001, torch.float32, seed=2, bias=bias)
    kwargs = dict(compute_nll_loss=compute_nll_loss, label_smoothing=label_smoothing, softcap=softcap)
    upstream = torch.rand((), device="cuda") + 0.5
    got = forward_backward(ours, x, w, target, b, upstream, chunk_size=2, **kwargs)
    want = forward_backward(truth, x, w, target, b, upstream, **kwargs)
    assert_all_close(got, want, "fp32 fast path", **F32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_low_precision_three_way(dtype, softcap, fast_logits_dtype):
    """Within the documented bf16 tolerance of float64 and no worse than plain PyTorch in the same dtype."""
    x, w, target, b = cuda_inputs(4, 129, 256, 32000, dtype, seed=3, bias=False)
    upstream = torch.tensor(1.0, device="cuda")
    kwargs = dict(compute_nll_loss=True, softcap=softcap)
    got = forward_backward(ours, x, w, target, b, upstream, chunk_size=1, **kwargs)
    want = forward_backward(truth, x, w, target, b, upstream, **kwargs)
    base = forward_backward(plain, x, w, target, b, upstream, **kwargs)
    assert_all_close(got, want, f"{dtype} fast path", **BF16_TOL)
    assert_no_worse_than_plain(got, base, want, str(dtype))


@pytest.mark.parametrize("n_pairs", [2, 1])  # one pair: gradients scaled after their pass
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compute_nll_loss", [True, False])  # one pair: the chosen row deferred, or both rows
def test_token_chunks_equal_pair_chunks(dtype, n_pairs, compute_nll_loss, monkeypatch):
    """A budget below one pair's logits forces two-pass token chunks; results match one-pass pair chunks."""
    x, w, target, b = cuda_inputs(n_pairs, 301, 64, 5003, dtype, seed=4)
    target[-1, :40] = -100  # rows of different lengths
    upstream = torch.rand((), device="cuda") + 0.5
    kwargs = dict(compute_nll_loss=compute_nll_loss, softcap=10.0)
    pair_mode = forward_backward(ours, x, w, target, b, upstream, chunk_size=2, **kwargs)
    ops = logit_ops.select_logit_ops(x, w, b, None, -100, True)
    budget = 130 * 5003 * ops.logits_element_size  # runs of 128 tokens: 3 per row, the last one ragged
    monkeypatch.setattr(fused_linear_preference, "LOGITS_BUDGET_BYTES", budget)
    assert all(len(c.passes) == 6 for c in plan_chunks(n_pairs, 301, 5003, 2, ops.logits_element_size, budget))
    token_mode = forward_backward(ours, x, w, target, b, upstream, chunk_size=2, **kwargs)
    tol = F32_TOL if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    assert_all_close(token_mode, pair_mode, "token vs pair mode", **tol)
    want = forward_backward(truth, x, w, target, b, upstream, **kwargs)
    if dtype == torch.float32:
        assert_all_close(token_mode, want, "token", **F32_TOL)
    else:  # no worse than plain bf16 either (the deferred scale rounds dX once, from float32)
        base = forward_backward(plain, x, w, target, b, upstream, **kwargs)
        assert_no_worse_than_plain(token_mode, base, want, "token mode")


def test_frozen_weight_skips_weight_gradient():
    """Frozen lm_head (LoRA): the fast path dispatches one matrix product fewer per pass, and dX is still right."""
    x, w, target, b = cuda_inputs(3, 40, 64, 4099, torch.bfloat16, seed=5, bias=False)
    products = {}
    for trainable in (True, False):
        w.requires_grad_(trainable)
        with MatmulCounter() as counter:
            ours(x, w, target, b, compute_nll_loss=True)
        products[trainable] = counter.count
    assert (products[True], products[False]) == (3, 2), products  # one chunk: logits, dX (, dW)
    upstream = torch.tensor(1.0, device="cuda")
    got = forward_backward(ours, x, w, target, b, upstream, compute_nll_loss=True)
    assert w.grad is None
    want = forward_backward(truth, x, w, target, b, upstream, compute_nll_loss=True)
    torch.testing.assert_close(got[2][0].double(), want[2][0].double(), **BF16_TOL)
    torch.testing.assert_close(got[0].double(), want[0].double(), **BF16_TOL)


def test_compiled_false_stays_eager_and_agrees(monkeypatch):
    x, w, target, b = cuda_inputs(2, 33, 32, 1031, torch.float32, seed=6)
    upstream = torch.rand((), device="cuda") + 0.5
    fast = forward_backward(ours, x, w, target, b, upstream, compute_nll_loss=True, compiled=True)
    from agent_code.liger_kernel.chunked_loss import triton_logit_ops

    monkeypatch.setattr(triton_logit_ops, "TritonLogitOps", None)  # any use of the fast path would now fail
    eager = forward_backward(ours, x, w, target, b, upstream, compute_nll_loss=True, compiled=False)
    assert_all_close(fast, eager, "fast vs eager", **F32_TOL)


def test_bad_target_id_raises_and_device_stays_usable():
    """The fast path checks target ids while its first chunk runs; the kernels never read a bad id."""
    x, w, target, b = cuda_inputs(2, 9, 16, 101, torch.bfloat16, seed=7)
    bad = target.clone()
    bad[1, 3] = 101
    with pytest.raises(ValueError, match="outside"):
        ours(x, w, bad, b)
    torch.cuda.synchronize()
    loss, _ = ours(x, w, target, b)
    assert torch.isfinite(loss).item()
