"""benchmarks/bench_step.py on the CPU: its --smoke run (tiny float32 models), an OOM and the time budget."""
import json

import pytest
import torch

from benchmarks import bench_step


def test_smoke_run_both_models_both_variants_same_losses(tmp_path):
    result = bench_step.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "step.json").read_text())
    assert saved == json.loads(json.dumps(result))
    rows = saved["rows"]
    assert [(r["model"], r["seq_len"], r["variant"]) for r in rows] == [
        (model, seq_len, variant) for model in ("Llama-3.2-1B", "Llama-3.1-8B") for seq_len in (32, 64)
        for variant in ("plain", "patched")]
    for row in rows:
        assert row["status"] == "ok" and row["step_s"] > 0 and row["peak_gib"] is None
        assert row["tokens"] == 2 * 2 * row["seq_len"] and len(row["losses"]) == 2
    # one batch per (model, T), float32: the fused loss equals TRL's loss from the logits
    for plain, patched in zip(rows[::2], rows[1::2]):
        assert patched["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    report = (tmp_path / "step.md").read_text()
    assert "| Llama-3.1-8B | 2 × 64 | 256 |" in report and "(CPU smoke run: tiny shapes)" in report


def test_oom_and_time_budget_rows(tmp_path, monkeypatch):
    """An OOM of one variant is recorded and the run goes on; configs past the budget are skipped, unbuilt."""
    step_loss = bench_step.step_loss

    def plain_runs_out_at_64(model, patched, batch):
        if not patched and batch[0].shape[1] == 64:
            raise torch.OutOfMemoryError("out of memory (test)")
        return step_loss(model, patched, batch)

    monkeypatch.setattr(bench_step, "step_loss", plain_runs_out_at_64)
    result = bench_step.main(["--smoke", "--models", "Llama-3.2-1B", "--out", str(tmp_path)])
    status = [(r["seq_len"], r["variant"], r["status"]) for r in result["rows"]]
    assert status == [(32, "plain", "ok"), (32, "patched", "ok"), (64, "plain", "oom"), (64, "patched", "ok")]
    report = (tmp_path / "step.md").read_text()
    assert "| Llama-3.2-1B | 2 × 64 | 256 | OOM |" in report and "| — | OOM |" in report

    built = []
    monkeypatch.setattr(bench_step, "build_model", lambda *args, **kwargs: built.append(args))
    result = bench_step.main(["--smoke", "--budget-s", "-1", "--out", str(tmp_path)])
    assert not built and {r["status"] for r in result["rows"]} == {"skipped: time budget"}
    assert "| not run (time) | not run (time) | — |" in (tmp_path / "step.md").read_text()


def test_8b_shape():
    shape = bench_step.MODELS["Llama-3.1-8B"]
    assert (shape["vocab_size"], shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
            shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"],
            shape["tie_word_embeddings"], shape["rope_theta"]) == (128256, 4096, 14336, 32, 32, 8, 128, False, 5e5)
