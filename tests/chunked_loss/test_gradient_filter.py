"""The opt-in gradient filter (``GRADIENT_FILTER_EPS`` / ``LIGER_GRADIENT_FILTER_EPS``): its setting, the paths that
ignore it, and on a GPU its block-sparse products against the exact ones and float64.

The kernels' logic on the CPU: test_block_sparse_interpret.py; the whole loss through them with every block kept:
the ``*-filter-keeps-all`` cases of test_triton_interpret.py.
"""
import pytest
import torch

from agent_code.liger_kernel.chunked_loss import fused_linear_preference as flp
from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction
from tests.helpers import forward_backward, make_inputs, ours, relative_error, truth, use_environment_setting

CCE_DEFAULT_EPS = 2.0**-12  # Cut Cross-Entropy's filter_eps "high" for bf16


def params():
    return LigerFusedLinearSimPOFunction.params(beta=0.1, gamma=0.5, label_smoothing=0.0)


@pytest.mark.parametrize("env,expected", [(None, None), ("", None), ("0.000244", 0.000244), (" 0 ", 0.0)])
def test_the_setting_is_read_once_per_call_from_the_environment(monkeypatch, env, expected):
    use_environment_setting(monkeypatch, flp, "GRADIENT_FILTER_EPS", flp.GRADIENT_FILTER_ENV_VAR, env)
    assert params().gradient_filter_eps == expected
    monkeypatch.setattr(flp, "GRADIENT_FILTER_EPS", 1e-5)  # the module setting wins
    assert params().gradient_filter_eps == 1e-5


# 1 or more: |softmax - onehot| never exceeds 1, so every block would be dropped (zero dX and dW, silently)
@pytest.mark.parametrize("env", ["high", "-1e-4", "inf", "nan", "1", "2.5", "1_0"])
def test_a_bad_setting_is_refused_by_name(monkeypatch, env):
    use_environment_setting(monkeypatch, flp, "GRADIENT_FILTER_EPS", flp.GRADIENT_FILTER_ENV_VAR, env)
    with pytest.raises(ValueError, match=flp.GRADIENT_FILTER_ENV_VAR):
        flp.gradient_filter_eps()
    for bad in (True, 1.0):
        monkeypatch.setattr(flp, "GRADIENT_FILTER_EPS", bad)
        with pytest.raises(ValueError, match="GRADIENT_FILTER_EPS"):
            flp.gradient_filter_eps()


def test_float32_inputs_are_never_filtered():
    TritonLogitOps = pytest.importorskip("agent_code.liger_kernel.chunked_loss.triton_logit_ops").TritonLogitOps
    assert TritonLogitOps(torch.randn(5, 3), None, None, -100, gradient_filter_eps=1e-3).filters_gradient is False
    low = TritonLogitOps(torch.randn(5, 3).bfloat16(), None, None, -100, gradient_filter_eps=1e-3)
    assert low.filters_gradient is True


def test_the_eager_path_ignores_the_filter(monkeypatch):
    """CPU (and ``compiled=False``): exact whatever the setting, bitwise equal to the run without it."""
    x, w, target, b = make_inputs(2, 13, 16, 57, torch.bfloat16, seed=3)
    upstream = torch.tensor(0.7)
    monkeypatch.setattr(flp, "GRADIENT_FILTER_EPS", None)
    want = forward_backward(ours, x, w, target, b, upstream)
    monkeypatch.setattr(flp, "GRADIENT_FILTER_EPS", 0.5)  # would drop nearly every block
    got = forward_backward(ours, x, w, target, b, upstream)
    for g, e in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        assert torch.equal(g, e)


# --- on a GPU -------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def peaked_cuda_inputs(n_pairs, seq_len, hidden, vocab, seed, boost=(12.0, 22.0)):
    """bf16 CUDA inputs whose softmax is peaked, as a trained model's: each position's hidden state raised along
    its target's weight row by ``b`` in ``boost`` (logits of the rest: std 1)."""
    x, w, target, b = make_inputs(n_pairs, seq_len, hidden, vocab, torch.float64, bias=False, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x, w = x.detach(), w.detach()
    direction = w[target.clamp(min=0)]
    strength = boost[0] + (boost[1] - boost[0]) * torch.rand(target.shape, generator=gen, dtype=torch.float64)
    x = x + (strength / direction.square().sum(-1)).unsqueeze(-1) * direction
    cuda = lambda t: t.to(torch.bfloat16).cuda().requires_grad_()  # noqa: E731
    return cuda(x), cuda(w), target.cuda(), None


def filtered_run(monkeypatch, eps, inputs, dense_above=None):
    monkeypatch.setattr(flp, "GRADIENT_FILTER_EPS", eps)
    if dense_above is not None:
        from agent_code.liger_kernel.chunked_loss import triton_block_sparse

        monkeypatch.setattr(triton_block_sparse, "DENSE_ABOVE_KEPT_FRACTION", dense_above)
    x, w, target, b = inputs
    return forward_backward(ours, x, w, target, b, torch.tensor(0.8, device="cuda"), compute_nll_loss=True)


@gpu
def test_on_a_peaked_softmax_the_filter_drops_blocks_and_keeps_the_loss_exact(monkeypatch):
    """Most blocks dropped: the loss and aux outputs are bitwise those of the exact run (the filter only touches
    the products); the input and weight gradients differ from it by the dropped blocks' share (a float64 emulation
    of the filter on these inputs: 7 % of dX, 1 % of dW; a block put in the wrong place costs far more)."""
    # 13.5 % of the blocks kept (CPU float64 estimate of the same inputs): few column blocks hold a target
    inputs = peaked_cuda_inputs(4, 256, 256, 65536, seed=4, boost=(14.0, 24.0))
    exact = filtered_run(monkeypatch, None, inputs)
    got = filtered_run(monkeypatch, CCE_DEFAULT_EPS, inputs)
    want = forward_backward(truth, *inputs, torch.tensor(0.8, device="cuda"), compute_nll_loss=True)
    assert torch.equal(got[0], exact[0]) and all(torch.equal(g, e) for g, e in zip(got[1], exact[1]))
    for name, g, e, t in zip(("input", "weight"), got[2], exact[2], want[2]):
        assert not torch.equal(g, e), f"{name}: no block was dropped"
        assert relative_error(g, t) < 0.15, (name, relative_error(g, t), relative_error(e, t))


@gpu
def test_with_every_block_kept_the_block_sparse_products_match_the_exact_ones(monkeypatch):
    inputs = peaked_cuda_inputs(3, 200, 192, 9001, seed=5)
    exact = filtered_run(monkeypatch, None, inputs)
    got = filtered_run(monkeypatch, 0.0, inputs, dense_above=1.0)
    want = forward_backward(truth, *inputs, torch.tensor(0.8, device="cuda"), compute_nll_loss=True)
    for g, e, t in zip(got[2][:2], exact[2][:2], want[2][:2]):
        assert relative_error(g, t) <= 1.05 * relative_error(e, t) + 1e-3


@gpu
def test_on_a_diffuse_softmax_the_products_fall_back_to_dense_and_exact(monkeypatch):
    """Nearly every block is kept: past DENSE_ABOVE_KEPT_FRACTION the chunk runs cuBLAS's products, bitwise the
    exact run."""
    x, w, target, b = make_inputs(2, 128, 128, 5000, torch.bfloat16, bias=False, seed=6)
    inputs = tuple(None if t is None else t.detach().cuda().requires_grad_() for t in (x, w)) + (target.cuda(), None)
    exact = filtered_run(monkeypatch, None, inputs)
    got = filtered_run(monkeypatch, CCE_DEFAULT_EPS, inputs)
    assert all(torch.equal(g, e) for g, e in zip(got[2][:2], exact[2][:2]))
