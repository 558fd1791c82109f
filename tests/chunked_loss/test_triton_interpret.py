"""The Triton kernels' logic on CPU tensors under ``TRITON_INTERPRET=1``, against the eager path.

``TRITON_INTERPRET`` is read when a kernel is decorated, i.e. when its module is first imported; to keep the
real (compiled) kernels of a GPU session untouched, the cases run in one fresh interpreter process
(``python -m tests.chunked_loss.test_triton_interpret``) whose JSON report the tests below read.
"""
import json

import pytest
import torch

from tests.helpers import interpreter_report

try:
    import triton  # noqa: F401
except ImportError:
    triton = None

pytestmark = [pytest.mark.skipif(triton is None, reason="triton is not installed"), pytest.mark.subprocess]

# (name, dtype, bias, softcap, block): blocks smaller than V exercise the loop and the ragged last block
KERNEL_CASES = [
    ("fp32", "float32", False, None, 16),
    ("fp32-bias-softcap", "float32", True, 2.0, 16),
    ("bf16-bias", "bfloat16", True, None, 32),
    ("fp16-softcap", "float16", False, 5.0, 64),
]
# (name, run length in tokens, pairs, dtype, NLL term[, options of loss_case]); one pair in token mode scales the
# chosen row's gradients afterwards (with the NLL term) or both rows' (without it); bf16/fp16 keep dX in float32
# until it is scaled (in the bytes of dX and a buffer of its own); the last two train only some inputs
LOSS_CASES = [("pair-mode", None, 2, "float32", True), ("token-mode", 4, 2, "float32", True),
              ("token-mode-one-pair", 4, 1, "float32", True), ("token-mode-one-pair-no-nll", 4, 1, "float32", False),
              ("token-mode-one-pair-bf16", 4, 1, "bfloat16", True),
              ("token-mode-one-pair-bf16-no-nll", 4, 1, "bfloat16", False),
              ("token-mode-one-pair-fp16-no-nll-input-only", 3, 1, "float16", False,
               dict(bias=False, trainable="x")),
              ("token-mode-one-pair-bf16-frozen-input", 4, 1, "bfloat16", True, dict(trainable="wb")),
              # the weight gradient summed in bf16 (no float32 (V, H) buffer): four one-pair chunks, then token mode
              ("pair-chunks-bf16-weight-grad-in-bf16", 11, 4, "bfloat16", True, dict(weight_grad_in_input_dtype=True)),
              ("token-mode-one-pair-bf16-weight-grad-in-bf16", 4, 1, "bfloat16", True,
               dict(weight_grad_in_input_dtype=True))]


def kernel_case(dtype_name, bias, softcap, block, seed, n_rows=9, vocab=37, ignore_index=-100):
    """Max abs errors of the statistics and gradient kernels vs the float64 eager functions."""
    from agent_code.liger_kernel.chunked_loss.logit_ops import apply_softcap_, logit_gradient_, logit_statistics
    from agent_code.liger_kernel.chunked_loss.triton_logit_ops import triton_logit_gradient_
    from agent_code.liger_kernel.chunked_loss.triton_logit_ops import triton_logit_statistics

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    raw = (torch.randn(n_rows, vocab, generator=gen) * 4).to(dtype)
    b = (torch.randn(vocab, generator=gen)).to(dtype) if bias else None
    target = torch.randint(0, vocab, (n_rows,), generator=gen)
    target[1] = ignore_index
    coef = torch.randn(n_rows, generator=gen) * (target != ignore_index)
    capped = apply_softcap_(raw.double() + (b.double() if bias else 0.0), softcap)
    want_stats = logit_statistics(capped, target, ignore_index)
    want_grad = logit_gradient_(capped.clone(), want_stats[0], target, coef.double(), ignore_index, softcap)

    got_stats = triton_logit_statistics(raw, target, ignore_index, b, softcap, block=block)
    errors = {f"stat{i}": (g.double() - w).abs().max().item() for i, (g, w) in enumerate(zip(got_stats, want_stats))}
    buffer = raw.clone()
    got_grad = triton_logit_gradient_(buffer, got_stats[0], target, coef, dtype, b, softcap, block=block)
    errors["grad"] = (got_grad.double() - want_grad).abs().max().item()
    errors["grad_in_place"] = float(got_grad.data_ptr() == buffer.data_ptr())
    if dtype == torch.float32:  # fp32 logits, bf16 gradient written over the first half of each row
        buffer = raw.clone()
        half = triton_logit_gradient_(buffer, got_stats[0], target, coef, torch.bfloat16, b, softcap, block=block)
        errors["grad_bf16_over_fp32"] = (half.double() - want_grad).abs().max().item()
        errors["grad_bf16_over_fp32_stride"] = float(half.stride(0) == 2 * vocab)
    return errors


def force_triton_ops():
    """Route the fused loss through TritonLogitOps on CPU tensors (the interpreter runs its kernels)."""
    from agent_code.liger_kernel.chunked_loss import fused_linear_preference as flp
    from agent_code.liger_kernel.chunked_loss.triton_logit_ops import TritonLogitOps

    flp.select_logit_ops = lambda _input, weight, bias, softcap, ignore_index, allow_triton, *settings: \
        TritonLogitOps(weight, bias, softcap, ignore_index, *settings)
    return flp


def output_errors(got, want):
    """Max abs error, and the largest error of any output relative to that output's largest float64 value, of two
    ``forward_backward`` results (outputs float64 does not have are left out)."""
    assert [g is None for g in got[2]] == [e is None for e in want[2]]
    pairs = [(g, e) for g, e in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]) if e is not None]
    return {"max_abs_err": max((g.double() - e.double()).abs().max().item() for g, e in pairs),
            "max_rel_err": max(((g.double() - e.double()).abs().max() / e.double().abs().max().clamp(min=1e-30)).item()
                               for g, e in pairs)}


def loss_case(run_tokens, n_pairs, dtype_name, nll, options=None, *, seed):
    """Whole fused loss through TritonLogitOps on CPU vs the float64 reference: max abs error, and the largest
    error of any output relative to that output's largest float64 value. ``options``: ``bias`` (default True),
    ``trainable`` (the inputs that require grad, of "xwb"; default all), ``weight_grad_in_input_dtype``,
    ``gradient_filter_eps`` (test_block_sparse_interpret.py's cases)."""
    options = dict(dict(bias=True, trainable="xwb"), **(options or {}))
    from tests.helpers import forward_backward, make_inputs, ours, truth

    flp = force_triton_ops()
    flp.WEIGHT_GRAD_IN_INPUT_DTYPE = options.get("weight_grad_in_input_dtype", False)
    flp.GRADIENT_FILTER_EPS = options.get("gradient_filter_eps")
    if flp.GRADIENT_FILTER_EPS is not None:
        from agent_code.liger_kernel.chunked_loss import triton_block_sparse

        triton_block_sparse.DENSE_ABOVE_KEPT_FRACTION = 1.0  # the block-sparse products even with every block kept
    vocab = 41
    if run_tokens is not None:
        flp.LOGITS_BUDGET_BYTES = run_tokens * vocab * 4
    x, w, target, b = make_inputs(n_pairs, 11, 8, vocab, getattr(torch, dtype_name), bias=options["bias"], seed=seed)
    for name, t in zip("xwb", (x, w, b)):
        if t is not None:
            t.requires_grad_(name in options["trainable"])
    target[-1, :3] = -100  # rows of different lengths
    upstream = torch.tensor(0.75)
    kwargs = dict(compute_nll_loss=nll, softcap=3.0, label_smoothing=0.1)
    got = forward_backward(ours, x, w, target, b, upstream, **kwargs)
    want = forward_backward(truth, x, w, target, b, upstream, **kwargs)
    return output_errors(got, want)


def run_all_cases():
    report = {name: kernel_case(*args, seed=i) for i, (name, *args) in enumerate(KERNEL_CASES)}
    report.update({name: loss_case(*args, seed=10 + i) for i, (name, *args) in enumerate(LOSS_CASES)})
    return report


@pytest.fixture(scope="module")
def interpreted():
    return interpreter_report("tests.chunked_loss.test_triton_interpret")


# tolerances: fp32 arithmetic on values of size ~10; one rounding of the gradient in the narrow dtypes
GRAD_TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 3e-3}


@pytest.mark.parametrize("name,dtype_name", [(c[0], c[1]) for c in KERNEL_CASES])
def test_kernels_match_eager(interpreted, name, dtype_name):
    errors = interpreted[name]
    for i in range(3):
        assert errors[f"stat{i}"] < 1e-4, (name, i, errors)
    assert errors["grad"] < GRAD_TOL[dtype_name], errors
    assert errors["grad_in_place"] == 1.0
    if dtype_name == "float32":
        assert errors["grad_bf16_over_fp32"] < 2e-2, errors
        assert errors["grad_bf16_over_fp32_stride"] == 1.0


@pytest.mark.parametrize("name,dtype_name", [(c[0], c[3]) for c in LOSS_CASES])
def test_fused_loss_with_kernels_matches_float64(interpreted, name, dtype_name):
    if dtype_name == "float32":
        assert interpreted[name]["max_abs_err"] < 1e-5, interpreted[name]
    else:  # a few bf16 roundings (inputs are bf16 already: the error is the logits' and gradients' rounding)
        assert interpreted[name]["max_rel_err"] < 2e-2, interpreted[name]


if __name__ == "__main__":
    print(json.dumps(run_all_cases()))
