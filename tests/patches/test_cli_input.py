"""``python -m patches train`` input checks: a bad value is one ``error:`` line naming its flag, exit status 2,
before any tokenizer or model is built, and no output folder is left behind."""
import json

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


@pytest.mark.parametrize("flag, suffix", [("--data", ".jsonl"), ("--eval-data", ".jsonl"), ("--data", ".json")])
def test_data_that_is_not_utf8_is_one_error_line_naming_the_file_and_line(tmp_path, capsys, nothing_built, flag,
                                                                         suffix):
    """A Latin-1 file (the usual non-UTF-8 export): ``path:line`` and the byte, not a ``UnicodeDecodeError``; the
    same for a ``.json`` file (JSON Lines, as ``datasets``' ``to_json`` writes, or an array over several lines)."""
    good = '{"prompt": "p", "chosen": "c", "rejected": "r"}\n'
    data = tmp_path / f"latin1{suffix}"
    data.write_bytes((good + '{"prompt": "déjà", "chosen": "c", "rejected": "r"}\n').encode("latin-1"))
    out = tmp_path / "out"
    message = run_refused(["train", flag, str(data), "--output-dir", str(out)], capsys)
    assert message == f"error: {data}:2: not UTF-8 text (byte 0xe9 at column 14); save the file as UTF-8"
    assert not out.exists()


def test_every_option_says_its_default_at_most_once_and_never_none(capsys, monkeypatch):
    """``--help`` adds ``(default: X)`` only where the help has not said it and X means something (not None, not
    an on/off flag's False; a 0 is said)."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: its help ends where the line ends
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    options = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]
    assert len(options) >= 20
    for line in options:
        assert "(default: None)" not in line and "(default: False)" not in line, line
        assert line.count("default") <= 1, line
    assert any(line.startswith("  --beta BETA") and line.endswith("(default: 2.0)") for line in options)
    for flag, default in (("--alpha ALPHA", "0.0"), ("--seed SEED", "0")):
        # said although 0 == False: a number, not an off switch
        assert any(line.startswith(f"  {flag} ") and line.endswith(f"(default: {default})") for line in options), flag
    assert any(line.startswith("  --resume ") and "default" not in line for line in options)


def fake_checkpoint(run, step, options):
    """A complete-looking ``checkpoint-<step>`` (its trainer state written) with the stored CLI options."""
    checkpoint = run / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "cli_options.json").write_text(json.dumps(options))
    return checkpoint


def model_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")  # enough for the checks: nothing is loaded
    return path


def test_a_non_empty_output_dir_needs_overwrite_or_resume(tmp_path, capsys, nothing_built):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    assert run_refused(["train", "--output-dir", str(run)], capsys) == (
        f"error: --output-dir {run} is not empty (a previous run?): --overwrite replaces what a run writes there, "
        f"or choose another --output-dir"
    )
    fake_checkpoint(run, 3, {})
    fake_checkpoint(run, 12, {}).joinpath("trainer_state.json").unlink()  # a save cut short: not resumable
    assert run_refused(["train", "--output-dir", str(run)], capsys) == (
        f"error: --output-dir {run} is not empty (a previous run?): --overwrite replaces what a run writes there, "
        f"--resume continues it from checkpoint-3, or choose another --output-dir"
    )
    assert (run / "metrics.json").read_text() == "{}"


def test_the_default_output_dir_is_not_replaced_by_a_second_run(tmp_path, capsys, nothing_built, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "simpo-default").mkdir(parents=True)
    (tmp_path / "runs" / "simpo-default" / "model.safetensors").write_text("the first run's model")
    assert run_refused(["train"], capsys).startswith("error: --output-dir runs/simpo-default is not empty")


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]], ids=["plain", "overwrite", "resume"])
def test_the_model_folder_is_never_written(tmp_path, capsys, nothing_built, flags):
    model = model_folder(tmp_path / "ckpt")
    fake_checkpoint(model, 2, {})
    inside = model / "further"
    runs = tmp_path / "runs"
    nested_model = model_folder(runs / "checkpoint-40")
    for output_dir, message in [
        (model, f"--output-dir {model} is the --model folder: the run would overwrite the checkpoint it loads; "
                f"choose another --output-dir"),
        (inside, f"--output-dir {inside} lies inside the --model folder {model}; choose an --output-dir outside it"),
    ]:
        argv = ["train", "--model", str(model), "--output-dir", str(output_dir), *flags]
        assert run_refused(argv, capsys) == f"error: {message}"
    argv = ["train", "--model", str(nested_model), "--output-dir", str(runs), *flags]
    assert run_refused(argv, capsys) == (
        f"error: --model {nested_model} lies inside --output-dir {runs}, which the run writes (and --overwrite "
        f"clears of checkpoints); choose another --output-dir"
    )
    assert sorted(path.name for path in model.iterdir()) == ["checkpoint-2", "config.json"]


def test_resume_may_change_only_how_the_run_is_saved_and_chunked(tmp_path, capsys, nothing_built):
    """--chunk-size changes memory and speed, not what is trained: a resumed run on another card may pick its own
    (here the command passes the resume check and goes on to build the model, which the fixture stops)."""
    run = tmp_path / "run"
    fake_checkpoint(run, 3, {"chunk_size": 1, "beta": 2.0})  # chunk_size: as an earlier release stored it
    argv = ["train", "--output-dir", str(run), "--resume", "--chunk-size", "4", "--save-steps", "5"]
    with pytest.raises(AssertionError, match="a tokenizer or model was built"):
        main(argv)
    assert run_refused(["train", "--output-dir", str(run), "--resume", "--beta", "3"], capsys).startswith(
        "error: --resume: ")


def test_resume_needs_a_checkpoint_written_with_the_same_options(tmp_path, capsys, nothing_built):
    run = tmp_path / "run"
    assert run_refused(["train", "--output-dir", str(run), "--resume"], capsys) == (
        f"error: --resume: no checkpoint in {run} to continue from (a run saves one every --save-steps steps and "
        f"when stopped with Ctrl-C)"
    )
    checkpoint = fake_checkpoint(run, 7, {"lr": None, "batch_size": 8, "bf16": True, "seed": 0})
    message = run_refused(["train", "--output-dir", str(run), "--resume", "--lr", "0.5", "--batch-size", "4"], capsys)
    assert message == (f"error: --resume: {checkpoint} was trained with --lr (not given), --batch-size 8, --bf16, "
                       f"this command has --lr 0.5, --batch-size 4, no --bf16: resume with the same options, or "
                       f"start again with --overwrite")
    argv = ["train", "--output-dir", str(run), "--resume", "--overwrite"]
    assert run_refused(argv, capsys) == ("error: --resume and --overwrite exclude each other: continue the run in "
                                         "--output-dir, or replace it")
    assert run_refused(["train", "--output-dir", str(run), "--save-steps", "-1"], capsys) == (
        "error: --save-steps must be >= 0 (0: a checkpoint only on Ctrl-C), got -1"
    )
