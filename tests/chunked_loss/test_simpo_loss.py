"""CPU correctness of the fused linear + SimPO loss against a float64 reference (reference.py)."""
import inspect
import os
import subprocess
import sys
import types

import pytest
import torch

from agent_code.liger_kernel.chunked_loss import (
    LigerFusedLinearPreferenceBase,
    LigerFusedLinearSimPOFunction,
    LigerFusedLinearSimPOLoss,
    liger_fused_linear_simpo,
)
from agent_code.liger_kernel.chunked_loss import functional, logit_ops
from agent_code.liger_kernel.chunked_loss.pair_loss import smoothed_sigmoid_loss
from agent_code.liger_kernel.chunked_loss.simpo_loss import AUX_OUTPUT_NAMES
from agent_code.liger_kernel.utils import infer_device
from tests.helpers import (BF16_TOL, F32_TOL, MatmulCounter, assert_all_close, forward_backward, make_inputs, ours,
                           plain, relative_error, truth)

# ---------------------------------------------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("label_smoothing,compute_nll_loss", [(0.0, False), (0.2, True), (0.0, True)])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gradcheck_float64(bias, label_smoothing, compute_nll_loss, softcap):
    x, w, target, b = make_inputs(2, 5, 4, 7, torch.float64, bias=bias, seed=1)
    inputs = (x, w) if b is None else (x, w, b)

    def loss_only(*tensors):
        bias_arg = tensors[2] if len(tensors) == 3 else None
        return ours(tensors[0], tensors[1], target, bias_arg, beta=1.5, alpha=0.7, label_smoothing=label_smoothing,
                    compute_nll_loss=compute_nll_loss, gamma=0.3, chunk_size=1, softcap=softcap)[0]

    assert torch.autograd.gradcheck(loss_only, inputs)


@pytest.mark.parametrize("n_pairs", [1, 3, 8])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_float32_matches_float64_reference(n_pairs, bias, ignore_index):
    hyper = dict(ignore_index=ignore_index, beta=2.0, alpha=0.5, label_smoothing=0.1, compute_nll_loss=True, gamma=0.7)
    x, w, target, b = make_inputs(n_pairs, 47, 31, 123, torch.float32, bias=bias, ignore_index=ignore_index,
                                  seed=n_pairs)
    upstream = torch.rand(()) + 0.5
    got = forward_backward(ours, x, w, target, b, upstream, chunk_size=2, **hyper)
    want = forward_backward(truth, x, w, target, b, upstream, **hyper)
    assert_all_close(got, want, "float32 vs float64", **F32_TOL)


def test_defaults_match_spec_math_without_nll():
    x, w, target, b = make_inputs(3, 47, 31, 123, torch.float32, seed=11)
    upstream = torch.rand(()) + 0.5
    got = forward_backward(lambda *a: liger_fused_linear_simpo(*a), x, w, target, b, upstream)
    want = forward_backward(truth, x, w, target, b, upstream)  # documented defaults: beta .1, gamma .5, no NLL
    assert_all_close(got, want, "defaults", **F32_TOL)
    assert got[1][4].item() == 0.0, "nll_loss aux must be 0 when not computed"


def test_softcap_matches_reference():
    hyper = dict(beta=2.0, gamma=1.0, compute_nll_loss=True, softcap=2.5)
    x, w, target, b = make_inputs(3, 47, 31, 123, torch.float32, seed=12)
    w.data.mul_(4)  # push logits into tanh's curved range so softcapping matters
    upstream = torch.rand(()) + 0.5
    got = forward_backward(ours, x, w, target, b, upstream, **hyper)
    want = forward_backward(truth, x, w, target, b, upstream, **hyper)
    assert_all_close(got, want, "softcap", **F32_TOL)
    uncapped = ours(x, w, target, b, **{**hyper, "softcap": None})[0]
    assert abs(uncapped.item() - got[0].item()) > 1e-3, "softcap must change the loss on these logits"


@pytest.mark.parametrize("n_pairs", [3, 8])
def test_chunk_size_does_not_change_results(n_pairs):
    hyper = dict(beta=1.0, alpha=1.0, label_smoothing=0.05, compute_nll_loss=True, gamma=0.5)
    x, w, target, b = make_inputs(n_pairs, 47, 31, 123, torch.float32, seed=20 + n_pairs)
    upstream = torch.rand(()) + 0.5
    baseline = forward_backward(ours, x, w, target, b, upstream, chunk_size=1, **hyper)
    for chunk_size in (2, 3, n_pairs, n_pairs + 5):
        got = forward_backward(ours, x, w, target, b, upstream, chunk_size=chunk_size, **hyper)
        assert_all_close(got, baseline, f"chunk_size={chunk_size}", atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("n_pairs", [1, 3, 8])
def test_bf16_three_way(n_pairs):
    """bf16: within the documented tolerance of float64 and never worse than plain PyTorch computing in bf16."""
    hyper = dict(beta=2.0, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True, gamma=1.0)
    x, w, target, b = make_inputs(n_pairs, 47, 31, 123, torch.bfloat16, seed=30 + n_pairs)
    # a bf16 loss receives a bf16 upstream gradient: give the truth that same (representable) value
    upstream = (torch.rand(()) + 0.5).to(torch.bfloat16).float()
    got = forward_backward(ours, x, w, target, b, upstream, chunk_size=2, **hyper)
    base = forward_backward(plain, x, w, target, b, upstream, **hyper)
    want = forward_backward(truth, x, w, target, b, upstream, **hyper)
    assert_all_close(got, want, "bf16 vs float64", **BF16_TOL)
    pairs = [("loss", got[0], base[0], want[0])]
    pairs += [(n, g, p, t) for n, g, p, t in zip(AUX_OUTPUT_NAMES, got[1], base[1], want[1]) if t.abs().sum() > 0]
    pairs += [(n, g, p, t) for n, g, p, t in zip(("dX", "dW", "db"), got[2], base[2], want[2])]
    for name, g, p, t in pairs:
        err_ours, err_plain = relative_error(g, t), relative_error(p, t)
        # ours may always be off by the final rounding to bf16 (half an ulp, 2**-9 relative); beyond that it
        # must not be worse than plain PyTorch
        assert err_ours <= max(1.02 * err_plain, 2**-9), f"{name}: ours {err_ours:.2e} worse than plain bf16 {err_plain:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------


def test_positional_apply_functional_and_module_agree():
    x, w, target, b = make_inputs(3, 9, 8, 17, torch.float32, seed=40)
    upstream = torch.rand(()) + 0.5
    args = (-100, 0.3, 0.8, 0.1, True, True, 0.4, 2)
    via_apply = forward_backward(lambda *t: LigerFusedLinearSimPOFunction.apply(*t, *args), x, w, target, b, upstream)
    via_functional = forward_backward(lambda *t: liger_fused_linear_simpo(*t, *args), x, w, target, b, upstream)
    module = LigerFusedLinearSimPOLoss(ignore_index=-100, beta=0.3, alpha=0.8, label_smoothing=0.1,
                                       compute_nll_loss=True, compiled=True, gamma=0.4, chunk_size=2)
    via_module = forward_backward(lambda x_, w_, t_, b_: module(w_, x_, t_, b_), x, w, target, b, upstream)
    assert functional.liger_fused_linear_simpo == LigerFusedLinearSimPOFunction.apply
    assert issubclass(LigerFusedLinearSimPOFunction, LigerFusedLinearPreferenceBase)
    assert_all_close(via_functional, via_apply, "functional", atol=0, rtol=0)
    assert_all_close(via_module, via_apply, "module", atol=0, rtol=0)
    loss, aux = via_apply[0], LigerFusedLinearSimPOFunction.apply(x, w, target, b, *args)[1]
    assert loss.dim() == 0 and isinstance(aux, tuple) and len(aux) == 7
    assert all(not a.requires_grad for a in aux)


def test_module_defaults_compute_nll_and_function_defaults_do_not():
    x, w, target, b = make_inputs(2, 9, 8, 17, torch.float32, seed=41)
    loss_module, aux_module = LigerFusedLinearSimPOLoss()(w, x, target, b)
    loss_fn, aux_fn = liger_fused_linear_simpo(x, w, target, b)
    want_module = truth(x, w, target, b, compute_nll_loss=True)
    torch.testing.assert_close(loss_module.double(), want_module[0], **F32_TOL)
    torch.testing.assert_close(aux_module[4].double(), want_module[1][4], **F32_TOL)
    torch.testing.assert_close(loss_fn.double(), truth(x, w, target, b)[0], **F32_TOL)
    assert aux_fn[4].item() == 0.0


@pytest.mark.parametrize(
    "compiled,is_cuda,dtype,fast",
    [(True, True, torch.bfloat16, True), (True, True, torch.float32, True), (False, True, torch.bfloat16, False),
     (True, True, torch.float64, False), (True, False, torch.bfloat16, False)],
)
def test_compiled_flag_selects_the_fast_path_only_on_cuda(monkeypatch, compiled, is_cuda, dtype, fast):
    """``compiled=False`` forces eager everywhere; the fast path is for CUDA bf16/fp16/fp32 inputs only."""

    class FastPathSentinel:
        def __init__(self, *args):
            pass

    # the fast path's module (it imports triton) stood in for by a stub, so this runs without triton too
    fast_path_module = types.SimpleNamespace(TritonLogitOps=FastPathSentinel)
    monkeypatch.setitem(sys.modules, "agent_code.liger_kernel.chunked_loss.triton_logit_ops", fast_path_module)
    monkeypatch.setattr(logit_ops, "triton_available", lambda: True)
    stub_input = types.SimpleNamespace(is_cuda=is_cuda, dtype=dtype)
    ops = logit_ops.select_logit_ops(stub_input, torch.randn(5, 3), None, None, -100, compiled)
    assert isinstance(ops, FastPathSentinel) == fast
    if not fast:
        assert type(ops) is logit_ops.EagerLogitOps


@pytest.mark.subprocess
def test_agent_code_works_without_triton(tmp_path):
    """agent_code imports and computes on a CPU-only machine where triton cannot be imported."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss\n"
        "from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction\n"
        "from agent_code.liger_kernel.chunked_loss.functional import liger_fused_linear_simpo\n"
        "from agent_code.liger_kernel.chunked_loss.fused_linear_preference import LigerFusedLinearPreferenceBase\n"
        "from agent_code.liger_kernel.utils import infer_device\n"
        "x = torch.randn(4, 6, 8, requires_grad=True)\n"
        "w = torch.randn(11, 8, requires_grad=True)\n"
        "loss, aux = LigerFusedLinearSimPOLoss()(w, x, torch.randint(0, 11, (4, 6)))\n"
        "loss.backward()\n"
        "assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all() and len(aux) == 7\n"
        "print('ok')\n"
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo_root}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_spec_signatures_and_defaults():
    """The fixed interface: argument names, order and defaults of the Function, the Module and preference_loss_fn."""
    forward = inspect.signature(LigerFusedLinearSimPOFunction.forward)
    names = list(forward.parameters)[1:]  # after ctx (classmethod: cls is bound)
    assert names == ["_input", "weight", "target", "bias", "ignore_index", "beta", "alpha", "label_smoothing",
                     "compute_nll_loss", "compiled", "gamma", "chunk_size", "softcap", "output_dtype"]
    defaults = {k: v.default for k, v in forward.parameters.items() if v.default is not inspect.Parameter.empty}
    assert defaults == dict(bias=None, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0,
                            compute_nll_loss=False, compiled=True, gamma=0.5, chunk_size=1, softcap=None,
                            output_dtype=None)
    module_init = inspect.signature(LigerFusedLinearSimPOLoss.__init__)
    assert {k: v.default for k, v in module_init.parameters.items() if k != "self"} == dict(
        ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True, compiled=True,
        gamma=0.5, chunk_size=1)
    assert list(inspect.signature(LigerFusedLinearSimPOLoss.forward).parameters)[1:5] == [
        "lin_weight", "_input", "target", "bias"]
    loss_fn = inspect.signature(LigerFusedLinearSimPOFunction.preference_loss_fn)
    assert [(k, v.default) for k, v in loss_fn.parameters.items()][3:] == [
        ("beta", 0.1), ("gamma", 0.5), ("label_smoothing", 0.0)]


def test_setup_py_is_exactly_the_spec_text():
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    expected = (
        "from setuptools import setup, find_packages\n"
        "setup(\n"
        '    name="agent_code",\n'
        '    version="1.0.0",\n'
        '    packages=find_packages(include=["agent_code", "agent_code.*"]),\n'
        "    install_requires=[],\n"
        ")\n"
    )
    with open(os.path.join(repo_root, "setup.py")) as f:
        assert f.read() == expected


def test_infer_device():
    assert infer_device() == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.subprocess
def test_imports_from_any_directory_after_install(tmp_path):
    """The public import paths resolve from outside the repo (needs ``pip install .``, as .ci/run does)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = "import agent_code, sys; print(agent_code.__file__)"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip("agent_code is not pip-installed in this environment")
    code = (
        "from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss\n"
        "from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction\n"
        "from agent_code.liger_kernel.chunked_loss.functional import liger_fused_linear_simpo\n"
        "from agent_code.liger_kernel.chunked_loss.fused_linear_preference import LigerFusedLinearPreferenceBase\n"
        "from agent_code.liger_kernel.utils import infer_device\n"
        "assert liger_fused_linear_simpo == LigerFusedLinearSimPOFunction.apply\n"
        "print(infer_device())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# gradients only for what needs them
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "needs,products_per_chunk",
    [(("x", "w", "b"), 3), (("x", "b"), 2), (("w",), 2), (("b",), 1), ((), 1)],
)
def test_only_requested_gradients_are_computed(needs, products_per_chunk):
    """A frozen weight (LoRA) skips the weight-gradient product; frozen input skips dX; no grad: logits only."""
    n_pairs, chunk_size = 4, 2
    x, w, target, b = make_inputs(n_pairs, 11, 8, 19, torch.float32, seed=50)
    for name, t in (("x", x), ("w", w), ("b", b)):
        t.requires_grad_(name in needs)
    upstream = torch.rand(()) + 0.5
    with MatmulCounter() as counter:
        loss, _ = ours(x, w, target, b, chunk_size=chunk_size, compute_nll_loss=True)
    assert counter.count == products_per_chunk * (n_pairs // chunk_size)
    if needs:
        (loss * upstream).backward()
    want = forward_backward(truth, *(t.detach().requires_grad_() for t in (x, w)), target,
                            b.detach().requires_grad_(), upstream, compute_nll_loss=True)
    for name, t, ref in zip(("x", "w", "b"), (x, w, b), want[2]):
        if name in needs:
            torch.testing.assert_close(t.grad.double(), ref.double(), **F32_TOL)
        else:
            assert t.grad is None


def test_no_grad_mode_computes_only_the_loss():
    """Inputs that require grad, but called under torch.no_grad(): one GEMM per chunk (the logits), same loss."""
    x, w, target, b = make_inputs(4, 11, 8, 19, torch.float32, seed=51)
    with torch.no_grad(), MatmulCounter() as counter:
        loss, aux = ours(x, w, target, b, compute_nll_loss=True, chunk_size=2)
    assert counter.count == 2
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), truth(x, w, target, b, compute_nll_loss=True)[0], **F32_TOL)


def test_non_contiguous_inputs():
    x, w, target, b = make_inputs(3, 13, 8, 29, torch.float32, seed=52)
    x_nc = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    w_nc = w.detach().t().contiguous().t().requires_grad_()
    target_nc = target.t().contiguous().t()
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or target_nc.is_contiguous())
    upstream = torch.rand(()) + 0.5
    got = forward_backward(ours, x_nc, w_nc, target_nc, b, upstream, chunk_size=2, compute_nll_loss=True)
    want = forward_backward(truth, x, w, target, b, upstream, compute_nll_loss=True)
    assert_all_close(got, want, "non-contiguous", **F32_TOL)


# ---------------------------------------------------------------------------------------------------------------
# degenerate rows and bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty_row", ["chosen", "rejected"])
def test_all_ignored_row_contributes_zero_loss_and_gradient(empty_row):
    n_pairs = 3
    x, w, target, b = make_inputs(n_pairs, 13, 8, 29, torch.float64, seed=60)
    row = 1 if empty_row == "chosen" else n_pairs + 1
    target[row] = -100
    # NLL off: the chosen row of a pair with an empty rejected row still takes part in the NLL term
    hyper = dict(beta=2.0, gamma=1.0, compute_nll_loss=False)
    upstream = torch.rand((), dtype=torch.float64) + 0.5
    got = forward_backward(ours, x, w, target, b, upstream, **hyper)
    want = forward_backward(truth, x, w, target, b, upstream, **hyper)
    assert_all_close(got, want, "all-ignored row", **F32_TOL)
    logps = got[1][0] if empty_row == "chosen" else got[1][1]
    assert logps[1].item() == 0.0
    grad_x = got[2][0]
    assert grad_x[1].abs().max() == 0 and grad_x[n_pairs + 1].abs().max() == 0, "pair 1 must get no gradient"
    # removing the pair entirely and rescaling by (B-1)/B gives the same preference loss
    keep = [i for i in range(2 * n_pairs) if i % n_pairs != 1]
    without = ours(x[keep], w, target[keep], b, beta=2.0, gamma=1.0)[0] * (n_pairs - 1) / n_pairs
    with_pair = ours(x, w, target, b, beta=2.0, gamma=1.0)[0]
    torch.testing.assert_close(with_pair, without)


def test_no_chosen_tokens_gives_zero_nll_and_finite_everything():
    x, w, target, b = make_inputs(2, 7, 8, 13, torch.float32, seed=61)
    target[:] = -100
    loss, aux = ours(x, w, target, b, compute_nll_loss=True)
    loss.backward()
    assert loss.item() == 0.0 and aux[4].item() == 0.0
    for t in (loss, *aux, x.grad, w.grad, b.grad):
        assert torch.isfinite(t).all()


def test_extreme_logits_stay_finite_and_exact():
    x, w, target, b = make_inputs(2, 7, 8, 13, torch.float32, seed=62)
    with torch.no_grad():
        w.mul_(1e3)
    upstream = torch.rand(()) + 0.5
    got = forward_backward(ours, x, w, target, b, upstream, beta=10.0, compute_nll_loss=True)
    for t in (got[0], *got[1], *got[2]):
        assert torch.isfinite(t).all()
    want = forward_backward(truth, x, w, target, b, upstream, beta=10.0, compute_nll_loss=True)
    assert_all_close(got, want, "extreme logits", atol=1e-5, rtol=1e-4)


def _bad_input_cases():
    x = torch.randn(4, 5, 6)
    w = torch.randn(11, 6)
    y = torch.randint(0, 11, (4, 5))
    b = torch.randn(11)
    yield "odd rows", (torch.randn(3, 5, 6), w, y[:3], b), ValueError, "even"
    yield "2-D input", (torch.randn(4, 6), w, y, b), ValueError, "3-D"
    yield "target shape", (x, w, y[:, :4], b), ValueError, "target shape"
    yield "hidden size", (x, torch.randn(11, 7), y, b), ValueError, "weight"
    yield "bias shape", (x, w, y, torch.randn(12)), ValueError, "bias"
    yield "weight dtype", (x, w.double(), y, b), TypeError, "weight dtype"
    yield "bias dtype", (x, w, y, b.double()), TypeError, "bias dtype"
    yield "float target", (x, w, y.float(), b), TypeError, "target"
    yield "target too large", (x, w, torch.full((4, 5), 11), b), ValueError, "outside [0, V=11)"
    yield "negative target", (x, w, torch.full((4, 5), -3), b), ValueError, "id -3"
    yield "not a tensor", (x.tolist(), w, y, b), TypeError, "_input"
    # a second device without CUDA: meta tensors
    yield "weight device", (x, w.to("meta"), y, b), ValueError, "weight is on meta"
    yield "target device", (x, w, y.to("meta"), b), ValueError, "target is on meta"


@pytest.mark.parametrize("case", list(_bad_input_cases()), ids=lambda c: c[0])
def test_bad_inputs_raise_clear_errors(case):
    _, args, error, message = case
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        LigerFusedLinearSimPOFunction.apply(*args)


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(chunk_size=0), "chunk_size"), (dict(label_smoothing=1.5), "label_smoothing"), (dict(beta="x"), "beta")],
)
def test_bad_hyperparameters_raise(kwargs, message):
    x, w, target, b = make_inputs(2, 5, 4, 7, torch.float32, seed=63)
    with pytest.raises((ValueError, TypeError), match=message):
        ours(x, w, target, b, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype_float32_rounds_once_from_the_accumulators(dtype):
    """``output_dtype=torch.float32``: a half-precision loss and its aux outputs come back in float32, equal to
    the half-precision result before its final rounding (same gradients)."""
    torch.manual_seed(11)
    x = torch.randn(4, 9, 16).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(37, 16)).to(dtype).requires_grad_()
    target = torch.randint(0, 37, (4, 9))
    target[1, :3] = -100
    args = (-100, 0.4, 1.0, 0.1, True, True, 0.2, 1)
    loss16, aux16 = LigerFusedLinearSimPOFunction.apply(x, w, target, None, *args)
    loss32, aux32 = LigerFusedLinearSimPOFunction.apply(x, w, target, None, *args, None, torch.float32)
    assert loss32.dtype == torch.float32 and all(a.dtype == torch.float32 for a in aux32)
    assert loss32.to(dtype) == loss16 and loss32 != loss16.float()  # not a float32 copy of the rounded value
    for a16, a32 in zip(aux16, aux32):
        torch.testing.assert_close(a32.to(dtype), a16, rtol=0, atol=0)
    g16 = torch.autograd.grad(loss16, (x, w))
    g32 = torch.autograd.grad(loss32, (x, w))
    for a, b in zip(g16, g32):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
def test_smoothed_sigmoid_loss_is_the_cdpo_formula(label_smoothing):
    """The pair loss shared by the fused losses and the reference, against log(sigmoid) written out in float64."""
    z = torch.randn(11, dtype=torch.float64, generator=torch.Generator().manual_seed(94)) * 3
    p = 1 / (1 + torch.exp(-z))
    expected = -(1 - label_smoothing) * torch.log(p) - label_smoothing * torch.log(1 - p)
    torch.testing.assert_close(smoothed_sigmoid_loss(z, label_smoothing), expected, rtol=1e-12, atol=1e-12)
