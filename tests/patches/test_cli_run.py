"""``python -m patches train`` runs a user can trust: Ctrl-C saves the run (exit 130), checkpoints every
``--save-steps``, ``--resume`` continues bit for bit, ``--overwrite`` replaces a run, the header and
``metrics.json`` show the effective hyperparameters, and the progress bars say what they count."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import patches.trainer
from patches.cli import main
from tests.patches.test_cli import REPO_ROOT, small_jsonl, tiny_checkpoint

#: 12 pairs, 2 per micro-batch, 2 micro-batches per step: 3 steps per epoch, 6 in all (across an epoch boundary)
RUN_OPTIONS = ["--batch-size", "2", "--grad-accum", "2", "--epochs", "2", "--max-length", "24", "--lr", "2e-2"]
STEPS = 6

#: the CLI in a child process, held at the end of step ``gate_step`` until the test has sent its SIGINT: the signal
#: then lands during training at a known step, whatever the machine's speed
GATED_CLI = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
import patches.trainer
from patches.cli import main

ready, go, gate_step = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

class Gate(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == gate_step:
            ready.touch()
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)

class GatedTrainer(patches.trainer.SimPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(Gate())

patches.trainer.SimPOTrainer = GatedTrainer
sys.exit(main(sys.argv[4:]))
"""


def step_entries(output_dir):
    return [entry for entry in json.loads((output_dir / "metrics.json").read_text())["log_history"] if "loss" in entry]


def assert_same_run(resumed, uninterrupted):
    """Equal final weights and per-step logs (loss, rewards, learning rate...)."""
    final, expected = load_file(str(resumed / "model.safetensors")), load_file(str(uninterrupted / "model.safetensors"))
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    resumed_steps, expected_steps = step_entries(resumed), step_entries(uninterrupted)
    assert [entry["step"] for entry in resumed_steps] == list(range(1, STEPS + 1))
    for got, want in zip(resumed_steps, expected_steps):
        assert got == want
    # "before": the first part's, kept in its checkpoint (not the partly trained model's); "after" the same
    def evaluations(folder):
        metrics = json.loads((folder / "metrics.json").read_text())
        return {when: {split: {name: value for name, value in values.items()
                               if "runtime" not in name and "per_second" not in name}
                       for split, values in metrics[when].items()} for when in ("before", "after")}

    assert evaluations(resumed)["before"] and evaluations(resumed) == evaluations(uninterrupted)


def run_main(argv):
    """``main(argv)`` with its stdout and stderr captured: ``(exit status, stdout, stderr)``."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    return status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    return tiny_checkpoint(folder / "ckpt"), small_jsonl(folder / "train.jsonl", 12)


def train_argv(inputs, output_dir, *extra):
    checkpoint, data = inputs
    return ["train", "--model", str(checkpoint), "--data", str(data), "--output-dir", str(output_dir),
            *RUN_OPTIONS, *extra]


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """The reference: the run from start to end, checkpoints every 2 steps (only the last one kept)."""
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_main(train_argv(inputs, output_dir, "--save-steps", "2"))[0] == 0
    return output_dir


@pytest.mark.subprocess
def test_ctrl_c_saves_the_run_and_resume_continues_it_bit_for_bit(inputs, uninterrupted, tmp_path):
    """A real SIGINT to ``python -m patches``: one line, exit 130, the model, metrics and a checkpoint saved; then
    ``--resume`` ends with the weights and per-step logs of the uninterrupted run."""
    output_dir, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "stdout", "w+") as stdout, open(tmp_path / "stderr", "w+") as stderr:
        child = subprocess.Popen([sys.executable, "-c", GATED_CLI, str(ready), str(go), "2",
                                  *train_argv(inputs, output_dir)], cwd=REPO_ROOT, env=environment, stdout=stdout,
                                 stderr=stderr, text=True)
        try:
            deadline = time.monotonic() + 240
            while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ready.exists(), f"the child never reached step 2 (exit status {child.poll()})"
            child.send_signal(signal.SIGINT)
            go.touch()
            status = child.wait(timeout=240)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        stderr.seek(0)
        errors = stderr.read()
    assert status == 130, errors[-3000:]
    assert "Traceback" not in errors
    assert errors.splitlines()[-1] == (f"interrupted at step 2 of {STEPS}: saved the model, metrics.json and "
                                       f"checkpoint-2 in {output_dir}/; continue it with the same command and --resume")
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["interrupted"] and metrics["steps"] == 2 and metrics["after"] == {}
    assert [entry["step"] for entry in step_entries(output_dir)] == [1, 2]
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "checkpoint-2" / "optimizer.pt").is_file()

    status, out, _ = run_main(train_argv(inputs, output_dir, "--resume"))
    assert status == 0 and f"resuming from {output_dir / 'checkpoint-2'}" in out
    assert_same_run(output_dir, uninterrupted)
    assert json.loads((output_dir / "metrics.json").read_text())["resumed_from"] == str(output_dir / "checkpoint-2")


class CrashAtStep(TrainerCallback):
    """A crash (not Ctrl-C) right after optimizer step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_save_steps_checkpoints_survive_a_crash_and_resume_to_the_same_run(inputs, uninterrupted, tmp_path,
                                                                           monkeypatch):
    # the uninterrupted run saved at steps 2, 4, 6 and kept the last
    assert [path.name for path in uninterrupted.glob("checkpoint-*")] == ["checkpoint-6"]

    class CrashingTrainer(patches.trainer.SimPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(CrashAtStep(5))

    output_dir = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(patches.trainer, "SimPOTrainer", CrashingTrainer)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_main(train_argv(inputs, output_dir, "--save-steps", "2"))
    assert [path.name for path in output_dir.glob("checkpoint-*")] == ["checkpoint-4"]
    assert not (output_dir / "model.safetensors").exists()
    assert run_main(train_argv(inputs, output_dir, "--save-steps", "2", "--resume"))[0] == 0
    assert_same_run(output_dir, uninterrupted)


class SigintAtStep(TrainerCallback):
    """Ctrl-C ``times`` times at the end of optimizer step ``step``."""

    def __init__(self, step, times):
        self.step, self.times = step, times

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("when", ["while loading the model", "twice during training"])
def test_ctrl_c_outside_training_or_twice_quits_at_once_without_saving(inputs, tmp_path, monkeypatch, when):
    import patches.cli

    if when == "while loading the model":
        monkeypatch.setattr(patches.cli, "_load_model", lambda args, tokenizer: os.kill(os.getpid(), signal.SIGINT))
    else:
        class TwiceInterruptedTrainer(patches.trainer.SimPOTrainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(SigintAtStep(1, times=2))

        monkeypatch.setattr(patches.trainer, "SimPOTrainer", TwiceInterruptedTrainer)
    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        status, _, errors = run_main(train_argv(inputs, tmp_path / "run"))
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("Ctrl-C escaped main() as a KeyboardInterrupt: the user gets a traceback")
    assert status == 130 and "Traceback" not in errors
    assert errors.splitlines()[-1] == "interrupted: quit without saving"
    assert not (tmp_path / "run" / "model.safetensors").exists() and not list(tmp_path.glob("run/checkpoint-*"))
    assert signal.getsignal(signal.SIGINT) is previous_handler  # the CLI's handler is gone after the run


def test_overwrite_replaces_the_previous_run_and_its_checkpoints(inputs, uninterrupted, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, output_dir)
    status, out, _ = run_main(train_argv(inputs, output_dir, "--max-steps", "1", "--overwrite"))
    assert status == 0
    assert f"--overwrite: removed the previous run's checkpoint-6 from {output_dir}" in out
    assert not list(output_dir.glob("checkpoint-*"))  # --resume cannot pick up the replaced run's state
    assert json.loads((output_dir / "metrics.json").read_text())["steps"] == 1
    replaced = load_file(str(uninterrupted / "model.safetensors"))
    assert any(not torch.equal(tensor, replaced[name])
               for name, tensor in load_file(str(output_dir / "model.safetensors")).items())


@pytest.fixture(scope="module")
def default_lr_run(inputs, tmp_path_factory):
    """A run with --model and no --lr, an epoch count that ends mid-epoch and a partial accumulation: 12 pairs in
    batches of 5 are 3 micro-batches, 2 steps per epoch (the second one micro-batch), 1.5 epochs = 3 steps."""
    checkpoint, data = inputs
    output_dir = tmp_path_factory.mktemp("default_lr") / "run"
    status, out, errors = run_main(["train", "--model", str(checkpoint), "--data", str(data), "--output-dir",
                                    str(output_dir), "--batch-size", "5", "--grad-accum", "2", "--epochs", "1.5",
                                    "--max-length", "24", "--beta", "2.5", "--gamma", "0.5", "--alpha", "0.25"])
    assert status == 0, errors[-3000:]
    return out, errors, json.loads((output_dir / "metrics.json").read_text())


def test_header_and_metrics_show_the_effective_hyperparameters(default_lr_run, inputs):
    from transformers import AutoConfig

    out, _, metrics = default_lr_run
    attention = AutoConfig.from_pretrained(inputs[0])._attn_implementation or "sdpa"
    assert ("hyperparameters: lr 1e-06 (default with --model), beta 2.5, gamma 0.5, alpha 0.25, "
            "label smoothing 0\n") in out
    assert (f"run: 3 optimizer steps of 10 pairs (batch 5 x grad accum 2); max length 24 (prompt 12); float32; "
            f"padded batches; attention {attention}; a checkpoint only on Ctrl-C\n") in out
    assert metrics["steps"] == 3
    settings = metrics["hyperparameters"]
    assert settings == {"lr": 1e-6, "lr_source": "default with --model", "beta": 2.5, "gamma": 0.5, "alpha": 0.25,
                        "label_smoothing": 0.0, "batch_size": 5, "grad_accum": 2, "processes": 1,
                        "pairs_per_step": 10, "steps": 3, "max_length": 24, "max_prompt_length": 12,
                        "precision": "float32", "padding_free": False, "attention": attention, "loss": "fused",
                        "save_steps": 0}


def test_progress_bars_are_labelled_and_the_training_bar_shows_loss_and_accuracy(default_lr_run):
    _, errors, _ = default_lr_run
    bar_updates = errors.replace("\r", "\n").splitlines()
    labels = {line.split(":")[0] for line in bar_updates if "%|" in line}
    assert {"evaluation before training (train)", "training", "evaluation after training (train)"} <= labels
    assert not [label for label in labels if "%|" in label]  # no bar without a label
    final_training_bar = [line for line in bar_updates if line.startswith("training:") and "3/3" in line][-1]
    assert "loss=" in final_training_bar and "acc=" in final_training_bar


def test_ctrl_c_in_a_command_with_overwrite_says_to_resume_instead(inputs, tmp_path, monkeypatch):
    """``--resume`` and ``--overwrite`` exclude each other: the hint names the one to swap."""
    class InterruptedTrainer(patches.trainer.SimPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(SigintAtStep(1, times=1))

    monkeypatch.setattr(patches.trainer, "SimPOTrainer", InterruptedTrainer)
    output_dir = tmp_path / "run"
    status, _, errors = run_main(train_argv(inputs, output_dir, "--overwrite"))
    assert status == 130
    assert errors.splitlines()[-1] == (f"interrupted at step 1 of {STEPS}: saved the model, metrics.json and "
                                       f"checkpoint-1 in {output_dir}/; continue it with the same command --resume "
                                       f"instead of --overwrite")
