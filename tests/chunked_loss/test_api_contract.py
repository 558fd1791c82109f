"""The loss as an API: option checks, autograd corner cases (double backward, in-place changes), torch.compile,
empty sequences and the logits-budget environment variable."""
import gc
import inspect
import math
import weakref

import pytest
import torch

from agent_code.liger_kernel.chunked_loss import (
    LigerFusedLinearSimPOFunction,
    LigerFusedLinearSimPOLoss,
    liger_fused_linear_simpo,
)
from agent_code.liger_kernel.chunked_loss import fused_linear_preference as flp
from agent_code.liger_kernel.chunked_loss.cpo_loss import CPO_FUNCTIONS
from agent_code.liger_kernel.chunked_loss.simpo_loss import AUX_OUTPUT_NAMES
from tests.helpers import MatmulCounter

#: Bad values of every option of the Module (and the same leading options of the Function).
BAD_OPTIONS = {
    "ignore_index": [1.0, "-100", True, None],
    "beta": [-2, 0, float("nan"), float("inf"), 10**400, "0.1", True, None],  # 10**400: no float holds it
    "alpha": [-1, float("nan"), 10**400, "1", None],
    "label_smoothing": [2, -0.1, float("nan"), "0"],
    "compute_nll_loss": ["False", 0, 1, None],
    "compiled": ["no", 1, None],
    "gamma": [float("nan"), float("-inf"), "0.5", None],
    "chunk_size": [0, -1, 1.5, 2.0, True, "2", None],
}
#: The Function's two trailing arguments beyond the Module's options.
BAD_TRAILING = {
    "softcap": [0.0, -1.0, float("nan"), float("inf"), True, "2"],
    "output_dtype": [torch.int64, torch.bool, "float32", float],
}
FUNCTION_ORDER = ("ignore_index", "beta", "alpha", "label_smoothing", "compute_nll_loss", "compiled", "gamma",
                  "chunk_size", "softcap", "output_dtype")
DEFAULTS = dict(ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=False, compiled=True,
                gamma=0.5, chunk_size=1, softcap=None, output_dtype=None)


def tiny_inputs(seed=0, n_pairs=2, seq_len=5, hidden=6, vocab=11, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n_pairs, seq_len, hidden, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen, dtype=dtype) / hidden**0.5).requires_grad_()
    b = torch.randn(vocab, generator=gen, dtype=dtype).requires_grad_()
    target = torch.randint(0, vocab, (2 * n_pairs, seq_len), generator=gen)
    target[:, -2:][torch.rand(2 * n_pairs, 2, generator=gen) < 0.5] = -100
    return x, w, target, b


def apply_with(**options):
    x, w, target, b = tiny_inputs()
    args = {**DEFAULTS, **options}
    if isinstance(args["ignore_index"], int):
        target = torch.where(target == -100, args["ignore_index"], target)
    return LigerFusedLinearSimPOFunction.apply(x, w, target, b, *(args[name] for name in FUNCTION_ORDER))


def _cases(table):
    return [(name, value) for name, values in table.items() for value in values]


def _short_repr(value):
    return repr(value)[:24]  # 10**400 would be a 400-digit test id


def _names_the_option(name):
    return rf"\b{name}\b"


def test_bad_option_table_covers_every_option():
    module_options = list(inspect.signature(LigerFusedLinearSimPOLoss.__init__).parameters)[1:]
    assert sorted(BAD_OPTIONS) == sorted(module_options)
    # after ctx and the four tensors
    function_args = list(inspect.signature(LigerFusedLinearSimPOFunction.forward).parameters)[5:]
    assert tuple(function_args) == FUNCTION_ORDER


@pytest.mark.parametrize("name,value", _cases(BAD_OPTIONS), ids=_short_repr)
def test_module_rejects_bad_option_at_construction(name, value):
    with pytest.raises((TypeError, ValueError), match=_names_the_option(name)):
        LigerFusedLinearSimPOLoss(**{name: value})


@pytest.mark.parametrize("name,value", _cases({**BAD_OPTIONS, **BAD_TRAILING}), ids=_short_repr)
def test_function_apply_rejects_bad_option(name, value):
    with pytest.raises((TypeError, ValueError), match=_names_the_option(name)):
        apply_with(**{name: value})


@pytest.mark.parametrize("options", [
    dict(beta=1e-6, alpha=0, label_smoothing=1, gamma=-3.0, chunk_size=7, ignore_index=0, compute_nll_loss=True),
    dict(beta=2, alpha=0.0, label_smoothing=0.5, gamma=0, compiled=False, ignore_index=-1),
])
def test_edge_values_that_are_valid_are_accepted(options):
    LigerFusedLinearSimPOLoss(**options)
    loss, aux = apply_with(**options, softcap=30.0, output_dtype=torch.float64)
    assert loss.dtype == torch.float64 and math.isfinite(loss.item())


# ---------------------------------------------------------------------------------------------------------------
# double backward
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_penalty_raises_instead_of_contributing_nothing():
    x, w, target, b = tiny_inputs(seed=1)
    loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, b)
    first_order = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    grads = torch.autograd.grad(loss, (x, w, b), create_graph=True)
    for g, want in zip(grads, first_order):  # the first-order values themselves are unchanged
        torch.testing.assert_close(g, want, rtol=0, atol=0)
    for g in grads:
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            g.pow(2).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        (loss + grads[0].pow(2).sum()).backward()


def test_create_graph_still_gives_scaled_first_order_gradients():
    x, w, target, b = tiny_inputs(seed=2)
    loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, b)
    want = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    got = torch.autograd.grad(2.5 * loss, (x, w, b), create_graph=True)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g.detach(), 2.5 * ref)


def _packed_simpo(x, w, b, target):
    """The packed variant on the same tokens laid end to end (x, target: (2B, T) rows flattened to one row)."""
    n_rows, seq_len = target.shape
    offsets = torch.arange(0, n_rows * seq_len + 1, seq_len)
    target = target.clone()
    target[:, -1] = -100  # a packed sequence's last position predicts nothing
    args = tuple(DEFAULTS[name] for name in FUNCTION_ORDER)
    return LigerFusedLinearSimPOFunction.apply_packed(x.reshape(1, -1, x.shape[-1]), w, target.reshape(1, -1),
                                                      offsets, b, *args)[0]


#: loss(x, w, b, target) of every Function the second-order refusal must cover
SECOND_ORDER_LOSSES = {
    "simpo": lambda x, w, b, target: LigerFusedLinearSimPOFunction.apply(x, w, target, b)[0],
    "simpo packed": _packed_simpo,
    **{f"cpo {loss_type}": (lambda function: lambda x, w, b, target: function.apply(
        x, w, target, b, -100, 0.5, 0.4, 0.0, True, True, 0.0)[0])(function)
       for loss_type, function in CPO_FUNCTIONS.items()},
}


def _first_order(loss, inputs):
    return torch.autograd.grad(loss, inputs, create_graph=True)


#: second-order computations: (loss of (x, w, b), x, w, b) -> anything; each must raise the library's message
SECOND_ORDER_ROUTES = {
    "penalty on the input gradient, by input": lambda f, x, w, b: torch.autograd.grad(
        _first_order(f(x, w, b), x)[0].pow(2).sum(), x),
    "same, allow_unused=True": lambda f, x, w, b: torch.autograd.grad(
        _first_order(f(x, w, b), x)[0].pow(2).sum(), x, allow_unused=True),
    "penalty on the input gradient, by weight": lambda f, x, w, b: torch.autograd.grad(
        _first_order(f(x, w, b), x)[0].pow(2).sum(), (w, b), allow_unused=True),
    "weight gradient, by the leaf upstream of a non-leaf input": lambda f, x, w, b: torch.autograd.grad(
        _first_order(f(1.5 * x, w, b), w)[0].pow(2).sum(), x, allow_unused=True),
    "input gradient, by the upstream scale": lambda f, x, w, b: (lambda scale: torch.autograd.grad(
        _first_order(scale * f(x, w, b), x)[0].sum(), scale, allow_unused=True))(torch.tensor(2.0, requires_grad=True)),
    "functional.hvp by input": lambda f, x, w, b: torch.autograd.functional.hvp(
        lambda x: f(x, w, b), x, torch.randn_like(x)),
    "functional.vhp by weight": lambda f, x, w, b: torch.autograd.functional.vhp(
        lambda w: f(x, w, b), w, torch.randn_like(w)),
    "functional.hessian by bias": lambda f, x, w, b: torch.autograd.functional.hessian(lambda b: f(x, w, b), b),
    "backward()": lambda f, x, w, b: _first_order(f(x, w, b), b)[0].pow(2).sum().backward(),
}


@pytest.mark.parametrize("route", SECOND_ORDER_ROUTES)
@pytest.mark.parametrize("loss_name", SECOND_ORDER_LOSSES)
def test_every_second_order_route_raises_the_double_backward_message(loss_name, route):
    """Not autograd's "appears to not have been used in the graph", nor a silent None or zero (``allow_unused``,
    ``torch.autograd.functional``): the returned gradients carry a node that raises, linked to the inputs."""
    x, w, target, b = tiny_inputs(seed=len(loss_name) + 3 * len(route))
    loss_fn = lambda x, w, b: SECOND_ORDER_LOSSES[loss_name](x, w, b, target)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"Function(Packed)?Backward: double backward is not supported"):
        SECOND_ORDER_ROUTES[route](loss_fn, x, w, b)


# ---------------------------------------------------------------------------------------------------------------
# in-place changes between forward and backward
# ---------------------------------------------------------------------------------------------------------------


def _change_in_place(tensors, name):
    x, w, target, b = tensors
    with torch.no_grad():
        {"_input": lambda: x.mul_(2), "weight": lambda: w.add_(1), "bias": lambda: b.sub_(1),
         "target": lambda: target.__setitem__((0, 0), (int(target[0, 0]) + 1) % w.shape[0])}[name]()


@pytest.mark.parametrize("name", ["_input", "weight", "bias", "target"])
def test_in_place_change_before_backward_raises_like_plain_autograd(name):
    tensors = tiny_inputs(seed=3)
    loss, _ = LigerFusedLinearSimPOFunction.apply(*tensors)
    _change_in_place(tensors, name)
    with pytest.raises(RuntimeError, match=rf"modified by an inplace operation: {name} of shape"):
        loss.backward()

    if name == "bias":  # plain autograd saves no bias (only the softmax computed from it), so it cannot tell
        return
    # plain autograd (full logits) refuses the same change to the tensors it saves
    x, w, target, b = tensors = tiny_inputs(seed=3)
    loss = torch.nn.functional.cross_entropy((x @ w.T + b).flatten(0, 1), target.flatten())
    _change_in_place(tensors, name)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_in_place_change_of_an_int32_target_raises():
    """The caller's target is watched, not the int64 copy forward makes of it."""
    x, w, target, b = tiny_inputs(seed=4)
    target = target.int()
    loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, b)
    target[0, 0] = (int(target[0, 0]) + 1) % w.shape[0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation: target"):
        loss.backward()


def test_in_place_change_of_the_base_of_a_temporary_view_raises():
    x, w, target, b = tiny_inputs(seed=4)
    hidden = torch.randn(x.shape[0], x.shape[1] + 3, x.shape[2], requires_grad=True)
    loss, _ = LigerFusedLinearSimPOFunction.apply(hidden[:, 3:], w, target, b)  # the view dies here
    with torch.no_grad():
        hidden.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation: _input"):
        loss.backward()


def test_in_place_change_after_backward_or_without_grad_is_fine():
    x, w, target, b = tiny_inputs(seed=5)
    loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, b)
    loss.backward()
    with torch.no_grad():
        w.add_(1)
        loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, b)
        w.add_(1)
    assert not loss.requires_grad


def test_hidden_states_are_not_kept_alive_until_backward():
    """Only weak references to the inputs: the hidden states can be freed once the loss is computed."""
    x, w, target, b = tiny_inputs(seed=6)
    hidden = x * 2.0  # a non-leaf, as from a final norm; MulBackward keeps x, not its output
    alive = weakref.ref(hidden)
    loss, _ = LigerFusedLinearSimPOFunction.apply(hidden, w, target, b)
    del hidden
    gc.collect()
    assert alive() is None
    loss.backward()
    assert x.grad is not None and w.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# torch.compile: a graph break around the fused loss, same numbers as eager
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def compile_backend(request):
    backend = request.param  # inductor, marked slow, is skipped unless asked for (tests/conftest.py)
    torch._dynamo.reset()
    yield backend
    torch._dynamo.reset()


BACKENDS = ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


def _module_entry(x, w, target, b):
    return LigerFusedLinearSimPOLoss(beta=0.7, gamma=0.2, chunk_size=2)(w, x, target, b)


def _functional_entry(x, w, target, b):  # ops around the loss, so the compiled graph is not empty
    loss, aux = liger_fused_linear_simpo(torch.tanh(x) * 1.5, w, target, b, -100, 0.7, 0.5, 0.1, True)
    return 2.0 * loss + aux[0].sum(), aux


def _apply_entry(x, w, target, b):
    loss, aux = LigerFusedLinearSimPOFunction.apply(x * 0.5, w, target, b, -100, 0.3)
    return loss.exp(), aux


@pytest.mark.parametrize("compile_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("entry", [_module_entry, _functional_entry, _apply_entry], ids=lambda f: f.__name__[1:])
def test_torch_compile_matches_eager(compile_backend, entry):
    def run(fn):
        x, w, target, b = tiny_inputs(seed=7, n_pairs=3)
        loss, aux = fn(x, w, target, b)
        loss.backward()
        return loss.detach(), aux, (x.grad, w.grad, b.grad)

    want = run(entry)
    got = run(torch.compile(entry, backend=compile_backend))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # still only the loss: no gradients, no autograd node
        loss, aux = torch.compile(entry, backend=compile_backend)(*tiny_inputs(seed=7, n_pairs=3))
    assert not loss.requires_grad
    torch.testing.assert_close((loss, aux), want[:2], rtol=1e-6, atol=1e-6)


def test_functional_is_exactly_the_function_apply():
    assert liger_fused_linear_simpo == LigerFusedLinearSimPOFunction.apply


def test_inference_mode_computes_only_the_loss():
    x, w, target, b = tiny_inputs(seed=8, n_pairs=4)
    with torch.inference_mode(), MatmulCounter() as counter:
        loss, _ = LigerFusedLinearSimPOFunction.apply(x, w, target, b, -100, 0.1, 1.0, 0.0, True, True, 0.5, 2)
    assert counter.count == 2  # the logits of two chunks, no gradient products
    torch.testing.assert_close(loss, LigerFusedLinearSimPOFunction.apply(
        x, w, target, b, -100, 0.1, 1.0, 0.0, True, True, 0.5, 2)[0].detach())


# ---------------------------------------------------------------------------------------------------------------
# empty sequences
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compute_nll_loss", [True, False])
def test_zero_length_sequences_are_rows_without_tokens(bias, compute_nll_loss):
    """T = 0: every row is empty, as if all its tokens were ignored: zero loss, log-probs, rewards and logits
    means (no NaN from a mean over nothing), and zero gradients of the inputs' shapes."""
    n_pairs, hidden, vocab = 3, 6, 11
    x = torch.randn(2 * n_pairs, 0, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    b = torch.randn(vocab, requires_grad=True) if bias else None
    target = torch.empty(2 * n_pairs, 0, dtype=torch.long)
    loss, aux = LigerFusedLinearSimPOFunction.apply(x, w, target, b, -100, 0.1, 1.0, 0.0, compute_nll_loss)
    (3.0 * loss).backward()
    assert loss.shape == () and loss.item() == 0.0
    for name, value in zip(AUX_OUTPUT_NAMES, aux):
        assert value.shape == ((n_pairs,) if name.endswith(("logps", "rewards")) else ()), name
        assert (value == 0).all(), name
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert (w.grad == 0).all() and (b is None or (b.grad.shape == b.shape and (b.grad == 0).all()))
    # the same as one position that is ignored in every row, but for the logits means (no logits at all)
    x1 = torch.randn(2 * n_pairs, 1, hidden)
    loss1, aux1 = LigerFusedLinearSimPOFunction.apply(x1, w, torch.full((2 * n_pairs, 1), -100), b, -100, 0.1,
                                                      1.0, 0.0, compute_nll_loss)
    torch.testing.assert_close((loss1, aux1[:2], aux1[4:]), (loss, aux[:2], aux[4:]))


# ---------------------------------------------------------------------------------------------------------------
# LIGER_LOGITS_BUDGET_BYTES
# ---------------------------------------------------------------------------------------------------------------
# (read when the loss runs, float notation, the module attribute over it: test_token_chunking.py)


@pytest.mark.parametrize("text,expected", [("1e9", 10**9), ("1_000_000_000", 10**9), ("1073741824", 1 << 30),
                                           (" 2048 ", 2048), ("1.5e3", 1500), ("123456789012345678901", None)])
def test_budget_env_variable_spellings(monkeypatch, text, expected):
    monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", None)
    monkeypatch.setenv("LIGER_LOGITS_BUDGET_BYTES", text)
    assert flp.logits_budget_bytes() == (int(text) if expected is None else expected)  # big ints stay exact


@pytest.mark.parametrize("text", ["lots", "", "1GiB", "0", "-5", "1.5", "nan", "inf", "1e-3"])
def test_bad_budget_env_variable_raises_naming_it_when_the_loss_runs(monkeypatch, text):
    monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", None)
    monkeypatch.setenv("LIGER_LOGITS_BUDGET_BYTES", text)
    with pytest.raises(ValueError, match=r"LIGER_LOGITS_BUDGET_BYTES must be a positive whole number of bytes, "
                                         r"e\.g\. 1073741824"):
        LigerFusedLinearSimPOFunction.apply(*tiny_inputs(seed=9))


def test_budget_module_attribute_overrides_the_env_variable(monkeypatch):
    monkeypatch.setenv("LIGER_LOGITS_BUDGET_BYTES", "garbage")
    monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", 4096)
    assert flp.logits_budget_bytes() == 4096
    monkeypatch.delenv("LIGER_LOGITS_BUDGET_BYTES")
    monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", None)
    assert flp.logits_budget_bytes() == 1 << 30
    monkeypatch.setattr(flp, "LOGITS_BUDGET_BYTES", "4096")
    with pytest.raises(ValueError, match="LOGITS_BUDGET_BYTES must be None or a positive int"):
        flp.logits_budget_bytes()
