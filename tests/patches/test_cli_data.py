"""``python -m patches train`` inputs: data files in every accepted format, checkpoints without a tokenizer, and
the embedded tokenizer saved so that inference tokenises as training did."""
import json
import sys

import pytest
import torch
import transformers
from transformers import AutoTokenizer

import patches.default_assets
from patches.cli import main
from patches.collator import PreferenceCollator, PreferenceDataError
from patches.default_assets import build_default_tokenizer
from patches.preference_data import load_preference_records
from tests.patches.test_cli import small_jsonl, tiny_checkpoint, tiny_llama

SHORT_RUN = ["--max-steps", "1", "--batch-size", "2", "--max-length", "32", "--max-prompt-length", "16"]


def ultrafeedback(record):
    """UltraFeedback's layout of a string record: the prompt, and answers that repeat the user turn."""
    turn = {"role": "user", "content": record["prompt"]}
    return {"prompt": record["prompt"], "chosen": [turn, {"role": "assistant", "content": record["chosen"]}],
            "rejected": [turn, {"role": "assistant", "content": record["rejected"]}]}


def implicit(record):
    """TRL's implicit prompt: whole texts, the prompt being their common start."""
    return {"chosen": record["prompt"] + record["chosen"], "rejected": record["prompt"] + record["rejected"]}


def sample_records(tmp_path, n_records, layout):
    """``n_records`` shipped pairs drawn at random, in ``layout``."""
    lines = small_jsonl(tmp_path / "all.jsonl", 320).read_text(encoding="utf-8").splitlines()
    return [layout(json.loads(lines[i])) for i in torch.randperm(len(lines))[:n_records].tolist()]


def write(path, records, fmt):
    """``records`` saved as ``fmt``; returns what to pass to --data."""
    if fmt == "jsonl" or fmt == "json-lines":
        path = path.with_suffix(".jsonl" if fmt == "jsonl" else ".json")
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif fmt == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        datasets = pytest.importorskip("datasets")
        dataset = datasets.Dataset.from_list(records)
        if fmt == "parquet":
            path = path.with_suffix(".parquet")
            dataset.to_parquet(str(path))
        elif fmt == "datasets-dict":
            datasets.DatasetDict(train=dataset).save_to_disk(str(path))
        else:
            dataset.save_to_disk(str(path))
    return path


FORMATS = ["jsonl", "json", "json-lines", "parquet", "datasets", "datasets-dict"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", [ultrafeedback, implicit], ids=["ultrafeedback", "implicit"])
def test_every_format_gives_the_records_written(tmp_path, fmt, layout):
    records = sample_records(tmp_path, 5, layout)
    loaded = load_preference_records(write(tmp_path / "prefs", records, fmt))
    assert [record for _, record in loaded] == records
    labels = [label for label, _ in loaded]
    assert labels == (list(range(1, 6)) if fmt in ("jsonl", "json-lines") else [f"row {i}" for i in range(5)])


def test_rows_of_different_layouts_share_a_columnar_file(tmp_path):
    """In Parquet (and datasets) a row without a prompt has a null one: it is read as TRL's implicit prompt."""
    first, second = sample_records(tmp_path, 2, ultrafeedback)
    without_prompt = {key: value for key, value in second.items() if key != "prompt"}
    loaded = [record for _, record in load_preference_records(write(tmp_path / "p", [first, without_prompt], "parquet"))]
    assert loaded[1]["prompt"] is None
    collator = PreferenceCollator(build_default_tokenizer())
    assert [collator.tokenize(record) for record in loaded] == [collator.tokenize(first), collator.tokenize(second)]


def test_a_bad_row_is_named(tmp_path):
    records = sample_records(tmp_path, 3, ultrafeedback)
    del records[1]["rejected"]
    for fmt, where in (("json", "prefs.json:row 1"), ("parquet", "prefs.parquet:row 1")):
        with pytest.raises(PreferenceDataError, match=rf"{where}: missing key\(s\) \['rejected'\]"):
            load_preference_records(write(tmp_path / "prefs", records, fmt))


def test_datasets_folders_that_cannot_be_read_say_why(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    records = sample_records(tmp_path, 2, implicit)
    two_splits = tmp_path / "two"
    datasets.DatasetDict(train=datasets.Dataset.from_list(records), test=datasets.Dataset.from_list(records)) \
        .save_to_disk(str(two_splits))
    with pytest.raises(PreferenceDataError, match=r"splits \['train', 'test'\]; give the folder of one split"):
        load_preference_records(two_splits)
    assert [r for _, r in load_preference_records(two_splits / "test")] == records
    monkeypatch.setitem(sys.modules, "datasets", None)  # "import datasets" raises ImportError
    with pytest.raises(PreferenceDataError, match="needs the datasets package: pip install datasets"):
        load_preference_records(two_splits)


def test_cli_trains_on_ultrafeedback_parquet_and_an_implicit_prompt_datasets_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("datasets")
    monkeypatch.setattr(patches.default_assets, "build_default_model", lambda tokenizer, seed=0: tiny_llama(tokenizer))
    train = write(tmp_path / "train", sample_records(tmp_path, 4, ultrafeedback), "parquet")
    heldout = write(tmp_path / "heldout", sample_records(tmp_path, 2, implicit), "datasets")
    out = tmp_path / "run"
    assert main(["train", "--data", str(train), "--eval-data", str(heldout), "--output-dir", str(out), *SHORT_RUN]) == 0
    printed = capsys.readouterr().out
    assert f"train: 4 pairs from {train}" in printed and f"heldout: 2 pairs from {heldout}" in printed
    assert json.loads((out / "metrics.json").read_text())["data"]["pairs"] == {"train": 4, "heldout": 2}


def save_without_tokenizer(model, path):
    model.save_pretrained(path)
    assert not any(path.glob("tokenizer*")) and not (path / "vocab.json").exists()
    return path


def tiny_qwen2(vocab_size):
    """A Qwen2 checkpoint: without tokenizer files, AutoTokenizer builds one with no vocabulary instead of failing."""
    config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    return transformers.Qwen2ForCausalLM(config)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_checkpoint_without_a_tokenizer_is_refused_saying_so(tmp_path, capsys, model_type):
    vocab = len(build_default_tokenizer())
    model = tiny_qwen2(vocab) if model_type == "qwen2" else tiny_llama(build_default_tokenizer())
    checkpoint = save_without_tokenizer(model, tmp_path / "ckpt")
    data = small_jsonl(tmp_path / "train.jsonl", 4)
    assert main(["train", "--model", str(checkpoint), "--data", str(data), "--output-dir", str(tmp_path / "out"),
                 *SHORT_RUN]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: --model {checkpoint}: no tokenizer in this folder")
    assert "saved without its tokenizer; add --tokenizer PATH" in error
    assert not (tmp_path / "out").exists()


def test_tokenizer_flag_gives_the_missing_tokenizer(tmp_path, capsys):
    tokenizer_dir = tmp_path / "tokenizer"
    build_default_tokenizer().save_pretrained(tokenizer_dir)
    checkpoint = save_without_tokenizer(tiny_llama(build_default_tokenizer()), tmp_path / "ckpt")
    data = small_jsonl(tmp_path / "train.jsonl", 4)
    out = tmp_path / "out"
    argv = ["train", "--model", str(checkpoint), "--data", str(data), "--output-dir", str(out), *SHORT_RUN]
    assert main([*argv, "--tokenizer", str(tokenizer_dir)]) == 0
    assert "train: 4 pairs" in capsys.readouterr().out
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "out2")  # the first run's folder is not empty
    assert main([*argv, "--tokenizer", str(checkpoint)]) == 2  # a folder without one is named as --tokenizer's
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: --tokenizer {checkpoint}: no tokenizer in this folder")


def test_a_tokenizer_with_ids_beyond_the_models_vocabulary_is_refused_saying_so(tmp_path, capsys):
    """A --tokenizer that is not the model's (its ids reach past the embedding): one error line, no traceback from
    the embedding lookup, nothing written."""
    tokenizer_dir = tmp_path / "tokenizer"
    build_default_tokenizer().save_pretrained(tokenizer_dir)
    vocab = 40 + int(torch.randint(0, 20, ()))  # far below the tokenizer's
    checkpoint = save_without_tokenizer(tiny_qwen2(vocab), tmp_path / "ckpt")
    data = small_jsonl(tmp_path / "train.jsonl", 4)
    out = tmp_path / "out"
    assert main(["train", "--model", str(checkpoint), "--tokenizer", str(tokenizer_dir), "--data", str(data),
                 "--output-dir", str(out), *SHORT_RUN]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith(f"error: --tokenizer {tokenizer_dir}: ")
    assert f"the model's vocabulary has {vocab} tokens" in error and f"{data}" in error
    assert not out.exists()


def test_saved_embedded_tokenizer_tokenises_as_training_did(tmp_path):
    """What ``AutoTokenizer.from_pretrained(output_dir)`` gives at inference is the start of the training rows:
    the BOS, then the prompt (plain text, or rendered by the chat template)."""
    trained_with = build_default_tokenizer()
    trained_with.save_pretrained(tmp_path)  # what the CLI's trainer.save_model writes beside the model
    saved = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    collator = PreferenceCollator(trained_with, max_length=4096)
    for record in sample_records(tmp_path, 8, lambda r: r):
        feature = collator.tokenize(record)
        assert saved(record["prompt"])["input_ids"] == feature["prompt_input_ids"]
        # a generation from the prompt continues it with the answer's tokens, as trained
        assert saved(record["prompt"] + record["chosen"])["input_ids"] + [saved.eos_token_id] == (
            feature["prompt_input_ids"] + feature["chosen_input_ids"])
        conversation = ultrafeedback(record)
        chat_prompt = saved.apply_chat_template(conversation["chosen"][:1], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
        assert chat_prompt == collator.tokenize(conversation)["prompt_input_ids"]
        assert chat_prompt[0] == saved.bos_token_id and chat_prompt.count(saved.bos_token_id) == 1
