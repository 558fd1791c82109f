"""benchmarks/bench_simpo.py's logic on the CPU: its rows and targets, the profile-to-breakdown reduction, the
dry-run plan, and the markdown writer."""
import ast
from pathlib import Path

import pytest

from benchmarks import bench_simpo
from benchmarks.bench_simpo import KernelSpan, classify_kernel, time_breakdown, union_length

OURS = ("_logit_statistics_kernel", "_logit_gradient_kernel")


def test_rows_and_targets():
    """(pairs, T, H, V, softcap, frozen, time target, memory target) of every row; NLL term on all but the last two."""
    rows = [(c.name, c.pairs, c.seq_len, c.hidden, c.vocab, c.softcap, c.frozen_weight, c.target_ratio, c.target_gib)
            for c in bench_simpo.CONFIGS]
    assert [c.nll for c in bench_simpo.CONFIGS] == [True] * 10 + [False] * 2
    assert rows == [
        ("2x512", 2, 512, 4096, 128256, None, False, 1.05, 3.5),
        ("4x1024", 4, 1024, 4096, 128256, None, False, 1.05, 3.5),
        ("8x1024", 8, 1024, 4096, 128256, None, False, 1.05, 3.5),
        ("1x8192", 1, 8192, 4096, 128256, None, False, 1.10, 4.0),
        ("1x32768", 1, 32768, 4096, 128256, None, False, 1.10, 4.0),
        ("8x1024 frozen W", 8, 1024, 4096, 128256, None, True, 1.05, 1.5),
        ("4x1024 H8192", 4, 1024, 8192, 128256, None, False, 1.05, 6.5),
        ("4x1024 Qwen2.5-7B", 4, 1024, 3584, 152064, None, False, 1.05, 3.7),
        ("4x1024 Gemma-2-9B softcap", 4, 1024, 3584, 256000, 30.0, False, 1.10, 5.7),
        ("4x1024 Llama-3.2-1B", 4, 1024, 2048, 128256, None, False, 1.10, 2.5),
        ("1x8192 no NLL", 1, 8192, 4096, 128256, None, False, 1.10, 4.0),
        ("1x32768 no NLL", 1, 32768, 4096, 128256, None, False, 1.10, 4.0),
    ]
    assert bench_simpo.CONFIGS[5].floor_flop == 2 * 2 * 16384 * 4096 * 128256  # frozen weight: two GEMMs


@pytest.mark.parametrize("name, kind", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize1x1x1", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)", "gemm"),
    ("_logit_statistics_kernel", "triton"),
    ("_logit_gradient_kernel_0d1d2d3de", "triton"),  # older Triton's specialisation suffix
    ("_logit_statistics_kernel2", "other"),  # another kernel that merely starts with our name
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ("Memset (Device)", "other"),
])
def test_classify_kernel(name, kind):
    assert classify_kernel(name, OURS) == kind


def test_union_length_counts_overlaps_once():
    assert union_length([(5, 7), (0, 2), (1, 3), (6, 6.5), (10, 11)]) == pytest.approx(3 + 2 + 1)
    assert union_length([]) == 0


def test_time_breakdown_on_a_synthetic_profile():
    """Two iterations; a kernel before the first window, one straddling a window's start, two overlapping."""
    windows = [(1000.0, 3000.0), (5000.0, 6000.0)]  # 2.0 ms and 1.0 ms of wall time
    kernels = [
        KernelSpan("nvjet_warmup_gemm", 0.0, 900.0),  # outside every window: ignored
        KernelSpan("sm90_xmma_gemm_bf16", 900.0, 1500.0),  # clipped to 1000..1500
        KernelSpan("_logit_statistics_kernel", 1500.0, 1800.0),
        KernelSpan("Memcpy DtoH (Device -> Pinned)", 1700.0, 1900.0),  # overlaps the Triton kernel by 100
        KernelSpan("nvjet_tst_gemm", 2000.0, 2900.0),
        KernelSpan("nvjet_tst_gemm", 5100.0, 5600.0),
        KernelSpan("_logit_gradient_kernel", 5600.0, 5800.0),
        KernelSpan("elementwise_kernel", 5800.0, 5850.0),
    ]
    result = time_breakdown(kernels, windows, OURS, top=1)
    assert result["iterations"] == 2 and result["kernels_per_iteration"] == 3.5
    assert result["wall_ms"] == pytest.approx(1.5)
    assert result["gemm_ms"] == pytest.approx((500 + 900 + 500) / 2 / 1e3)
    assert result["triton_ms"] == pytest.approx((300 + 200) / 2 / 1e3)
    assert result["other_ms"] == pytest.approx((200 + 50) / 2 / 1e3)
    # union: window 1: 1000..1900 + 2000..2900 = 1800; window 2: 5100..5850 = 750
    assert result["kernel_union_ms"] == pytest.approx((1800 + 750) / 2 / 1e3)
    assert result["host_gap_ms"] == pytest.approx((200 + 250) / 2 / 1e3)
    assert result["other_top"] == [["Memcpy DtoH (Device -> Pinned)", pytest.approx(0.1)]]
    with pytest.raises(ValueError, match="windows must hold at least one"):
        time_breakdown(kernels, [], OURS)
    with pytest.raises(ValueError, match="ends before it starts"):
        time_breakdown(kernels, [(10.0, 5.0)], OURS)


def test_our_triton_kernel_names_are_found():
    pytest.importorskip("triton", reason="triton is not installed")
    names = bench_simpo.our_triton_kernel_names()
    assert {"_logit_statistics_kernel", "_logit_gradient_kernel"} <= set(names)


def test_dry_run_lists_every_row_and_fits_the_time_budget(capsys):
    lines = bench_simpo.main(["--dry-run", "--variants", "ours"])
    assert [line.split("  ")[0] for line in lines] == [c.name for c in bench_simpo.CONFIGS]
    out = capsys.readouterr().out
    assert "softcap 30" in out and "frozen W" in out and "<= 1.05x floor, <= 3.5 GiB" in out
    # the budgets: all rows with ours within ~3 min, with ours and naive within ~5 min (start-up left aside)
    _, ours_only = bench_simpo.plan(bench_simpo.CONFIGS, ["ours"], reps=7, profile_iterations=3)
    _, with_naive = bench_simpo.plan(bench_simpo.CONFIGS, ["ours", "naive"], reps=7, profile_iterations=3)
    assert ours_only < 150 and with_naive < 270
    with pytest.raises(SystemExit, match="unknown"):
        bench_simpo.main(["--dry-run", "--configs", "3x512"])


def _row(cfg, floor, ours=None, naive=None, floor_alone=None):
    row = {"config": bench_simpo.asdict(cfg), "tokens": cfg.tokens, "floor": {"ms": floor, "ms_alone": floor_alone}}
    if ours is not None:
        row["ours"] = ours
    if naive is not None:
        row["naive"] = naive
    return row


def test_markdown_rows_verdicts_and_breakdown_columns(tmp_path):
    by_name = {c.name: c for c in bench_simpo.CONFIGS}
    breakdown = dict(gemm_ms=9.5, triton_ms=1.25, other_ms=0.125, host_gap_ms=0.5)
    rows = [
        _row(by_name["4x1024"], 40.0, dict(ms=41.0, ms_alone=40.5, peak_gib=3.0, breakdown=breakdown),
             dict(ms=50.0, peak_gib=5.9), floor_alone=40.5 / 1.125),
        _row(by_name["4x1024 Gemma-2-9B softcap"], 70.0, dict(ms=80.0, ms_alone=79.0, peak_gib=6.0)),
        _row(by_name["1x32768"], 300.0, naive={"ms": None, "peak_gib": None, "oom": True}),
    ]
    env = dict(card="Test GPU", torch="t", cuda="c", triton="tr", commit="abc1234")
    path = tmp_path / "benchmarks.md"
    bench_simpo.write_markdown(str(path), env, rows, None, 1)
    text = path.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| config"))
    assert header.endswith("| met | GEMM ms | our kernels ms | other ms | host gap ms |")
    lines = [line for line in text.splitlines() if line.startswith("| 4x1024") or line.startswith("| 1x32768")]
    assert lines[0] == ("| 4x1024 | 4096, 128256 | 8192 | 40.0 | 41.0 | 1.025 | 40.5 | 1.125 | 50.0 | not run | 3.00 | 5.90 | "
                        "not run | ≤1.05×, ≤3.5 | yes | 9.50 | 1.25 | 0.12 | 0.50 |")
    assert lines[1].startswith("| 4x1024 Gemma-2-9B softcap | 3584, 256000, softcap 30 | 8192 | 70.0 | 80.0 | 1.143 | 79.0 |  |")
    assert "| ≤1.1×, ≤5.7 | time memory missed |  |  |  |  |" in lines[1]
    assert lines[2].startswith("| 1x32768 | 4096, 128256 | 65536 | 300.0 | not run |")
    assert "| OOM |" in lines[2] and lines[2].endswith("| — |  |  |  |  |")
    assert "commit `abc1234`" in text and "training_memory.md" in text


def test_benchmarks_import_nothing_from_tests():
    root = Path(bench_simpo.__file__).parent
    for name in ("bench_simpo.py", "bench_step.py", "bench_training_memory.py"):
        tree = ast.parse((root / name).read_text())
        modules = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [m for m in modules if m == "tests" or m.startswith("tests.")], name


def test_profile_breakdown_windows_on_the_host():
    """The profiler plumbing: one labelled window per iteration, its wall time; no kernels on a CPU run."""
    import time

    calls = []
    result = bench_simpo.profile_breakdown(lambda: (calls.append(1), time.sleep(0.002)), lambda: None, 3, cuda=False)
    assert len(calls) == 3 and result["iterations"] == 3
    assert 2.0 <= result["wall_ms"] < 200 and result["host_gap_ms"] == pytest.approx(result["wall_ms"])
    assert result["kernel_union_ms"] == result["gemm_ms"] == result["triton_ms"] == result["other_ms"] == 0
