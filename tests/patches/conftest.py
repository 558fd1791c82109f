"""Shared fixtures of the patches tests: tiny random-init causal LMs, preference batches, the TRL reference.

No downloads: every model is built from a config in code (``tests.helpers.build_tiny_model``: hidden 32, 2 layers,
vocab 97).
"""
import pytest
import torch
import torch.nn.functional as F

from agent_code.liger_kernel.chunked_loss.simpo_loss import AUX_OUTPUT_NAMES
from patches import apply_fused_simpo, revert_fused_simpo
from tests.helpers import build_tiny_model, make_preference_batch, parameter_grads

#: non-default values for every option, so a dropped or swapped option changes the result
SIMPO_OPTIONS = dict(beta=2.5, gamma=0.7, alpha=0.6, label_smoothing=0.15, compute_nll_loss=True)
#: the defaults the issue fixes for apply_fused_simpo
ISSUE_DEFAULTS = dict(beta=2.0, gamma=1.0, alpha=1.0, label_smoothing=0.0, compute_nll_loss=False)
FLOAT64_TOLERANCE = dict(rtol=1e-9, atol=1e-11)


def trl_simpo_reference(
    logits, labels, beta, gamma, alpha, label_smoothing, compute_nll_loss, ignore_index=-100
):
    """TRL ``CPOTrainer(loss_type="simpo")`` written out from its definition, in float64, from full logits.

    ``logits`` (2B, T, V) of the unpatched model, ``labels`` (2B, T) unshifted with ``ignore_index`` on prompt
    and padding. Returns a dict of the loss (differentiable) and the statistics the patched output reports.
    """
    logits = logits.double()
    n_pairs = logits.shape[0] // 2
    # get_batch_logps: shift, mask, length-normalised mean log-prob (average_log_prob for simpo)
    shifted_logits, shifted_labels = logits[:, :-1, :], labels[:, 1:]
    loss_mask = shifted_labels != ignore_index
    safe_labels = shifted_labels.masked_fill(~loss_mask, 0)
    per_token_logps = torch.gather(shifted_logits.log_softmax(-1), 2, safe_labels.unsqueeze(2)).squeeze(2)
    all_logps = (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    chosen_logps, rejected_logps = all_logps[:n_pairs], all_logps[n_pairs:]
    # cpo_loss, loss_type == "simpo"
    gamma_logratios = gamma / beta
    simpo_logits = (chosen_logps - rejected_logps) - gamma_logratios
    losses = -F.logsigmoid(beta * simpo_logits) * (1 - label_smoothing) - F.logsigmoid(
        -beta * simpo_logits
    ) * label_smoothing
    nll_loss = F.cross_entropy(
        shifted_logits[:n_pairs].reshape(-1, logits.shape[-1]),
        shifted_labels[:n_pairs].reshape(-1),
        ignore_index=ignore_index,
    )
    loss = losses.mean() + (alpha * nll_loss if compute_nll_loss else 0.0)
    return dict(
        loss=loss,
        chosen_logps=chosen_logps.detach(),
        rejected_logps=rejected_logps.detach(),
        chosen_rewards=beta * chosen_logps.detach(),
        rejected_rewards=beta * rejected_logps.detach(),
        chosen_logits_mean=logits[:n_pairs].detach().mean(),
        rejected_logits_mean=logits[n_pairs:].detach().mean(),
        nll_loss=nll_loss.detach() if compute_nll_loss else torch.zeros((), dtype=torch.float64),
    )


def check_simpo_parity(
    model, batch, options, *, tolerance=FLOAT64_TOLERANCE, before_patch=None, model_kwargs=None, **call_kwargs
):
    """Reference from the unpatched model, then the patched model on the same batch; compare everything.

    Compares the loss, every statistic of the output and the gradient of every trainable parameter.
    ``options`` None: apply with no arguments and expect the issue's defaults. ``before_patch(model)`` runs
    after the reference (e.g. to switch gradient checkpointing on for the patched run only). ``model_kwargs`` go
    to both calls, ``call_kwargs`` to the patched call only. Returns the unpatched output (logits and all).
    ``model`` is left unpatched.
    """
    input_ids, attention_mask, labels = batch
    model_kwargs = model_kwargs or {}
    unpatched = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    logits = unpatched.logits
    math_options = {name: (options or ISSUE_DEFAULTS)[name] for name in ISSUE_DEFAULTS}
    reference = trl_simpo_reference(logits, labels, **math_options)
    reference["loss"].backward()
    expected_grads = parameter_grads(model)

    if before_patch is not None:
        before_patch(model)
    apply_fused_simpo(model, **(options or {}))
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **model_kwargs, **call_kwargs)
    output.loss.backward()
    grads = parameter_grads(model)
    revert_fused_simpo(model)

    assert output.logits is None
    torch.testing.assert_close(output.loss.double(), reference["loss"].detach(), **tolerance)
    for name in AUX_OUTPUT_NAMES:
        torch.testing.assert_close(getattr(output, name).double(), reference[name], **tolerance, msg=name)
    assert grads.keys() == expected_grads.keys()
    for name, expected in expected_grads.items():
        torch.testing.assert_close(grads[name], expected, **tolerance, msg=lambda m: f"grad of {name}: {m}")
    return unpatched


# Helpers reach the tests as fixtures: test modules cannot import a conftest reliably under every import mode.
@pytest.fixture
def tiny_model():
    return build_tiny_model


@pytest.fixture
def preference_batch():
    return make_preference_batch


@pytest.fixture
def trl_reference():
    return trl_simpo_reference


@pytest.fixture
def grads_of():
    return parameter_grads


@pytest.fixture
def check_parity():
    return check_simpo_parity


@pytest.fixture
def simpo_options():
    return dict(SIMPO_OPTIONS)
