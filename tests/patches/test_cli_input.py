"""``python -m patches train`` input checks: a bad value is one ``error:`` line naming its flag, exit status 2,
before any tokenizer or model is built, and no output folder is left behind."""
import pytest
import transformers

import patches.default_assets
from patches.cli import main

#: (extra arguments, how the error line starts); "{tmp}" is the test's temporary folder
BAD_ARGUMENTS = [
    (["--max-steps", "0"], "--max-steps must be > 0, or -1 to train for --epochs, got 0"),
    (["--max-steps", "-2"], "--max-steps must be > 0, or -1 to train for --epochs, got -2"),
    (["--max-steps", "two"], "argument --max-steps: invalid int value: 'two'"),
    (["--epochs", "-1"], "--epochs must be a finite number > 0, got -1.0"),
    (["--epochs", "0"], "--epochs must be a finite number > 0, got 0.0"),
    (["--epochs", "-1", "--max-steps", "3"], "--epochs must be a finite number > 0, got -1.0"),
    (["--epochs", "inf"], "--epochs must be a finite number > 0, got inf"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--beta", "-2"], "--beta: beta must be > 0"),
    (["--beta", "0"], "--beta: beta must be > 0"),
    (["--gamma", "nan"], "--gamma: gamma must be a finite real number, got nan"),
    (["--gamma=-inf"], "--gamma: gamma must be a finite real number, got -inf"),
    (["--alpha", "-1"], "--alpha: alpha must be >= 0"),
    (["--label-smoothing", "2"], "--label-smoothing: label_smoothing must lie in [0, 1], got 2.0"),
    (["--label-smoothing", "-0.1"], "--label-smoothing: label_smoothing must be >= 0"),
    (["--chunk-size", "0"], "--chunk-size: chunk_size must be a positive int"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--grad-accum", "-1"], "--grad-accum must be >= 1, got -1"),
    (["--max-length", "0"], "--max-length must be >= 1, got 0"),
    (["--max-length", "1"], "--max-length must be >= 2 (a prompt token and an answer token), got 1"),
    (["--max-length", "16", "--max-prompt-length", "16"],
     "--max-prompt-length must be >= 1 and below --max-length (16), got 16"),
    (["--max-length", "16", "--max-prompt-length", "40"],
     "--max-prompt-length must be >= 1 and below --max-length (16), got 40"),
    (["--max-prompt-length", "0"], "--max-prompt-length must be >= 1 and below --max-length (512), got 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--data", "{tmp}/missing.jsonl"], "--data {tmp}/missing.jsonl: no such file"),
    (["--eval-data", "{tmp}/missing.jsonl"], "--eval-data {tmp}/missing.jsonl: no such file"),
    (["--model", "{tmp}/nowhere"], "--model {tmp}/nowhere: not a local HF checkpoint folder (no config.json)"),
    (["--tokenizer", "{tmp}"], "--tokenizer needs --model: the embedded default model uses the embedded tokenizer"),
    (["--data", "{tmp}"], "--data {tmp}: not a file, nor a folder written by datasets' save_to_disk"),
]


@pytest.fixture
def nothing_built(monkeypatch):
    """Building a tokenizer or a model fails the test: bad input must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tokenizer or model was built for a bad command line")

    for name in ("build_default_model", "build_default_tokenizer"):
        monkeypatch.setattr(patches.default_assets, name, refuse)
    for auto_class in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto_class, "from_pretrained", refuse)


def run_refused(argv, capsys) -> str:
    """``main(argv)`` must return 2 with one ``error:`` line on stderr and nothing on stdout; returns the line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and captured.err.endswith("\n")
    return captured.err.strip()


@pytest.mark.parametrize("arguments, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_value_is_one_error_line_naming_the_flag(tmp_path, capsys, nothing_built, arguments, message):
    out = tmp_path / "out"
    argv = ["train", "--output-dir", str(out), *(argument.replace("{tmp}", str(tmp_path)) for argument in arguments)]
    assert run_refused(argv, capsys).startswith("error: " + message.replace("{tmp}", str(tmp_path)))
    assert not out.exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys, nothing_built):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert run_refused(["train", "--output-dir", str(taken)], capsys) == f"error: --output-dir {taken}: not a folder"
    below = taken / "run"
    assert run_refused(["train", "--output-dir", str(below)], capsys) == (
        f"error: --output-dir {below}: not a folder ({taken} is a file)"
    )
    assert taken.read_text() == "not a folder"


def test_the_help_documents_the_ranges(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "-1: train for --epochs" in text and "reward scale (> 0)" in text and "in [0, 1]" in text


def test_output_dir_that_cannot_be_created_is_refused_before_any_model(capsys, nothing_built):
    """A folder below /proc cannot be created (not even by root): one ``error:`` line, nothing built."""
    message = run_refused(["train", "--output-dir", "/proc/patches-cannot-be-here/run"], capsys)
    assert message.startswith("error: --output-dir /proc/patches-cannot-be-here/run: cannot create it in /proc")
