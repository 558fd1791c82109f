"""The opt-in weight-gradient accumulation in the input dtype (no float32 ``(V, H)`` buffer) on the fast path.

The fast path's ops class runs here on CPU tensors (its weight products use no Triton kernel); the whole loss
through it, under the Triton interpreter, is in test_triton_interpret.py.
"""
import pytest
import torch

from agent_code.liger_kernel.chunked_loss import fused_linear_preference as flp
from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction
from tests.helpers import use_environment_setting


def fast_path_ops(*args, **kwargs):
    """A ``TritonLogitOps``; its module imports triton (skipped where triton is missing)."""
    pytest.importorskip("triton")
    from agent_code.liger_kernel.chunked_loss.triton_logit_ops import TritonLogitOps

    return TritonLogitOps(*args, **kwargs)


def _products(n_products, vocab=53, hidden=24, tokens=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(tokens, vocab, generator=gen).bfloat16(), torch.randn(tokens, hidden, generator=gen).bfloat16())
            for _ in range(n_products)]


def _accumulate(ops, products, scales=None):
    acc = None
    for i, (grad_logits, x) in enumerate(products):
        acc_scale, product_scale = scales[i] if scales else (1.0, 1.0)
        acc = ops.accumulate_weight_grad(acc, grad_logits, x, len(products), acc_scale, product_scale)
    return acc, ops.finish_weight_grad(acc)


@pytest.mark.parametrize("scales", [None, [(1.0, 1.0), (1.0, 1.0), (-0.37, -0.37), (1.0, 1.0)]])
def test_running_sum_is_in_the_input_dtype_and_within_a_rounding_per_product(scales):
    products = _products(4)
    weight = torch.randn(53, 24).bfloat16()
    truth = magnitude = None  # magnitude: the sum of the terms' sizes, which bounds each rounding's error
    for i, (g, x) in enumerate(products):
        acc_scale, product_scale = scales[i] if scales else (1.0, 1.0)
        product = g.double().t() @ x.double()
        truth = product if truth is None else acc_scale * truth + product_scale * product
        magnitude = product.abs() if magnitude is None else abs(acc_scale) * magnitude + abs(product_scale) * product.abs()
    exact_acc, exact = _accumulate(fast_path_ops(weight, None, None, -100), products, scales)
    low_acc, low = _accumulate(fast_path_ops(weight, None, None, -100, weight_grad_in_input_dtype=True), products,
                               scales)
    assert exact_acc.dtype == torch.float32 and low_acc.dtype == torch.bfloat16  # no float32 (V, H) buffer
    assert exact.dtype == low.dtype == torch.bfloat16
    exact_err = ((exact.double() - truth).abs() / magnitude).max().item()
    low_err = ((low.double() - truth).abs() / magnitude).max().item()
    # bf16 keeps 8 significant bits: a rounding errs by at most 2**-8 of the value. On CPU the float32 path rounds
    # each product to bf16 before adding it (on CUDA cuBLAS adds it in float32), then the sum once
    assert exact_err <= 2 * 2 ** -8
    assert low_err <= (len(products) + 1) * 2 ** -8  # the running sum rounded once more per product
    assert not torch.equal(low, exact)  # the running sum really was rounded along the way


def test_float32_inputs_keep_their_float32_sum():
    ops = fast_path_ops(torch.randn(5, 3), None, None, -100, weight_grad_in_input_dtype=True)
    assert not ops.weight_grad_in_input_dtype


@pytest.mark.parametrize("env,expected", [(None, False), ("0", False), ("1", True), (" 1 ", True)])
def test_the_setting_is_read_once_per_call_from_the_environment(monkeypatch, env, expected):
    use_environment_setting(monkeypatch, flp, "WEIGHT_GRAD_IN_INPUT_DTYPE", flp.WEIGHT_GRAD_ENV_VAR, env)
    params = LigerFusedLinearSimPOFunction.params(beta=0.1, gamma=0.5, label_smoothing=0.0)
    assert params.weight_grad_in_input_dtype is expected
    monkeypatch.setattr(flp, "WEIGHT_GRAD_IN_INPUT_DTYPE", not expected)  # the module setting wins
    assert LigerFusedLinearSimPOFunction.params(beta=0.1, gamma=0.5, label_smoothing=0.0) \
        .weight_grad_in_input_dtype is (not expected)


@pytest.mark.parametrize("env", ["yes", "2", ""])
def test_a_bad_setting_is_refused_by_name(monkeypatch, env):
    use_environment_setting(monkeypatch, flp, "WEIGHT_GRAD_IN_INPUT_DTYPE", flp.WEIGHT_GRAD_ENV_VAR, env)
    with pytest.raises(ValueError, match=flp.WEIGHT_GRAD_ENV_VAR):
        flp.weight_grad_in_input_dtype()
    monkeypatch.setattr(flp, "WEIGHT_GRAD_IN_INPUT_DTYPE", "1")
    with pytest.raises(ValueError, match="WEIGHT_GRAD_IN_INPUT_DTYPE"):
        flp.weight_grad_in_input_dtype()
