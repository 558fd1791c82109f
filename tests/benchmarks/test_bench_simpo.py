"""benchmarks/bench_simpo.py and benchmarks/simpo_baselines.py on the CPU: the rows and targets, the honest floor's
gradient, SimPO on CCE's per-token losses, the turns loop, one whole row and one whole --smoke run (a fake
``linear_cross_entropy`` stands in for Cut Cross-Entropy), the profile-to-breakdown reduction, the dry-run plan,
the markdown and plot writers."""
import ast
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from agent_code.liger_kernel.chunked_loss.reference import reference_simpo
from benchmarks import bench_simpo, simpo_baselines
from benchmarks.bench_simpo import KernelSpan, classify_kernel, time_breakdown, union_length
from tests.helpers import make_inputs, relative_error

OURS = ("_logit_statistics_kernel", "_logit_gradient_kernel")


def exact_linear_cross_entropy(calls=None):
    """A stand-in for ``cut_cross_entropy.linear_cross_entropy`` (same signature): exact per-token cross-entropy
    from full logits (0 at ignored tokens, float32 at least, as CCE returns), recording each call's options."""
    def linear_cross_entropy(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False,
                             filter_eps="high", impl="cce"):
        if calls is not None:
            calls.append(dict(reduction=reduction, filter_eps=filter_eps, softcap=softcap, ignore_index=ignore_index,
                              shift=shift))
        dtype = torch.promote_types(e.dtype, torch.float32)
        logits = e.to(dtype) @ c.to(dtype).T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        losses = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                                 reduction="none")
        assert reduction == "none", "the SimPO wrapper needs per-token losses"
        return losses.view(targets.shape)

    return linear_cross_entropy


def test_rows_and_targets():
    """(pairs, T, H, V, softcap, frozen, time target, memory target) of every row; NLL term on all but the last two.
    Time targets: 1.05x the floor on the 8-pair rows, 1.10x on the others."""
    rows = [(c.name, c.pairs, c.seq_len, c.hidden, c.vocab, c.softcap, c.frozen_weight, c.target_ratio, c.target_gib)
            for c in bench_simpo.CONFIGS]
    assert [c.nll for c in bench_simpo.CONFIGS] == [True] * 10 + [False] * 2
    assert rows == [
        ("2x512", 2, 512, 4096, 128256, None, False, 1.10, 3.5),
        ("4x1024", 4, 1024, 4096, 128256, None, False, 1.10, 3.5),
        ("8x1024", 8, 1024, 4096, 128256, None, False, 1.05, 3.5),
        ("1x8192", 1, 8192, 4096, 128256, None, False, 1.10, 4.0),
        ("1x32768", 1, 32768, 4096, 128256, None, False, 1.10, 4.0),
        ("8x1024 frozen W", 8, 1024, 4096, 128256, None, True, 1.05, 1.5),
        ("4x1024 H8192", 4, 1024, 8192, 128256, None, False, 1.10, 6.5),
        ("4x1024 Qwen2.5-7B", 4, 1024, 3584, 152064, None, False, 1.10, 3.7),
        ("4x1024 Gemma-2-9B softcap", 4, 1024, 3584, 256000, 30.0, False, 1.10, 5.7),
        ("4x1024 Llama-3.2-1B", 4, 1024, 2048, 128256, None, False, 1.10, 2.5),
        ("1x8192 no NLL", 1, 8192, 4096, 128256, None, False, 1.10, 4.0),
        ("1x32768 no NLL", 1, 32768, 4096, 128256, None, False, 1.10, 4.0),
    ]
    assert bench_simpo.CONFIGS[5].floor_flop == 2 * 2 * 16384 * 4096 * 128256  # frozen weight: two GEMMs


# ---------------------------------------------------------------------------------------------------------------
# the honest floor
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("softcap", [None, 1.5])
def test_floor_gradient_is_the_real_logits_gradient(softcap):
    """G = (softmax − onehot)/N (times the softcap's derivative) is autograd's gradient of the mean cross-entropy
    with respect to the raw logits, ignored rows zero, also when computed a few rows at a time; and the floor's
    GEMMs produce X·Wᵀ, G·W and Gᵀ·X (that is dX and dW of that loss)."""
    x, w, target, _ = make_inputs(2, 7, 16, 40, torch.float64, bias=False, seed=3)
    x2d, t1d = x.detach().reshape(-1, 16), target.reshape(-1)
    assert (t1d == -100).any()
    logits = (x2d @ w.detach().T).requires_grad_()
    capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    (expected,) = torch.autograd.grad(F.cross_entropy(capped, t1d, ignore_index=-100), logits)
    grad = simpo_baselines.logits_gradient(x2d, w.detach(), target, softcap=softcap, max_chunk_elements=3 * 40)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    assert (grad[t1d == -100] == 0).all()

    floor = simpo_baselines.FloorGemms(w, x2d.shape[0], frozen_weight=False, softcap=softcap)
    floor.prepare(x, target)
    floor(x)
    x.grad = w.grad = None
    (F.cross_entropy((lambda z: z if softcap is None else softcap * torch.tanh(z / softcap))(x.reshape(-1, 16) @ w.T),
                     t1d, ignore_index=-100)).backward()
    torch.testing.assert_close(floor.logits, x2d @ w.detach().T)
    torch.testing.assert_close(floor.grad_input, x.grad.reshape(-1, 16))
    torch.testing.assert_close(floor.grad_weight, w.grad)
    frozen = simpo_baselines.FloorGemms(w, x2d.shape[0], frozen_weight=True)
    frozen.prepare(x, target)
    frozen(x)
    assert frozen.grad_weight is None


def test_floor_gradient_in_bf16_is_the_rounded_gradient():
    """The timed operand is bf16, as the GEMMs of a bf16 model take it: the float64 gradient, rounded."""
    x, w, target, _ = make_inputs(2, 9, 32, 300, torch.float64, bias=False, seed=5)
    x, w = x.detach().to(torch.bfloat16), w.detach().to(torch.bfloat16)
    grad = simpo_baselines.logits_gradient(x.reshape(-1, 32), w, target)
    assert grad.dtype == torch.bfloat16
    exact = simpo_baselines.logits_gradient(x.reshape(-1, 32).double(), w.double(), target)
    assert relative_error(grad, exact) < 1e-2


# ---------------------------------------------------------------------------------------------------------------
# SimPO on Cut Cross-Entropy
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("softcap, compute_nll_loss", [(None, True), (3.0, True), (None, False)])
def test_cce_simpo_equals_plain_simpo_from_full_logits(softcap, compute_nll_loss):
    """Given exact per-token losses, the CCE wrapper's SimPO (length-normalised log-probs, beta, gamma, label
    smoothing, the chosen NLL times alpha, a pair with an empty row adding nothing) is the float64 reference's,
    loss, log-probs, NLL and both gradients; it asks for reduction="none" with the given filter_eps and softcap."""
    options = dict(beta=0.7, gamma=0.3, label_smoothing=0.2, alpha=0.6)
    x, w, target, _ = make_inputs(3, 8, 12, 50, torch.float64, bias=False, seed=7)
    target[1] = -100  # chosen row of pair 1 holds no token
    calls = []
    loss, (chosen, rejected, nll) = simpo_baselines.cce_simpo(
        exact_linear_cross_entropy(calls), x, w, target, compute_nll_loss=compute_nll_loss, softcap=softcap,
        filter_eps=None, **options)
    loss.backward()
    got_grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref_loss, ref_aux = reference_simpo(x, w, target, softcap=softcap, compute_nll_loss=compute_nll_loss,
                                        **options)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(chosen, ref_aux[0])
    torch.testing.assert_close(rejected, ref_aux[1])
    if compute_nll_loss:
        torch.testing.assert_close(nll, ref_aux[4])
    torch.testing.assert_close(got_grads[0], x.grad)
    torch.testing.assert_close(got_grads[1], w.grad)
    assert calls == [dict(reduction="none", filter_eps=None, softcap=softcap, ignore_index=-100, shift=False)]


def test_cce_simpo_on_the_installed_package():
    """With cut_cross_entropy installed: the wrapper's call fits its signature and, through the package's
    torch.compile implementation (which runs on the CPU), gives the float64 reference's loss and gradients."""
    lce, version = simpo_baselines.load_linear_cross_entropy()
    if lce is None:
        pytest.skip(f"cut_cross_entropy {version}")
    x, w, target, _ = make_inputs(2, 6, 16, 64, torch.float32, bias=False, seed=11)
    loss, _ = simpo_baselines.cce_simpo(lambda *a, **k: lce(*a, **k, impl="torch_compile"), x, w, target)
    loss.backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref_loss, _ = reference_simpo(x, w, target, compute_nll_loss=True, compute_dtype=torch.float64)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, (x.grad, w.grad)):
        assert relative_error(got, expected) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# the turns loop, one row, one whole run
# ---------------------------------------------------------------------------------------------------------------

def test_time_in_turns_alternates_and_never_times_a_warmup_input():
    """Turn i calls every run on input i, in order, each after its reset; the timed turns are the last ``reps``;
    a run that runs out of memory, or a fragile (peer's) run that raises, is dropped and the others go on; any
    other failure ends the loop."""
    log = []

    def run(name):
        def fn(i):
            log.append(("call", name, i))
            if name == "big" and i == 3:
                raise torch.OutOfMemoryError("fake")
            if name == "peer" and i == 1:
                raise RuntimeError("no kernel for this card\nmore")
        return fn

    runs = {name: run(name) for name in ("floor", "ours", "big", "peer")}
    times, failed, first = bench_simpo.time_in_turns(runs, lambda name, i: log.append(("reset", name, i)),
                                              bench_simpo.Clock("cpu"), warmup=2, reps=4, fragile=["peer"])
    calls = [entry for entry in log if entry[0] == "call"]
    assert [(n, i) for _, n, i in calls[:8]] == [("floor", 0), ("ours", 0), ("big", 0), ("peer", 0), ("floor", 1),
                                                 ("ours", 1), ("big", 1), ("peer", 1)]
    assert all(log[k - 1] == ("reset",) + entry[1:] for k, entry in enumerate(log) if entry[0] == "call")
    assert [i for _, n, i in calls if n == "ours"] == list(range(6))
    assert [i for _, n, i in calls if n == "big"] == [0, 1, 2, 3]
    assert [i for _, n, i in calls if n == "peer"] == [0, 1]
    assert failed == {"big": "OOM", "peer": "RuntimeError: no kernel for this card"}
    assert set(times) == {"floor", "ours"}
    assert len(times["floor"]) == len(times["ours"]) == 4 and all(t >= 0 for t in times["ours"])
    assert set(first) == {"floor", "ours"} and len(first["floor"]) == len(first["ours"]) == 2  # apart, not dropped
    with pytest.raises(RuntimeError, match="no kernel"):
        bench_simpo.time_in_turns({"peer": run("peer")}, lambda *_: None, bench_simpo.Clock("cpu"), 2, 1)


def test_accuracy_check_records_a_failing_peer(monkeypatch):
    """Ours and plain bf16 near the float64 truth at a tiny shape; a CCE that raises is recorded, not fatal; ours
    raising ends the check."""
    def broken(*args, **kwargs):
        raise RuntimeError("PTX too new")

    errors = bench_simpo.accuracy_check(device="cpu", linear_cross_entropy=broken, **bench_simpo.SMOKE_ACCURACY)
    assert errors["cce"] == errors["cce_exact"] == {"error": "RuntimeError: PTX too new"}
    assert set(errors["ours"]) == set(bench_simpo.ACCURACY_QUANTITIES) and max(errors["ours"].values()) < 1e-2
    monkeypatch.setattr(bench_simpo.LigerFusedLinearSimPOFunction, "apply", broken)
    with pytest.raises(RuntimeError, match="PTX too new"):
        bench_simpo.accuracy_check(device="cpu", **bench_simpo.SMOKE_ACCURACY)


def test_bench_config_runs_a_row_on_the_cpu(monkeypatch):
    """A whole row at a tiny shape: floor, ours and both CCE variants timed in the same turns on distinct inputs
    (the floor prepared from each turn's own input), their per-turn ratios, no memory figure on the CPU."""
    cfg = bench_simpo.smoke_config(bench_simpo.CONFIGS[2])
    prepared = []
    real_prepare = simpo_baselines.FloorGemms.prepare
    monkeypatch.setattr(simpo_baselines.FloorGemms, "prepare",
                        lambda self, x, target: (prepared.append(x.data_ptr()), real_prepare(self, x, target)))
    calls = []
    row = bench_simpo.bench_config(cfg, ["ours", "cce", "cce_exact"], reps=3, device="cpu", warmup=2,
                                   linear_cross_entropy=exact_linear_cross_entropy(calls))
    assert len(set(prepared)) == len(prepared) == 5  # one distinct input per turn
    assert [c["filter_eps"] for c in calls[:2]] == ["high", None] and len(calls) == 2 * (5 + 1)
    for name in ("floor", "ours", "cce", "cce_exact"):
        assert len(row[name]["ms_all"]) == 3 and row[name]["ms"] == statistics.median(row[name]["ms_all"])
    for name in ("ours", "cce", "cce_exact"):
        expected = statistics.median(a / b for a, b in zip(row[name]["ms_all"], row["floor"]["ms_all"]))
        assert row[name]["ratio_to_floor"] == pytest.approx(expected) and row[name]["peak_gib"] is None
    assert row["tokens"] == cfg.tokens and row["config"]["name"] == "8x1024"


def test_smoke_run_writes_the_table_plot_and_json(tmp_path, monkeypatch, capsys):
    fake = exact_linear_cross_entropy()
    monkeypatch.setattr(bench_simpo, "load_linear_cross_entropy", lambda: (fake, "fake 0"))
    rows = bench_simpo.main(["--smoke", "--rows", "8x1024, 4x1024 Gemma-2-9B softcap", "--reps", "2",
                             "--out", str(tmp_path / "measurements"), "--no-breakdown-profile"])
    assert [row["config"]["name"] for row in rows] == ["8x1024", "4x1024 Gemma-2-9B softcap"]
    # named for the card it ran on: the CPU here, the GPU where there is one (--smoke runs there too)
    stem = bench_simpo.output_stem(bench_simpo.card_name("cuda" if torch.cuda.is_available() else "cpu"))
    files = sorted(p.name for p in (tmp_path / "measurements").iterdir())
    assert files == [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
    saved = json.loads((tmp_path / "measurements" / f"{stem}.json").read_text())
    assert saved["env"]["cut_cross_entropy"] == "fake 0" and saved["settings"]["reps"] == 2
    assert set(saved["accuracy"]) == {"ours", "plain_bf16", "cce", "cce_exact"}
    assert saved["accuracy"]["cce_exact"]["grad_weight"] < 2e-2 and saved["accuracy"]["ours"]["loss"] < 1e-2
    assert all(len(row[name]["ms_all"]) == 2 for row in saved["rows"] for name in ("floor", "ours", "cce"))
    assert "| 4x1024 Gemma-2-9B softcap | 64, 320, softcap 30 |" in capsys.readouterr().out
    assert "**Smoke run (`--smoke`)" in (tmp_path / "measurements" / f"{stem}.md").read_text()


def test_output_stem_names_the_card():
    assert bench_simpo.output_stem("NVIDIA H200") == "benchmarks_h200"
    assert bench_simpo.output_stem("NVIDIA H100 80GB HBM3") == "benchmarks_h100"
    assert bench_simpo.output_stem("cpu") == "benchmarks_cpu"


# ---------------------------------------------------------------------------------------------------------------
# the profile breakdown
# ---------------------------------------------------------------------------------------------------------------

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


def test_profile_breakdown_windows_on_the_host():
    """The profiler plumbing: one labelled window per iteration, its wall time; no kernels on a CPU run."""
    import time

    calls = []
    result = bench_simpo.profile_breakdown(lambda: (calls.append(1), time.sleep(0.002)), lambda: None, 3, cuda=False)
    assert len(calls) == 3 and result["iterations"] == 3
    assert 2.0 <= result["wall_ms"] < 200 and result["host_gap_ms"] == pytest.approx(result["wall_ms"])
    assert result["kernel_union_ms"] == result["gemm_ms"] == result["triton_ms"] == result["other_ms"] == 0


# ---------------------------------------------------------------------------------------------------------------
# the plan and the writers
# ---------------------------------------------------------------------------------------------------------------

def test_dry_run_lists_every_row_and_fits_the_time_budget(capsys):
    lines = bench_simpo.main(["--dry-run"])
    assert [line.split("  ")[0] for line in lines] == [c.name for c in bench_simpo.CONFIGS]
    out = capsys.readouterr().out
    assert "softcap 30" in out and "frozen W" in out and "<= 1.05x floor, <= 3.5 GiB" in out
    assert "estimated total" in out and "['ours', 'cce', 'cce_exact']" in out
    # the budget: the default run (floor, ours, CCE filtered and exact, every row) within ~6 minutes
    _, total = bench_simpo.plan(bench_simpo.CONFIGS, bench_simpo.DEFAULT_VARIANTS, reps=7, profile_iterations=3)
    assert total < 360
    lines = bench_simpo.main(["--dry-run", "--rows", "8x1024,4x1024 Qwen2.5-7B", "--variants", "ours"])
    assert [line.split("  ")[0] for line in lines] == ["8x1024", "4x1024 Qwen2.5-7B"]
    with pytest.raises(SystemExit, match="unknown"):
        bench_simpo.main(["--dry-run", "--rows", "3x512"])



@pytest.mark.parametrize("boost", [["20", "10"], ["-5", "-1"], ["nan", "10"], ["10", "inf"]])
def test_a_bad_target_boost_is_refused_before_any_run(capsys, boost):
    """LOW > HIGH, negative (a target pushed below the rest is not a peaked softmax) or not finite (NaN inputs):
    refused by the parser, naming the option, even with --dry-run."""
    with pytest.raises(SystemExit):
        bench_simpo.main(["--dry-run", "--target-boost", *boost])
    assert "--target-boost" in capsys.readouterr().err


@pytest.mark.parametrize("std", ["0", "-1", "nan", "inf"])
def test_a_bad_logit_std_is_refused_before_any_run(capsys, std):
    with pytest.raises(SystemExit):
        bench_simpo.main(["--dry-run", "--logit-std", std])
    assert "--logit-std" in capsys.readouterr().err


def _timed(times, peak=None, **extra):
    return dict(ms=statistics.median(times), ms_all=list(times), peak_gib=peak, **extra)


def _rows():
    by_name = {c.name: c for c in bench_simpo.CONFIGS}
    breakdown = dict(gemm_ms=9.5, triton_ms=1.25, other_ms=0.125, host_gap_ms=0.5)

    def row(name, **entries):
        return {"config": bench_simpo.asdict(by_name[name]), "tokens": by_name[name].tokens, **entries}

    return [
        # per-turn ratios 1.025, 1.075, 1.024 -> median 1.025 (the ratio of the medians would be 42/40)
        row("4x1024", floor=_timed([40.0, 40.0, 41.0]), ours=_timed([41.0, 43.0, 42.0], 3.0, breakdown=breakdown,
                                                                ms_first_turns=[250.0, 43.5]),
            cce=_timed([60.0, 61.0, 62.0], 0.5), cce_exact=_timed([70.0, 70.0, 70.0], 0.6)),
        row("4x1024 Gemma-2-9B softcap", floor=_timed([70.0]), ours=_timed([80.0], 6.0), cce=_timed([75.0], 1.0)),
        row("1x32768", floor=_timed([300.0]), ours={"ms": None, "peak_gib": None, "oom": True},
            cce={"ms": None, "peak_gib": None, "error": "CompilationError: at 1:2"}),
    ]


def test_markdown_rows_verdicts_and_columns(tmp_path):
    env = dict(card="Test GPU", torch="t", cuda="c", triton="tr", commit="abc1234", cut_cross_entropy="25.1.1")
    accuracy = {name: {key: 1e-3 * (k + 1) for k, key in enumerate(bench_simpo.ACCURACY_QUANTITIES)}
                for name in ("ours", "plain_bf16", "cce", "cce_exact")}
    path = tmp_path / "benchmarks_test.md"
    bench_simpo.write_markdown(str(path), env, _rows(), accuracy, 1, dict(warmup=2, reps=3))
    text = path.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| config"))
    assert header == ("| config (pairs×T) | head (H, V) | tokens | floor ms | ours ms | ours 1st call ms | ours/floor | CCE ms | "
                      "CCE exact ms | ours/CCE | ours GiB | CCE GiB | CCE exact GiB | target (×floor, GiB) | time met "
                      "| memory met | beats CCE | GEMM ms | our kernels ms | other ms | host gap ms |")
    lines = [line for line in text.splitlines() if line.startswith(("| 4x1024", "| 1x32768"))]
    assert lines[0] == ("| 4x1024 | 4096, 128256 | 8192 | 40.0 | 42.0 | 250.0 | 1.025 | 61.0 | 70.0 | 0.683 | 3.00 | 0.50 | "
                        "0.60 | ≤1.1×, ≤3.5 | yes | yes | yes | 9.50 | 1.25 | 0.12 | 0.50 |")
    assert lines[1] == ("| 4x1024 Gemma-2-9B softcap | 3584, 256000, softcap 30 | 8192 | 70.0 | 80.0 |  | 1.143 | 75.0 | "
                        "not run | 1.067 | 6.00 | 1.00 | not run | ≤1.1×, ≤5.7 | no | no | no |  |  |  |  |")
    assert lines[2] == ("| 1x32768 | 4096, 128256 | 65536 | 300.0 | OOM |  |  | failed | not run |  | OOM | failed | "
                        "not run | ≤1.1×, ≤4.0 | — | — | — |  |  |  |  |")
    assert "*failed*: 1x32768 cce: `CompilationError: at 1:2`" in text
    assert "| quantity | ours | plain PyTorch bf16 | CCE (filtered) | CCE exact |" in text
    assert "| grad_weight | 6.00e-03 | 6.00e-03 | 6.00e-03 | 6.00e-03 |" in text
    assert "commit `abc1234`" in text and "(benchmarks_test.png)" in text and "training_memory.md" in text
    assert "naive ms" not in text and "Smoke run" not in text  # baseline columns only when a row has them


def test_plot_writes_a_png_of_the_ratios_and_memory(tmp_path):
    env = dict(card="Test GPU", commit="abc1234")
    path = tmp_path / "plot.png"
    labels, ratios, gib = bench_simpo.write_plot(str(path), env, _rows())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels == ["4x1024", "4x1024 Gemma-2-9B softcap", "1x32768"] and list(ratios) == ["ours", "cce",
                                                                                             "cce_exact"]
    assert ratios["ours"][:2] == [pytest.approx(1.025), pytest.approx(80 / 70)] and math.isnan(ratios["ours"][2])
    assert ratios["cce"][1] == pytest.approx(75 / 70) and math.isnan(ratios["cce_exact"][1])
    assert gib["cce"][:2] == [0.5, 1.0] and math.isnan(gib["ours"][2])


def test_benchmarks_import_nothing_from_tests():
    root = Path(bench_simpo.__file__).parent
    for name in ("bench_simpo.py", "simpo_baselines.py", "bench_step.py", "bench_training_memory.py"):
        tree = ast.parse((root / name).read_text())
        modules = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [m for m in modules if m == "tests" or m.startswith("tests.")], name


def test_a_target_boost_makes_the_softmax_peaked_at_the_targets():
    """--target-boost: every position's boosted logit stands ``b`` in [low, high) above the rest (the ignored
    positions' too, at a random id), so the target's probability dominates; without it the targets are not
    special."""
    cfg = bench_simpo.Config("t", 2, 40, hidden=512, vocab=2000)

    def target_log_probs(target_boost):
        weight, [(x, target)] = bench_simpo.make_input_sets(cfg, 1, device="cpu", dtype=torch.float32, seed=3,
                                                            target_boost=target_boost)
        logits = x.detach() @ weight.detach().T
        valid = target != bench_simpo.IGNORE_INDEX
        logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[valid]
        return logits, logp

    logits, peaked = target_log_probs((10.0, 20.0))
    _, diffuse = target_log_probs(None)
    assert diffuse.mean() < -math.log(cfg.vocab) + 1.0  # uniform targets of random logits: about -log V - 2
    assert peaked.mean() > -1.0 and peaked.min() > -6.0  # boosted by >= 10 over logits of std 2, V 2000
    # every position (ignored ones included) has one dominant logit: the rest's probabilities stay tiny
    top2 = logits.softmax(-1).topk(2, dim=-1).values
    assert (top2[..., 0] > 0.4).float().mean() > 0.9 and top2[..., 1].mean() < 0.05
