"""benchmarks/bench_trl.py's logic on the CPU: its --smoke run, its run order and its OOM / time-budget skips."""
import json
import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from benchmarks import bench_trl  # noqa: E402


def test_smoke_run_measures_both_trainers_on_exact_token_counts(tmp_path):
    result = bench_trl.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "trl_memory.json").read_text())
    assert saved == json.loads(json.dumps(result))
    meta, rows = saved["meta"], saved["rows"]
    assert meta["pairs"] == 2 and meta["trl"] and meta["commit"]
    # run order: the first T for both trainers, then the next T
    assert [(row["trainer"], row["seq_len"]) for row in rows] == [
        ("CPOTrainer", 64), ("FusedCPOTrainer", 64), ("CPOTrainer", 128), ("FusedCPOTrainer", 128)]
    for row in rows:
        assert row["status"] == "ok" and not row["oom"]
        assert row["tokens"] == 2 * meta["pairs"] * row["seq_len"]  # counted on a collated batch
        assert row["steps"] == meta["steps"] == 2 and row["step_s"] > 0
        assert len(row["losses"]) == 2 and all(math.isfinite(loss) for loss in row["losses"])
        assert row["gradient_checkpointing"] is True
    # same model, same data, float32: the two trainers compute the same SimPO losses
    for seq_len in (64, 128):
        plain, fused = (row["losses"] for row in rows if row["seq_len"] == seq_len)
        assert fused == pytest.approx(plain, rel=1e-4)
    report = (tmp_path / "trl_memory.md").read_text()
    assert "| 64 | 256 | n/a |" in report and "| 128 | 512 | n/a |" in report
    assert "largest T that fits, FusedCPOTrainer: T=128" in report


def test_text_tokenises_to_exactly_t_tokens_or_the_run_stops(tmp_path, monkeypatch):
    """A dataset one word short of T must be refused before training, not measured at the wrong size."""
    make_dataset = bench_trl.make_dataset

    def one_word_short(words, n_rows, seq_len, seed=0):
        data = make_dataset(words, n_rows, seq_len, seed)
        return data.map(lambda row: {"prompt": row["prompt"].rsplit(" ", 1)[0]})

    monkeypatch.setattr(bench_trl, "make_dataset", one_word_short)
    with pytest.raises(RuntimeError, match="expected 64 tokens with a 16-token prompt"):
        bench_trl.main(["--smoke", "--seq-lens", "64", "--out", str(tmp_path)])


def test_order_oom_and_budget_skips(monkeypatch):
    """1024 and 4096 first for both; an OOM skips longer T of that trainer only; no config starts past the budget."""
    args = bench_trl.parse_arguments(["--budget-s", "80"])
    assert bench_trl.schedule(args.seq_lens, args.first_seq_lens)[:6] == [
        ("CPOTrainer", 1024), ("FusedCPOTrainer", 1024), ("CPOTrainer", 4096), ("FusedCPOTrainer", 4096),
        ("CPOTrainer", 2048), ("FusedCPOTrainer", 2048)]
    clock = [0.0]
    monkeypatch.setattr(bench_trl.time, "time", lambda: clock[0])
    monkeypatch.setattr("patches.default_assets.build_default_tokenizer", lambda: None)
    monkeypatch.setattr(bench_trl, "single_token_words", lambda tokenizer: [])
    ran = []

    def fake_run(name, seq_len, args, tokenizer, words, deadline, cuda):
        ran.append((name, seq_len))
        oom = name == "CPOTrainer" and seq_len >= 4096
        clock[0] += seq_len / 1024  # a config's minimal run: 1 s per 1024 tokens
        return dict(trainer=name, seq_len=seq_len, pairs=8, status="oom" if oom else "ok", oom=oom, steps=2,
                    setup_s=0.0, first_step_s=seq_len / 2048, step_s=seq_len / 2048, peak_gib=seq_len / 1024)

    monkeypatch.setattr(bench_trl, "run_config", fake_run)
    rows = bench_trl.sweep(args, cuda=False)
    assert ran == [("CPOTrainer", 1024), ("FusedCPOTrainer", 1024), ("CPOTrainer", 4096), ("FusedCPOTrainer", 4096),
                   ("CPOTrainer", 2048), ("FusedCPOTrainer", 2048), ("FusedCPOTrainer", 8192),
                   ("FusedCPOTrainer", 16384)]
    status = {(row["trainer"], row["seq_len"]): row["status"] for row in rows}
    assert status[("CPOTrainer", 8192)] == status[("CPOTrainer", 32768)] == "skipped: OOM at T=4096"
    # at t=38 s, 32768 is predicted to need (8 + 8) s * 2^1.5 = 45 s more: past the 80 s budget
    assert status[("FusedCPOTrainer", 32768)] == "skipped: time budget"
    report = bench_trl.markdown(rows, dict(trl="1.16.0", cpo_alpha=0.0, smoke=False, layers=16, cuda=True,
                                           optim="AdamW", pairs=8, steps=5, device="test", torch="t",
                                           transformers="t", commit="c"))
    assert "largest T that fits, CPOTrainer: T=2048 (OOM at T=4096)" in report
    assert "| 2048 | 32768 | 2.0 | 1.00 | 2.0 | 1.00 |" in report
    assert "| 4096 | 65536 | OOM | — | 4.0 | 2.00 |" in report
    assert "| 32768 | 524288 | not run | — | not run (time) | — |" in report
