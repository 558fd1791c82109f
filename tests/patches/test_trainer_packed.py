"""SimPOTrainer with padding-free batches: the same training (losses, metrics, parameters) as padded batches."""
import pytest
import torch

from patches.collator import PreferenceCollator
from patches.trainer import METRIC_NAMES, PAIRS_WITHOUT_TOKENS, pairs_with_tokens
from tests.patches.test_trainer import OPTIONS, TOKENIZER, make_trainer, random_pairs, tiny_llama


def train(tmp_path, pairs, padding_free=False):
    model = tiny_llama(seed=3)
    trainer = make_trainer(tmp_path, model, train_dataset=pairs, simpo_options={**OPTIONS, "padding_free": padding_free},
                           per_device_train_batch_size=3, max_steps=2, learning_rate=0.3, optim="sgd")
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_padding_free_training_equals_padded_training(tmp_path):
    pairs = random_pairs(6, 9)
    pairs[1]["rejected_input_ids"] = []  # an empty answer: that pair adds no loss and is left out of the metrics
    padded_logs, padded_params = train(tmp_path / "padded", pairs)
    packed_logs, packed_params = train(tmp_path / "packed", pairs, padding_free=True)
    assert len(packed_logs) == len(padded_logs) == 2
    for packed, padded in zip(packed_logs, padded_logs):
        for name in ("loss", *METRIC_NAMES[:6], "nll_loss", PAIRS_WITHOUT_TOKENS):  # logits means differ: no pads
            assert packed[name] == pytest.approx(padded[name], rel=1e-9, abs=1e-12), name
    assert sum(entry[PAIRS_WITHOUT_TOKENS] for entry in packed_logs) == 1
    for name, value in packed_params.items():
        torch.testing.assert_close(value, padded_params[name], rtol=1e-9, atol=1e-12, msg=name)


def test_pairs_with_tokens_of_a_packed_batch():
    pairs = random_pairs(3, 2)
    pairs[2]["chosen_input_ids"] = []
    padded = PreferenceCollator(TOKENIZER, max_length=64)(pairs)
    packed = PreferenceCollator(TOKENIZER, max_length=64, padding_free=True)(pairs)
    expected = pairs_with_tokens(padded["labels"])
    assert expected.tolist() == [True, True, False]
    assert torch.equal(pairs_with_tokens(packed["labels"], position_ids=packed["position_ids"]), expected)


def test_padding_free_needs_a_preference_collator_and_the_fused_loss(tmp_path):
    with pytest.raises(TypeError, match="padding_free=True needs data_collator=PreferenceCollator"):
        make_trainer(tmp_path, tiny_llama(), simpo_options={"padding_free": True}, collator=lambda f: f)
    with pytest.raises(ValueError, match="padding_free=True needs use_fused_loss=True"):
        make_trainer(tmp_path, tiny_llama(), simpo_options={"padding_free": True}, use_fused_loss=False)


def test_cli_padding_free_trains_as_the_padded_run(tmp_path, capsys, monkeypatch):
    import json

    from patches import varlen
    from patches.cli import main
    from tests.patches.test_cli import small_jsonl, tiny_checkpoint

    attention_calls = []
    packed_attention = varlen.packed_attention
    monkeypatch.setattr(varlen, "packed_attention",
                        lambda *a, **k: attention_calls.append(1) or packed_attention(*a, **k))

    checkpoint, data = tiny_checkpoint(tmp_path / "ckpt"), small_jsonl(tmp_path / "train.jsonl", 6)
    common = ["train", "--model", str(checkpoint), "--data", str(data), "--max-steps", "2", "--batch-size", "3",
              "--lr", "3e-2", "--max-length", "24", "--max-prompt-length", "8"]
    histories = {}
    for flag in ([], ["--padding-free"]):
        out = tmp_path / ("packed" if flag else "padded")
        assert main([*common, "--output-dir", str(out), *flag]) == 0
        result = json.loads((out / "metrics.json").read_text())
        histories[bool(flag)] = [entry for entry in result["log_history"] if "loss" in entry]
        assert bool(attention_calls) == bool(flag)  # --padding-free: the variable-length attention path
    assert result["config"]["padding_free"] is True
    for packed, padded in zip(histories[True], histories[False]):
        for name in ("loss", "rewards/margins", "logps/chosen", "nll_loss"):
            assert packed[name] == pytest.approx(padded[name], rel=2e-4, abs=1e-5), name
    assert main([*common, "--output-dir", str(tmp_path / "x"), "--padding-free", "--no-patch"]) == 2
    assert "--padding-free needs the fused loss" in capsys.readouterr().err
