"""The gradient filter's block-sparse kernels on CPU tensors under ``TRITON_INTERPRET=1``, against float64, and the
whole loss through them with every block kept.

As in test_triton_interpret.py, the cases run in one fresh interpreter process
(``python -m tests.chunked_loss.test_block_sparse_interpret``) whose JSON report the tests read. float32 and
float16 only: the interpreter's ``tl.dot`` mishandles bfloat16 operands (the GPU tests cover bf16). The kernels
loop over a run-time count of kept blocks, which triton's interpreter runs from 3.9 on (requirements.txt's pin;
3.6's cannot, e.g. a GPU image's, where test_gradient_filter.py runs the compiled kernels).
"""
import json

import pytest
import torch

from tests.helpers import interpreter_report, triton_interpreter_marks

pytestmark = [*triton_interpreter_marks(), pytest.mark.subprocess]
BLOCK = 16  # rows, columns and hidden columns per block: ragged last blocks at the odd shapes below
# (name, dtype, rows, vocab, hidden, eps)
CASES = [("fp32", "float32", 47, 123, 40, 1e-3), ("fp16", "float16", 33, 70, 24, 1e-3),
         ("fp32-keep-all", "float32", 20, 55, 17, 0.0)]


def reference_keep(grad: torch.Tensor, coef: torch.Tensor, eps: float) -> torch.Tensor:
    """Float64: which ``BLOCK x BLOCK`` blocks hold some ``|grad| / |coef| >= eps`` (rows of coef 0: none)."""
    ratio = grad.double().abs() / coef.double().abs().unsqueeze(1)
    ratio[coef == 0] = 0.0
    n_rows, n_cols = grad.shape
    row_blocks, col_blocks = -(-n_rows // BLOCK), -(-n_cols // BLOCK)
    padded = torch.zeros(row_blocks * BLOCK, col_blocks * BLOCK, dtype=torch.float64)
    padded[:n_rows, :n_cols] = ratio
    return padded.view(row_blocks, BLOCK, col_blocks, BLOCK).amax(dim=(1, 3)) >= eps


def case(dtype_name, n_rows, vocab, hidden, eps, *, seed):
    from agent_code.liger_kernel.chunked_loss.triton_block_sparse import (
        block_sparse_input_grad,
        block_sparse_weight_grad_,
        kept_blocks,
    )

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    probs = torch.softmax(torch.randn(n_rows, vocab, generator=gen) * 3, dim=-1)
    # under eps: column blocks 1 and 2 in every row, and row block 1 beyond column block 2 (no target there)
    probs[:, BLOCK : 3 * BLOCK] *= 1e-6
    probs[BLOCK : 2 * BLOCK, 3 * BLOCK :] *= 1e-6
    target = torch.randint(3 * BLOCK, vocab, (n_rows,), generator=gen)
    target[BLOCK : 2 * BLOCK] = torch.randint(0, BLOCK, target[BLOCK : 2 * BLOCK].shape, generator=gen)
    coef = torch.randn(n_rows, generator=gen) / n_rows
    coef[[1, n_rows - 1]] = 0.0  # ignored tokens
    probs[torch.arange(n_rows), target] -= 1.0
    grad = (coef.unsqueeze(1) * probs).to(dtype)
    weight = torch.randn(vocab, hidden, generator=gen).to(dtype)
    x = torch.randn(n_rows, hidden, generator=gen).to(dtype)
    acc_before = torch.randn(vocab, hidden, generator=gen)

    blocks = kept_blocks(grad, coef, eps, BLOCK, BLOCK)
    want_keep = reference_keep(grad, coef, eps)
    mask = want_keep.repeat_interleave(BLOCK, 0)[:n_rows].repeat_interleave(BLOCK, 1)[:, :vocab]
    kept_grad = grad.double() * mask

    def rel(got, want):
        return ((got.double() - want).norm() / want.norm()).item()

    first = block_sparse_weight_grad_(None, grad, x, blocks, torch.float32, block_hidden=BLOCK)
    acc = block_sparse_weight_grad_(acc_before.clone(), grad, x, blocks, torch.float32, acc_scale=0.5,
                                    block_hidden=BLOCK)
    unscaled = block_sparse_weight_grad_(acc_before.clone(), grad, x, blocks, torch.float32, block_hidden=BLOCK)
    dropped_cols = ~want_keep.any(dim=0).repeat_interleave(BLOCK)[:vocab]
    # operands whose hidden dimension is not unit-stride (a transposed weight, e.g. tied; transposed hidden states)
    strided_weight, strided_x = weight.t().contiguous().t(), x.t().contiguous().t()
    return {
        "input_grad_strided_weight": rel(block_sparse_input_grad(grad, strided_weight, blocks, torch.float32,
                                                                 block_hidden=BLOCK), kept_grad @ weight.double()),
        "weight_grad_strided_x": rel(block_sparse_weight_grad_(None, grad, strided_x, blocks, torch.float32,
                                                               block_hidden=BLOCK), kept_grad.t() @ x.double()),
        "keep_equal": float(torch.equal(blocks.keep, want_keep)),
        "kept_fraction": want_keep.double().mean().item(),
        "orders_ok": float(all(
            torch.equal(order[i, : int(count[i])].long(), keep[i].nonzero().flatten())
            for order, count, keep in ((blocks.cols_of_row_block, blocks.n_cols_of_row_block, want_keep),
                                       (blocks.rows_of_col_block, blocks.n_rows_of_col_block, want_keep.t()))
            for i in range(keep.shape[0]))),
        "input_grad": rel(block_sparse_input_grad(grad, weight, blocks, torch.float32, block_hidden=BLOCK),
                          kept_grad @ weight.double()),
        "weight_grad_first": rel(first, kept_grad.t() @ x.double()),
        "weight_grad_accumulated": rel(acc, 0.5 * acc_before.double() + kept_grad.t() @ x.double()),
        # a column block no row block keeps is left exactly as it was (no read-modify-write)
        "untouched_rows_equal": float(torch.equal(unscaled[dropped_cols], acc_before[dropped_cols])),
        "n_dropped_cols": int(dropped_cols.sum()),
        # the dense fallback: None just above the kept fraction, the blocks at it
        "dense_above_just_below": float(kept_blocks(grad, coef, eps, BLOCK, BLOCK,
                                                    dense_above=want_keep.double().mean().item() - 1e-9) is None),
        "dense_above_at_fraction_keeps": float(torch.equal(kept_blocks(
            grad, coef, eps, BLOCK, BLOCK, dense_above=want_keep.double().mean().item()).keep, want_keep)),
    }


# the whole loss through TritonLogitOps with the filter on and every block kept (threshold 0, dense fallback off):
# exact; pair chunks, multi-pair token mode, one pair's deferred chosen row (accumulator scaled by the first
# rejected product) -- (name, run length in tokens, pairs, dtype, NLL term), as test_triton_interpret's LOSS_CASES
LOSS_CASES = [("pair-chunks-fp16-filter-keeps-all", 11, 4, "float16", True),
              ("token-mode-fp16-filter-keeps-all", 4, 2, "float16", True),
              ("token-mode-one-pair-fp16-filter-keeps-all", 4, 1, "float16", True)]


def dropping_loss_case(trainable="xwb", *, seed):
    """The whole loss with the filter dropping blocks: a bias of -40 on every column from the first column block on
    (softmax there ~1e-17, far below eps) and targets inside the first block, so those column blocks are dropped and
    the first is kept. ``trainable``: the inputs that require grad, of "xwb". Max error of any output relative to
    its largest float64 value, and the kept fraction of each pass (recorded from ``kept_blocks``)."""
    from agent_code.liger_kernel.chunked_loss import triton_block_sparse
    from tests.chunked_loss.test_triton_interpret import force_triton_ops, output_errors
    from tests.helpers import forward_backward, make_inputs, ours, truth

    flp = force_triton_ops()
    flp.GRADIENT_FILTER_EPS = 1e-3
    flp.LOGITS_BUDGET_BYTES = 4 * 11 * 300 * 2  # two pairs per chunk (the earlier cases set token runs)
    triton_block_sparse.DENSE_ABOVE_KEPT_FRACTION = 1.0
    kept, find_kept = [], triton_block_sparse.kept_blocks

    def recording_kept_blocks(*args, **kwargs):
        blocks = find_kept(*args, **kwargs)
        kept.append(blocks.keep.double().mean().item())
        return blocks

    first_block = triton_block_sparse.BLOCK_COLS
    x, w, target, b = make_inputs(3, 11, 8, 2 * first_block + 44, torch.float16, seed=seed)
    with torch.no_grad():
        b[first_block:] = -40.0
    for name, t in zip("xwb", (x, w, b)):
        t.requires_grad_(name in trainable)
    target = torch.where(target >= 0, target % first_block, target)
    upstream = torch.tensor(0.75)
    triton_block_sparse.kept_blocks = recording_kept_blocks
    try:
        got = forward_backward(ours, x, w, target, b, upstream, compute_nll_loss=True)
    finally:
        triton_block_sparse.kept_blocks = find_kept
    want = forward_backward(truth, x, w, target, b, upstream, compute_nll_loss=True)
    return {**output_errors(got, want), "kept": kept}


def run_all_cases():
    from tests.chunked_loss.test_triton_interpret import loss_case

    report = {name: case(*args, seed=i) for i, (name, *args) in enumerate(CASES)}
    report.update({name: loss_case(*args, dict(gradient_filter_eps=0.0), seed=20 + i)
                   for i, (name, *args) in enumerate(LOSS_CASES)})
    report["filter-drops-blocks"] = dropping_loss_case(seed=30)
    # weight frozen, input without grad: only the bias gradient, which the filter never touches
    report["filter-drops-blocks-bias-only"] = dropping_loss_case("b", seed=31)
    return report


@pytest.fixture(scope="module")
def interpreted():
    return interpreter_report("tests.chunked_loss.test_block_sparse_interpret")


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_block_sparse_products_match_float64_on_the_kept_blocks(interpreted, name):
    report = interpreted[name]
    assert report["keep_equal"] == 1.0 and report["orders_ok"] == 1.0, report
    tol = 1e-6 if name.startswith("fp32") else 2e-3
    for key in ("input_grad", "weight_grad_first", "weight_grad_accumulated", "input_grad_strided_weight",
                "weight_grad_strided_x"):
        assert report[key] < tol, (key, report)
    assert report["untouched_rows_equal"] == 1.0, report
    assert report["dense_above_just_below"] == 1.0 and report["dense_above_at_fraction_keeps"] == 1.0, report
    if name == "fp32-keep-all":
        assert report["kept_fraction"] == 1.0 and report["n_dropped_cols"] == 0
    else:  # the cases drop some blocks, whole column blocks among them
        assert 0.1 < report["kept_fraction"] < 1.0 and report["n_dropped_cols"] > 0, report


@pytest.mark.parametrize("name", [c[0] for c in LOSS_CASES])
def test_the_loss_through_the_block_sparse_products_matches_float64(interpreted, name):
    """As test_triton_interpret's fp16 loss cases: a few fp16 roundings."""
    assert interpreted[name]["max_rel_err"] < 2e-2, interpreted[name]


def test_the_loss_with_dropped_blocks_matches_float64(interpreted):
    """Two of three column blocks dropped in every pass (their softmax ~1e-17): still float64's numbers."""
    report = interpreted["filter-drops-blocks"]
    assert report["kept"] and all(abs(k - 1 / 3) < 1e-9 for k in report["kept"]), report
    assert report["max_rel_err"] < 2e-2, report


def test_a_bias_only_backward_computes_no_keep_mask(interpreted):
    """Weight frozen and input without grad: the bias gradient is the dense ``G``'s column sum, so no pass computes
    the filter's keep mask (its host read included), and the outputs are float64's."""
    report = interpreted["filter-drops-blocks-bias-only"]
    assert report["kept"] == [], report
    assert report["max_rel_err"] < 2e-2, report


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_all_cases()))
