"""benchmarks/bench_packed.py on the CPU: its --smoke run goes through every part on a tiny model."""
import json

import pytest
import torch

from benchmarks import bench_packed


def test_smoke_run_streams_new_lengths_and_checks_every_part(tmp_path):
    result = bench_packed.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "packed.json").read_text())
    assert saved == json.loads(json.dumps(result))
    meta, rows = saved["meta"], saved["rows"]
    assert meta["commit"] and meta["gradient_checkpointing"] and list(meta["samples"]) == ["1b"]
    sample = meta["samples"]["1b"]
    assert 0 < sample["padding_share"] < 1 and sample["real_tokens"] < sample["padded_tokens"]

    streamed = {row["variant"]: row for row in rows if row["part"] == "stream"}
    assert list(streamed) == list(bench_packed.VARIANTS)
    for variant, row in streamed.items():
        assert not row["oom"] and "error" not in row and row["steady_tokens_per_s"] > 0
        assert len(row["seconds"]) == row["steps"] == meta["steps"] and len(row["first_two_s"]) == 2
        # a stream: every batch a packed length seen neither before in it nor in the warm-up
        lengths = row["real_tokens"] + row["warmup_real_tokens"]
        assert len(set(lengths)) == len(lengths) and len(row["warmup_real_tokens"]) == meta["warmup"]
        # the packed batches ran through the packed attention (per sequence on the CPU), each layer and its
        # recomputation; the padded ones never
        calls = 2 * meta["layers"]["1b"] if bench_packed.is_packed(variant) else 0
        assert row["attention_calls_per_step"] == {"kernel": 0, "per_sequence": calls}
    # the same stream, the same SimPO loss: from the logits, fused and padded, fused and packed
    plain = streamed["plain-padded"]
    for variant in ("patched-padded", "patched-packed"):
        assert streamed[variant]["real_tokens"] == plain["real_tokens"]
        assert streamed[variant]["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    assert not set(streamed["patched-packed-flex"]["real_tokens"]) & set(plain["real_tokens"])  # its own lengths

    agree = [row for row in rows if row["part"] == "agree"]
    assert len(agree) == 2
    for row in agree:
        assert row["loss_rel_diff"] < 1e-5 and row["logps_max_abs_diff"] < 1e-5 and row["grad_rel_diff"] < 1e-5
    for variant in bench_packed.FIT_VARIANTS:  # doubling up to --max-pairs (no OOM on the CPU)
        assert [r["pairs"] for r in rows if r["part"] == "fit" and r["variant"] == variant] == [3, 6]
    (long,) = [row for row in rows if row["part"] == "long"]
    assert bench_packed.succeeded(long) and long["real_tokens"] == 2 * 96 and long["attention_calls"]["per_sequence"]

    report = (tmp_path / "packed.md").read_text()
    assert "| 1b | patched-packed |" in report and "first two steps" in report
    assert "(no OOM reached: a lower bound)" in report and "one pair of 96 + 96 tokens" in report


def test_stream_lengths_are_new_and_long_tailed():
    taken = set()
    batches = bench_packed.draw_stream(20, 8, 100, 0, bench_packed.LENGTHS, taken)
    lengths = [bench_packed.real_tokens(b) for b in batches]
    assert len(set(lengths)) == 20 and taken == set(lengths)
    again = bench_packed.draw_stream(5, 8, 100, 0, bench_packed.LENGTHS, taken)  # the same seeds: other draws
    assert not set(map(bench_packed.real_tokens, again)) & set(lengths)

    pairs = bench_packed.draw_pairs(2000, vocab=100, seed=0)
    answers = torch.tensor([len(p["chosen_input_ids"]) for p in pairs], dtype=torch.float64)
    limits = bench_packed.LENGTHS
    assert answers.max() <= limits["answer_max"] and answers.min() >= 1
    assert answers.median() == pytest.approx(limits["answer_median"], rel=0.1)
    assert answers.mean() > 1.2 * answers.median()  # long right tail
