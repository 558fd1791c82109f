"""The CPO losses (TRL CPOTrainer's loss types) on the fused base against a float64 reference from full logits.

The reference restates TRL's ``get_batch_logps`` + ``cpo_loss`` + NLL term on materialised logits; it does not
reuse the loss functions under test.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F

from agent_code.liger_kernel.chunked_loss.cpo_loss import (
    CPO_FUNCTIONS,
    LigerFusedLinearCPOLoss,
    LigerFusedLinearCPOSimPOFunction,
)
from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction
from tests.helpers import F32_TOL, forward_backward, make_inputs


def cpo_reference(x, w, target, b, loss_type, beta, alpha, label_smoothing, compute_nll_loss, gamma,
                  alphapo_alpha, ignore_index=-100):
    """TRL's CPOTrainer loss and statistics in float64 from the full (2B, T, V) logits (target already shifted)."""
    logits = x.double() @ w.double().T + (0 if b is None else b.double())
    n_pairs = x.shape[0] // 2
    valid = target != ignore_index
    token_logps = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    logps = token_logps.sum(-1)
    if loss_type in ("ipo", "simpo"):
        logps = logps / valid.sum(-1)
    chosen, rejected = logps[:n_pairs], logps[n_pairs:]
    if alphapo_alpha:
        chosen_r, rejected_r = ((1 - torch.exp(-alphapo_alpha * lp)) / alphapo_alpha for lp in (chosen, rejected))
    else:
        chosen_r, rejected_r = chosen, rejected
    d = chosen_r - rejected_r
    if loss_type == "simpo":
        d = d - gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * d) * (1 - label_smoothing) - F.logsigmoid(-beta * d) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    else:
        losses = (d - 1 / (2 * beta)) ** 2
    nll = -token_logps[:n_pairs].sum() / valid[:n_pairs].sum()
    loss = losses.mean() + (alpha * nll if compute_nll_loss else 0.0)
    aux = (chosen, rejected, logits[:n_pairs].mean(), logits[n_pairs:].mean(),
           nll if compute_nll_loss else torch.zeros((), dtype=torch.float64), beta * chosen_r, beta * rejected_r)
    return loss, tuple(a.detach() for a in aux)


CASES = [
    ("sigmoid", dict(beta=0.3, label_smoothing=0.2)),
    ("sigmoid", dict(beta=0.3, alphapo_alpha=0.05)),
    ("hinge", dict(beta=0.2)),
    ("hinge", dict(beta=0.2, alphapo_alpha=-0.04)),
    ("ipo", dict(beta=0.7)),
    ("ipo", dict(beta=0.7, alphapo_alpha=0.6)),
    ("simpo", dict(beta=2.5, gamma=0.8, label_smoothing=0.1)),
    ("simpo", dict(beta=2.5, gamma=0.8, alphapo_alpha=-0.5)),
]


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
@pytest.mark.parametrize("loss_type, options", CASES)
def test_cpo_losses_match_float64_reference(loss_type, options, chunk_size):
    options = dict(dict(label_smoothing=0.0, gamma=0.0, alphapo_alpha=0.0), **options)
    x, w, target, b = make_inputs(3, 9, 16, 61, torch.float32, seed=80 + chunk_size)
    upstream = torch.rand(()) + 0.5
    loss_fn = LigerFusedLinearCPOLoss(loss_type=loss_type, alpha=0.7, compute_nll_loss=True, chunk_size=chunk_size,
                                      **options)
    got = forward_backward(lambda x_, w_, t_, b_: loss_fn(w_, x_, t_, b_), x, w, target, b, upstream)
    want = forward_backward(lambda *t: cpo_reference(*t, loss_type, alpha=0.7, compute_nll_loss=True, **options),
                            x, w, target, b, upstream)
    torch.testing.assert_close(got[0].double(), want[0], **F32_TOL)
    for index, (a, e) in enumerate(zip(got[1], want[1])):
        torch.testing.assert_close(a.double(), e, **F32_TOL, msg=lambda m: f"aux {index}: {m}")
    for a, e in zip(got[2], want[2]):
        torch.testing.assert_close(a.double(), e.double(), **F32_TOL)


@pytest.mark.parametrize("compute_nll_loss", [False, True])
@pytest.mark.parametrize("loss_type, options", CASES)
def test_cpo_single_pair_token_mode(monkeypatch, loss_type, options, compute_nll_loss):
    """One pair over the logits budget: without AlphaPO and the NLL term the rows' gradients are opposite and
    no logits are computed twice (2R logits GEMMs); otherwise the chosen row alone is deferred (3R - 1)."""
    from agent_code.liger_kernel.chunked_loss import fused_linear_preference as flp
    from agent_code.liger_kernel.chunked_loss import logit_ops

    options = dict(dict(label_smoothing=0.0, gamma=0.0, alphapo_alpha=0.0), **options)
    x, w, target, b = make_inputs(1, 14, 8, 23, torch.float32, seed=94)
    target[1, :4] = -100
    shapes, real_logits = [], logit_ops.EagerLogitOps.logits
    monkeypatch.setattr(logit_ops.EagerLogitOps, "logits", lambda self, x2d: shapes.append(1) or real_logits(self, x2d))
    monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", 5 * 23 * 4)  # runs of 5 tokens: 3 per row
    upstream = torch.rand(()) + 0.5
    loss_fn = LigerFusedLinearCPOLoss(loss_type=loss_type, alpha=0.7, compute_nll_loss=compute_nll_loss, **options)
    got = forward_backward(lambda x_, w_, t_, b_: loss_fn(w_, x_, t_, b_), x, w, target, b, upstream)
    both_rows_deferred = not compute_nll_loss and options["alphapo_alpha"] == 0.0
    assert len(shapes) == (2 * 3 if both_rows_deferred else 3 * 3 - 1)
    want = forward_backward(lambda *t: cpo_reference(*t, loss_type, alpha=0.7, compute_nll_loss=compute_nll_loss,
                                                     **options), x, w, target, b, upstream)
    torch.testing.assert_close(got[0].double(), want[0], **F32_TOL)
    for a, e in zip(got[2], want[2]):
        torch.testing.assert_close(a.double(), e.double(), **F32_TOL)


@pytest.mark.parametrize("loss_type", sorted(CPO_FUNCTIONS))
def test_cpo_losses_pass_gradcheck(loss_type):
    x, w, target, b = make_inputs(2, 5, 4, 7, torch.float64, seed=90)
    function = CPO_FUNCTIONS[loss_type]
    smoothing = 0.1 if function.uses_label_smoothing else 0.0
    gamma = 0.3 if function.uses_gamma else 0.0
    assert torch.autograd.gradcheck(
        lambda *t: function.apply(t[0], t[1], target, t[2], -100, 0.5, 0.4, smoothing, True, False, gamma, 1,
                                  None, None, 0.2)[0],
        (x, w, b),
    )


def test_simpo_variant_is_the_simpo_loss():
    """Without AlphaPO the CPO SimPO variant is LigerFusedLinearSimPOFunction (same absolute margin gamma)."""
    x, w, target, b = make_inputs(3, 7, 8, 29, torch.float64, seed=91)
    args = (-100, 1.8, 0.5, 0.15, True, False, 0.6, 2)
    cpo_loss, cpo_aux = LigerFusedLinearCPOSimPOFunction.apply(x, w, target, b, *args)
    simpo_loss, simpo_aux = LigerFusedLinearSimPOFunction.apply(x, w, target, b, *args)
    torch.testing.assert_close(cpo_loss, simpo_loss, rtol=1e-12, atol=1e-12)
    for a, e in zip(cpo_aux, simpo_aux):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_output_dtype_and_softcap_keywords_are_accepted():
    """The patched forward calls ``loss_fn(W, h, target, b, softcap=..., output_dtype=...)``."""
    x, w, target, b = make_inputs(2, 5, 8, 13, torch.bfloat16, seed=92)
    loss, aux = LigerFusedLinearCPOLoss(loss_type="ipo")(w, x, target, b, softcap=None, output_dtype=torch.float32)
    assert loss.dtype == torch.float32 and all(a.dtype == torch.float32 for a in aux)


@pytest.mark.parametrize("options, error, message", [
    (dict(loss_type="kto_pair"), ValueError, "loss_type must be one of"),
    (dict(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing must be 0 for loss_type 'hinge'"),
    (dict(loss_type="ipo", label_smoothing=0.1), ValueError, "label_smoothing must be 0 for loss_type 'ipo'"),
    (dict(loss_type="sigmoid", gamma=0.5), ValueError, "gamma (the SimPO margin) must be 0"),
    (dict(loss_type="simpo", beta=0.0), ValueError, "beta must be > 0"),
    (dict(loss_type="simpo", alphapo_alpha=float("nan")), TypeError, "alphapo_alpha must be a finite real"),
])
def test_cpo_loss_refuses_options_it_would_ignore_or_cannot_use(options, error, message):
    with pytest.raises(error) as raised:
        LigerFusedLinearCPOLoss(**options)
    assert message in str(raised.value)


@pytest.mark.parametrize("extra, error, message", [
    ((float("nan"),), TypeError, "alphapo_alpha must be a finite real"),  # alphapo_alpha reaches the checks
    ((0.0, 1.0), TypeError, "positional arguments but"),
])
def test_cpo_function_checks_the_arguments_after_the_simpo_ones(extra, error, message):
    x, w, target, b = make_inputs(2, 3, 4, 7, torch.float32, seed=93)
    simpo_args = (-100, 0.1, 1.0, 0.0, False, False, 0.0, 1, None, None)
    with pytest.raises(error) as raised:
        CPO_FUNCTIONS["hinge"].apply(x, w, target, b, *simpo_args, *extra)
    assert message in str(raised.value)


def test_cpo_module_repr_names_its_loss():
    text = repr(LigerFusedLinearCPOLoss(loss_type="ipo", beta=0.3, alphapo_alpha=0.2))
    assert "loss_type='ipo', alphapo_alpha=0.2, beta=0.3" in text


@pytest.mark.parametrize("function", [LigerFusedLinearSimPOFunction, *CPO_FUNCTIONS.values()], ids=lambda f: f.__name__)
def test_params_translate_forward_options_in_order_with_their_defaults(function):
    """``params`` is where a Function's options become one object (also for packed batches): it must take
    ``forward``'s options after ``bias``, in the same order, with the same defaults."""
    forward = list(inspect.signature(function.forward).parameters.values())[5:]  # after ctx, _input, weight, target, bias
    params = list(inspect.signature(function.params).parameters.values())
    assert [(p.name, p.default) for p in params] == [(p.name, p.default) for p in forward]
