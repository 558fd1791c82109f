"""benchmarks/bench_packed.py on the CPU: its --smoke run measures the three variants on the same pairs."""
import json

import pytest
import torch

from benchmarks import bench_packed


def test_smoke_run_measures_the_three_variants_on_the_same_pairs(tmp_path):
    result = bench_packed.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "packed.json").read_text())
    assert saved == json.loads(json.dumps(result))
    meta, rows = saved["meta"], saved["rows"]
    assert meta["commit"] and meta["packed_attention"] == "sdpa" and meta["gradient_checkpointing"]
    sample = meta["sample"]
    assert 0 < sample["padding_share"] < 1 and sample["real_tokens"] < sample["padded_tokens"]
    timed = {row["variant"]: row for row in rows if row["phase"] == "throughput"}
    assert list(timed) == list(bench_packed.VARIANTS)
    for row in timed.values():
        assert not row["oom"] and "error" not in row and row["tokens_per_s"] > 0
        assert row["real_tokens"] == sample["real_tokens"]
    # the same pairs, the same SimPO loss: from the logits, fused and padded, fused and packed
    plain = timed["plain-padded"]["losses"]
    for variant in ("patched-padded", "patched-packed"):
        assert timed[variant]["losses"] == pytest.approx(plain, rel=1e-4)
    fit_pairs = [row["pairs"] for row in rows if row["phase"] == "fit" and row["variant"] == "patched-packed"]
    assert fit_pairs == [3, 6, 12]  # doubling up to --max-pairs (no OOM on the CPU)
    report = (tmp_path / "packed.md").read_text()
    assert "| patched-packed |" in report and "(no OOM reached: a lower bound)" in report


def test_lengths_are_long_tailed_and_clipped():
    pairs = bench_packed.draw_pairs(2000, vocab=100, seed=0)
    answers = torch.tensor([len(p["chosen_input_ids"]) for p in pairs], dtype=torch.float64)
    lengths = bench_packed.LENGTHS
    assert answers.max() <= lengths["answer_max"] and answers.min() >= 1
    assert answers.median() == pytest.approx(lengths["answer_median"], rel=0.1)
    assert answers.mean() > 1.2 * answers.median()  # long right tail
