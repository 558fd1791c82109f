"""DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo): the patched model trains as without DeepSpeed.

Under ZeRO-3 ``lm_head.weight`` is an empty placeholder outside lm_head's call; the patched forward reads it
inside that call, where DeepSpeed's hooks have gathered it. Two checks, each with its own launcher:
``benchmarks/deepspeed_parity.py`` under torchrun (loss per step, every full gradient, the weight updates against
one process without DeepSpeed), and ``accelerate launch`` with the shipped ``configs/accelerate_zero*.yaml`` of
``python -m patches train`` (per-step losses equal to the run without DeepSpeed on the same global batches).
Skipped where deepspeed is not installed. The launcher helpers run everything on the CPU (DeepSpeed's CPU
accelerator, gloo), also on a machine with GPUs.
"""
import json
import os
import sys

import pytest

from tests.distributed.launcher import REPO_ROOT, run_launcher, run_torchrun

pytest.importorskip("deepspeed", reason="deepspeed is not installed")
pytestmark = pytest.mark.subprocess


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_parity_with_one_process_without_deepspeed(stage, tmp_path):
    run_torchrun([str(REPO_ROOT / "benchmarks" / "deepspeed_parity.py"), "--stage", str(stage),
                  "--out", str(tmp_path)], timeout=240)
    result = json.loads((tmp_path / f"deepspeed_zero{stage}_ws2.json").read_text())
    assert result["passed"], result
    assert result["world_size"] == 2 and result["lm_head_grad_rel_err"] < 1e-5


def _train_losses(output_dir):
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return [entry["loss"] for entry in metrics["log_history"] if "loss" in entry and "step" in entry]


def _held_out_before_training(output_dir):
    """The "before" metrics of the held-out pairs, without the timings."""
    before = json.loads((output_dir / "metrics.json").read_text())["before"]["heldout"]
    return {name: value for name, value in before.items() if "/" in name or name == "loss"}


def test_cli_under_accelerate_zero3_matches_the_run_without_deepspeed(tmp_path):
    """2 processes x 4 pairs under ZeRO-3 see the global batches of one process with 8 pairs; both evaluate the
    held-out pairs the same before training."""
    common = ["--max-steps", "3", "--max-length", "96"]
    run_launcher(["accelerate.commands.launch", "--config_file", str(REPO_ROOT / "configs" / "accelerate_zero3.yaml"),
                  "--num_processes", "2"],
                 ["-m", "patches", "train", *common, "--batch-size", "4", "--output-dir", str(tmp_path / "zero3")],
                 timeout=300)
    run_launcher(["patches"], ["train", *common, "--batch-size", "8", "--output-dir", str(tmp_path / "plain")],
                 timeout=300)
    zero3, plain = _train_losses(tmp_path / "zero3"), _train_losses(tmp_path / "plain")
    assert len(zero3) == len(plain) == 3
    assert zero3 == pytest.approx(plain, rel=1e-5, abs=1e-6)
    # the evaluation before training runs inside train(), on DeepSpeed's engine: the untrained model's metrics
    before_zero3 = _held_out_before_training(tmp_path / "zero3")
    before_plain = _held_out_before_training(tmp_path / "plain")
    assert before_zero3.keys() == before_plain.keys() and "rewards/margins" in before_plain
    assert before_zero3 == pytest.approx(before_plain, rel=1e-5, abs=1e-6)
    assert (tmp_path / "zero3" / "model.safetensors").is_file()  # the gathered 16-bit-off (fp32) weights


def test_fused_cpo_trainer_under_accelerate_zero3_matches_one_process(tmp_path):
    """TRL's trainer path: ``FusedCPOTrainer`` under ZeRO-3 on 2 processes x 2 pairs == 1 process x 4 pairs."""
    pytest.importorskip("trl", reason="trl is not installed")
    worker = str(REPO_ROOT / "tests" / "distributed" / "trl_worker.py")
    run_launcher(["accelerate.commands.launch", "--config_file", str(REPO_ROOT / "configs" / "accelerate_zero3.yaml"),
                  "--num_processes", "2"], [worker, str(tmp_path / "zero3"), "2"], timeout=300)
    run_launcher([], [worker, str(tmp_path / "plain"), "4"], timeout=300)
    zero3 = json.loads((tmp_path / "zero3" / "losses.json").read_text())
    plain = json.loads((tmp_path / "plain" / "losses.json").read_text())
    assert len(zero3) == len(plain) == 3
    assert zero3 == pytest.approx(plain, rel=1e-5, abs=1e-6)
