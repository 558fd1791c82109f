"""``python -m patches``: help, a short smoke run of the embedded default, local checkpoints, bad --data."""
import json
import types
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from patches.cli import main
from patches.default_assets import build_default_tokenizer, default_data_files
from patches.trainer import METRIC_NAMES
from tests.distributed.launcher import run_torchrun
from tests.helpers import random_llama

REPO_ROOT = Path(__file__).resolve().parents[2]
ISSUE_OPTIONS = ("--model", "--data", "--output-dir", "--beta", "--gamma", "--lr", "--epochs", "--max-steps",
                 "--batch-size", "--grad-accum", "--max-length", "--bf16", "--no-patch")


def run_module(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "patches", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def small_jsonl(path, n_records, extra_lines=()):
    lines = default_data_files()[0].read_text(encoding="utf-8").splitlines()[:n_records]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return path


def test_help_lists_the_train_command_and_its_options(capsys):
    for argv in (["--help"], ["train", "--help"]):
        with pytest.raises(SystemExit) as exit_status:
            main(argv)
        assert exit_status.value.code == 0
    top, train = capsys.readouterr().out.split("usage:")[1:]
    assert "train" in top
    for option in ISSUE_OPTIONS:
        assert option in train, option


@pytest.mark.subprocess
def test_smoke_run_of_the_embedded_model_writes_model_metrics_and_plot(tmp_path):
    empty_answer = json.dumps({"prompt": "Question: Say nothing.\nAnswer:", "chosen": "", "rejected": " No."})
    data = small_jsonl(tmp_path / "train.jsonl", 12, [empty_answer])
    heldout = small_jsonl(tmp_path / "heldout.jsonl", 4)
    out = tmp_path / "run"
    result = run_module("train", "--data", str(data), "--eval-data", str(heldout), "--output-dir", str(out),
                        "--max-steps", "3", "--batch-size", "4", "--grad-accum", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "training_curves.png"):
        assert (out / name).is_file(), name
    assert "1 skipped" in result.stdout
    assert "rewards/accuracies" in result.stdout and "heldout after" in result.stdout  # the summary table
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["data"]["skipped_records"] == 1
    assert metrics["data"]["pairs"] == {"train": 12, "heldout": 4}
    steps = [entry for entry in metrics["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    assert all(set(METRIC_NAMES) <= set(entry) for entry in steps)
    assert set(METRIC_NAMES) <= set(metrics["after"]["train"]) and metrics["model"]["vocab_size"] >= 32000
    reloaded = LlamaForCausalLM.from_pretrained(out, local_files_only=True)
    assert reloaded.config.vocab_size == metrics["model"]["vocab_size"]
    # the saved tokenizer starts a text with the BOS, as every training row does
    saved_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert saved_tokenizer("Question:")["input_ids"][0] == saved_tokenizer.bos_token_id


def tiny_llama(tokenizer, seed=0):
    """A 1-layer Llama for the embedded tokenizer (a few extra vocabulary rows, as real checkpoints have)."""
    return random_llama(seed, vocab_size=len(tokenizer) + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)


def tiny_checkpoint(path):
    tokenizer = build_default_tokenizer()
    tiny_llama(tokenizer).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_local_checkpoint_trains_the_same_with_and_without_the_patch(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    data = small_jsonl(tmp_path / "train.jsonl", 8)
    common = ["train", "--model", str(checkpoint), "--data", str(data), "--max-steps", "3", "--batch-size", "4",
              "--lr", "3e-2", "--max-length", "24", "--max-prompt-length", "8"]
    histories = {}
    for flag in ([], ["--no-patch"]):
        out = tmp_path / ("plain" if flag else "fused")
        assert main([*common, "--output-dir", str(out), *flag]) == 0
        log = json.loads((out / "metrics.json").read_text())["log_history"]
        histories[bool(flag)] = [entry for entry in log if "loss" in entry]
    assert "plain PyTorch from logits" in capsys.readouterr().out
    for fused, plain in zip(histories[False], histories[True]):
        for name in ("loss", "rewards/margins", "logps/chosen", "logits/rejected"):
            assert plain[name] == pytest.approx(fused[name], rel=2e-4, abs=1e-5), name
    assert histories[False][-1]["loss"] < histories[False][0]["loss"]  # it learns on 8 pairs at this lr


def recording_trainer_class(trainers: list):
    """A ``SimPOTrainer`` subclass that appends each instance to ``trainers``."""
    import patches.trainer

    class RecordingTrainer(patches.trainer.SimPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    return RecordingTrainer


#: a non-default value for every option of ``train`` that must reach the run (``--bf16`` is a flag)
NON_DEFAULT_OPTIONS = {"--beta": 1.3, "--gamma": 0.45, "--alpha": 0.2, "--label-smoothing": 0.1, "--lr": 0.0123,
                       "--grad-accum": 2, "--batch-size": 3, "--max-length": 16, "--max-prompt-length": 6,
                       "--chunk-size": 2, "--seed": 11, "--epochs": 3.0, "--max-steps": 1}


def test_every_train_option_reaches_the_trainer_the_collator_and_the_loss(tmp_path, monkeypatch):
    """Each option, given a non-default value, is what the model, Trainer, collator and fused loss use."""
    import patches.default_assets
    import patches.trainer
    from patches import patched_loss_fn

    seeds_of_built_models, trainers, train_labels = [], [], []

    def tiny_default_model(tokenizer, seed=0):
        # the seed given, and the global one: a checkpoint's missing layers are initialised from the latter
        seeds_of_built_models.append((seed, torch.initial_seed()))
        return tiny_llama(tokenizer, seed)  # the embedded 32k-vocabulary model takes seconds to build and train

    class RecordingTrainer(recording_trainer_class(trainers)):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                train_labels.append(inputs["labels"])
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # train() imports both by name when it runs: the module attributes are what it gets
    monkeypatch.setattr(patches.default_assets, "build_default_model", tiny_default_model)
    monkeypatch.setattr(patches.trainer, "SimPOTrainer", RecordingTrainer)
    out = tmp_path / "run"
    argv = ["train", "--data", str(small_jsonl(tmp_path / "train.jsonl", 8)), "--output-dir", str(out), "--bf16"]
    for option, value in NON_DEFAULT_OPTIONS.items():
        argv += [option, str(value)]
    assert main(argv) == 0
    (trainer,) = trainers
    given = {option[2:].replace("-", "_"): value for option, value in NON_DEFAULT_OPTIONS.items()}

    args = trainer.args
    assert seeds_of_built_models == [(given["seed"], given["seed"])] and (args.seed, args.data_seed) == (given["seed"],) * 2
    assert args.learning_rate == given["lr"] and args.gradient_accumulation_steps == given["grad_accum"]
    assert args.per_device_train_batch_size == given["batch_size"]
    assert args.per_device_eval_batch_size == 2 * given["batch_size"]
    assert (args.max_steps, args.num_train_epochs) == (given["max_steps"], given["epochs"])
    # bf16 mixed precision: autocast on, float32 master weights (a bf16 copy would round lr ~1e-6 updates away)
    assert args.bf16 and {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert trainer.state.global_step == given["max_steps"]

    # one optimizer step = grad-accum micro-batches of batch-size pairs, truncated as the collator was told
    assert trainer.data_collator.max_length == given["max_length"]
    assert trainer.data_collator.max_prompt_length == given["max_prompt_length"]
    assert len(train_labels) == given["max_steps"] * given["grad_accum"]
    for labels in train_labels:
        assert labels.shape[0] == 2 * given["batch_size"] and labels.shape[1] <= given["max_length"]
        prompt_lengths = (labels != -100).int().argmax(dim=1)  # the prompt is the -100 run before the answer
        assert (prompt_lengths == given["max_prompt_length"]).all()  # the embedded prompts are longer: all cut

    loss_options = dict(beta=given["beta"], gamma=given["gamma"], alpha=given["alpha"],
                        label_smoothing=given["label_smoothing"], compute_nll_loss=True)
    assert trainer.use_fused_loss and trainer.simpo_options == {**loss_options, "ignore_index": -100}
    fused_loss = patched_loss_fn(trainer.model)
    assert {name: getattr(fused_loss, name) for name in loss_options} == loss_options
    assert fused_loss.chunk_size == given["chunk_size"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == given["max_steps"]
    assert {name: metrics["config"][name] for name in given} == given and metrics["config"]["bf16"]


def test_without_matplotlib_the_run_finishes_with_a_warning_instead_of_the_plot(tmp_path, monkeypatch, capsys):
    import patches.default_assets

    monkeypatch.setattr(patches.default_assets, "build_default_model", lambda tokenizer, seed=0: tiny_llama(tokenizer))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" raises ImportError
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_jsonl(tmp_path / "train.jsonl", 4)), "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--max-length", "24"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: skipped training_curves.png: matplotlib is not available "
                        "(import of matplotlib halted; None in sys.modules)"]
    assert "Traceback" not in captured.err
    for name in ("config.json", "model.safetensors", "metrics.json"):
        assert (out / name).is_file(), name
    assert not (out / "training_curves.png").exists()
    assert captured.out.rstrip().endswith(f"wrote {out}/ (model, metrics.json)")


def cli_rank_worker(report_folder: str, argv) -> None:
    """Under torchrun: ``python -m patches train <argv>`` (``patches.cli.main``, which ``python -m patches`` runs),
    then this rank's trained parameters, the class of the model the Trainer trained (``model_wrapped``) and its
    world size go to ``report_folder/rank<r>.pt``."""
    import patches.trainer

    trainers = []
    patches.trainer.SimPOTrainer = recording_trainer_class(trainers)  # train() imports it by name when it runs
    assert main(argv) == 0
    (trainer,) = trainers
    torch.save({"trained_class": type(trainer.model_wrapped).__name__, "world_size": trainer.args.world_size,
                "parameters": {name: p.detach() for name, p in trainer.model.named_parameters()}},
               Path(report_folder) / f"rank{trainer.args.process_index}.pt")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.subprocess
def test_two_processes_train_together_and_only_rank_zero_reports(tmp_path):
    """2 CPU processes (gloo): one DDP model trained over both ranks, evaluated before and after training; rank 0
    writes and prints the report, and saves the weights every rank holds."""
    from safetensors.torch import load_file

    checkpoint, out = tiny_checkpoint(tmp_path / "ckpt"), tmp_path / "run"
    completed = run_torchrun([__file__, str(tmp_path), "train", "--model", str(checkpoint),
                              "--data", str(small_jsonl(tmp_path / "train.jsonl", 8)), "--output-dir", str(out),
                              "--max-steps", "2", "--batch-size", "2", "--max-length", "24", "--lr", "0.01"],
                             timeout=120)
    assert completed.stdout.count("train: 8 pairs") == 2  # both ranks ran the command
    # the header counts the steps as the Trainer does with 2 processes
    assert completed.stdout.count("run: 2 optimizer steps of 4 pairs (batch 2 x grad accum 1 x 2 processes)") == 2
    assert completed.stdout.count("rewards/accuracies") == 1 and completed.stdout.count("2 steps in") == 1
    for name in ("config.json", "model.safetensors", "metrics.json", "training_curves.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [entry for entry in metrics["log_history"] if "loss" in entry]
    # 2 ranks x 2 pairs per step: the 8 pairs are one epoch in 2 steps (one process would need 4)
    assert [(entry["step"], entry["epoch"]) for entry in steps] == [(1, 0.5), (2, 1.0)]
    # no held-out pairs: "before" (the untrained model) and "after" both on the training pairs
    assert set(METRIC_NAMES) <= set(metrics["before"]["train"]) and set(METRIC_NAMES) <= set(metrics["after"]["train"])
    assert metrics["before"]["train"]["loss"] != metrics["after"]["train"]["loss"]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [(rank["trained_class"], rank["world_size"]) for rank in ranks] == [("DistributedDataParallel", 2)] * 2
    initial, saved = load_file(checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    trained = ranks[0]["parameters"]
    assert trained.keys() == ranks[1]["parameters"].keys() == saved.keys()
    for name, weight in trained.items():
        assert torch.equal(ranks[1]["parameters"][name], weight), f"{name}: the ranks trained different weights"
        assert torch.equal(saved[name], weight), name
    assert not any(torch.equal(initial[name], weight) for name, weight in trained.items())  # every tensor trained


def test_under_fsdp_the_evaluation_before_training_is_skipped_and_the_output_says_so(capsys):
    """FSDP (a GPU launch): ``train_and_evaluate`` trains, evaluates after training only, and prints why."""
    from patches.cli_evaluation import train_and_evaluate

    calls = []

    class FSDPTrainer:  # what train_and_evaluate uses of an HF Trainer whose accelerator runs FSDP
        is_fsdp_enabled = True
        callback_handler = types.SimpleNamespace(callbacks=[])

        def is_world_process_zero(self):
            return True

        def train(self, resume_from_checkpoint=None):
            calls.append("train")
            return "train output"

        def evaluate(self, features, metric_key_prefix):
            calls.append(f"evaluate {metric_key_prefix}")
            return {f"{metric_key_prefix}_loss": float(len(features))}

    before, train_output, after = train_and_evaluate(FSDPTrainer(), {"train": [1, 2, 3], "heldout": [4]})
    assert (before, train_output, after) == ({}, "train output", {"train": {"loss": 3.0}, "heldout": {"loss": 1.0}})
    assert calls == ["train", "evaluate eval_train", "evaluate eval_heldout"]
    assert "evaluation before training: skipped under FSDP" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "p", "chosen": "c"', "bad.jsonl:2: invalid JSON"),
        ('{"prompt": "p", "chosen": "c"}', "bad.jsonl:2: missing key(s) ['rejected']"),
    ],
)
def test_bad_data_exits_with_the_line_number(tmp_path, capsys, bad_line, message):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{good}\n{bad_line}\n{good}\n", encoding="utf-8")
    assert main(["train", "--data", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "nowhere"), "--max-steps", "1"]) == 2
    assert "not a local HF checkpoint folder" in capsys.readouterr().err


def test_unsupported_head_is_a_clear_error(tmp_path, capsys):
    from transformers import CohereConfig, CohereForCausalLM

    tokenizer = build_default_tokenizer()
    config = CohereConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, logit_scale=0.5)
    CohereForCausalLM(config).save_pretrained(tmp_path / "cohere")
    tokenizer.save_pretrained(tmp_path / "cohere")
    data = small_jsonl(tmp_path / "train.jsonl", 2)
    assert main(["train", "--model", str(tmp_path / "cohere"), "--data", str(data), "--max-steps", "1",
                 "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert error.startswith("error: ") and "'cohere'" in error and "logit_scale" in error


def test_bf16_with_a_small_learning_rate_still_moves_the_weights(tmp_path):
    """``--bf16 --lr 1e-6`` is mixed precision: the AdamW update reaches float32 master weights. (With the weights
    cast to bf16, a step of ~1e-6 on weights of magnitude ~0.02, where bf16's spacing is ~1e-4, rounded away: 0.5 %
    of a projection's weights changed.)"""
    from safetensors.torch import load_file

    from patches.default_assets import build_default_model

    out = tmp_path / "run"
    argv = ["train", "--data", str(small_jsonl(tmp_path / "train.jsonl", 4)), "--output-dir", str(out), "--bf16",
            "--lr", "1e-6", "--max-steps", "1", "--batch-size", "2", "--max-length", "48"]
    assert main(argv) == 0
    trained = load_file(str(out / "model.safetensors"))
    initial = build_default_model(build_default_tokenizer(), seed=0).state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert trained[name].dtype == torch.float32
        changed = (trained[name] != initial[name]).float().mean().item()
        assert changed > 0.5, (name, changed)


if __name__ == "__main__":
    cli_rank_worker(sys.argv[1], sys.argv[2:])
