"""benchmarks/fused_gemm_study.py's kernels on CPU tensors under ``TRITON_INTERPRET=1``, against float64: the logits
GEMM with its statistics epilogue and the dX/dW GEMMs that compute the softmax gradient from the logits they load.

The study's timings decide whether such kernels may replace cuBLAS in the loss; these checks make sure what it
timed computes the loss's numbers. One fresh interpreter process runs the cases (as test_triton_interpret.py's) at
odd token counts (40: a ragged last row tile), a vocabulary that is not a multiple of the column tile and float32
/ float16 (the interpreter mishandles bfloat16 ``tl.dot`` operands); TMA needs 16-byte row strides, so the widths
are multiples of 8. The kernels' persistent loops run under triton's interpreter from 3.9 on (3.6's cannot loop over a
run-time bound: skipped there).
"""
import json

import pytest
import torch

from tests.helpers import interpreter_report, triton_interpreter_marks

pytestmark = [*triton_interpreter_marks(), pytest.mark.subprocess]
TILES = (16, 32, 16, 2, 4)  # rows, columns, inner per tile, stages, warps
CASES = [("fp32", "float32", 40, 24, 296), ("fp16", "float16", 40, 16, 200)]  # (name, dtype, tokens, H, V)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def case(dtype_name: str, tokens: int, hidden: int, vocab: int, *, seed: int) -> dict:
    from benchmarks.fused_gemm_study import gradient_product, logits_with_statistics

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.5).to(dtype)
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    coef = torch.randn(tokens, generator=gen) / tokens
    logits, lse, target_logit, logit_sum = logits_with_statistics(x, weight, target, TILES)
    z = logits.double()  # the statistics are those of the rounded logits the kernel wrote
    grad = coef.double()[:, None] * (torch.softmax(z, -1) - torch.nn.functional.one_hot(target, vocab))
    return {
        "logits": rel(logits, x.double() @ weight.double().t()),
        "lse": rel(lse, torch.logsumexp(z, -1)),
        "target_logit": rel(target_logit, z.gather(1, target[:, None])[:, 0]),
        "logit_sum": rel(logit_sum, z.sum(-1)),
        "input_grad": rel(gradient_product(logits, weight, lse, target, coef, False, torch.float32, TILES),
                          grad @ weight.double()),
        "weight_grad": rel(gradient_product(logits, x, lse, target, coef, True, torch.float32, TILES),
                           grad.t() @ x.double()),
    }


@pytest.fixture(scope="module")
def interpreted():
    return interpreter_report("tests.benchmarks.test_fused_gemm_study")


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_study_kernels_compute_the_loss_numbers(interpreted, name):
    report = interpreted[name]
    # logits rounded once to the input dtype; the rest float32 from those logits; G rounded to the input dtype
    tol = {"fp32": 1e-6, "fp16": 2e-3}[name]
    assert report["logits"] < tol and report["lse"] < 1e-6, report
    assert report["target_logit"] < 1e-6 and report["logit_sum"] < 1e-5, report
    assert report["input_grad"] < tol and report["weight_grad"] < tol, report


def protocol_case() -> dict:
    """The study's timing protocol at a tiny shape on the CPU (float16, the study's own tiles): turns and warm-up
    counted apart, every variant timed each turn, the errors of its variants against the baseline."""
    from benchmarks.fused_gemm_study import study_shape

    return study_shape(40, 16, 200, turns=3, warmup=1, device="cpu", dtype=torch.float16)


def test_the_study_times_each_variant_once_per_turn_warm_up_apart(interpreted):
    report = interpreted["protocol"]
    variants = ["baseline", "epilogue_statistics", "fused"]
    assert list(report["median_ms"]) == variants and report["ratio_to_baseline"]["baseline"] == 1.0
    assert all(len(report["first_turns_ms"][name]) == 1 for name in variants), report
    # float16 logits and gradient, rounded once each: the variants compute the baseline's numbers
    for name in ("epilogue_statistics", "fused"):
        assert max(report["rel_err_lse_dx_dw_vs_baseline"][name]) < 5e-3, report


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_the_study_says_it_needs_a_gpu(tmp_path):
    from benchmarks import fused_gemm_study

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        fused_gemm_study.main(["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


if __name__ == "__main__":
    torch.set_num_threads(1)
    report = {name: case(*args, seed=i) for i, (name, *args) in enumerate(CASES)}
    report["protocol"] = protocol_case()
    print(json.dumps(report))
