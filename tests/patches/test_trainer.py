"""SimPOTrainer: TRL metric names and values against a hand-computed batch, eval prefix, predict's own metrics,
cross-process reduction, pairs without answer tokens, gradient-accumulation equivalence, fused == plain-PyTorch path."""
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from patches import apply_fused_simpo
from patches.collator import PreferenceCollator
from patches.trainer import METRIC_NAMES, PAIR_METRIC_NAMES, PAIRS_WITHOUT_TOKENS, SimPOTrainer
from tests.distributed.launcher import end_worker, run_torchrun
from tests.helpers import random_llama

VOCAB = 53
OPTIONS = dict(beta=1.7, gamma=0.4, alpha=0.3, label_smoothing=0.1, compute_nll_loss=True)
TOKENIZER = types.SimpleNamespace(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_llama(seed=0, num_hidden_layers=2):
    return random_llama(seed, torch.float64, vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                        num_hidden_layers=num_hidden_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        initializer_range=0.3)


def random_pairs(n_pairs, generator_seed=0):
    """Tokenized preference features of varied lengths (what PreferenceCollator.tokenize returns)."""
    g = torch.Generator().manual_seed(generator_seed)

    def tokens(low, high):
        return torch.randint(3, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_input_ids": [1] + tokens(1, 5), "chosen_input_ids": tokens(1, 7) + [2],
             "rejected_input_ids": tokens(1, 7) + [2]} for _ in range(n_pairs)]


def training_arguments(tmp_path, **arguments):
    """CPU, no saving or reporting, a log every step, constant learning rate, no clipping unless overridden."""
    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                    logging_steps=1, max_grad_norm=0.0, lr_scheduler_type="constant")
    return TrainingArguments(**{**defaults, **arguments})


def make_trainer(tmp_path, model, use_fused_loss=True, train_dataset=None, simpo_options=OPTIONS, collator=None,
                 **arguments):
    return SimPOTrainer(model=model, args=training_arguments(tmp_path, **arguments), use_fused_loss=use_fused_loss,
                        train_dataset=train_dataset,
                        data_collator=collator or PreferenceCollator(TOKENIZER, max_length=64), **simpo_options)


def without_answer_tokens(batch, chosen=(), rejected=()):
    """``batch`` with the given pairs' chosen / rejected answers left with no label to predict.

    A chosen row keeps a label at position 0, which no position predicts: it is empty only after the shift.
    """
    labels = batch["labels"].clone()
    n_pairs = labels.shape[0] // 2
    for row in [*chosen, *(n_pairs + i for i in rejected)]:
        labels[row] = -100
        if row < n_pairs:
            labels[row, 0] = batch["input_ids"][row, 0]
    return {**batch, "labels": labels}


def hand_metrics(model, batch, beta, gamma, alpha, label_smoothing, compute_nll_loss):
    """TRL's CPO/SimPO metrics written out token by token in float64 from the model's full logits.

    A pair whose chosen or rejected row has no label to predict adds zero loss (the mean still divides by all
    pairs) and is left out of the per-pair metrics (NaN when no pair is left); ``pairs/without_tokens`` counts them.
    """
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"]
    rows, length = labels.shape
    n_pairs = rows // 2
    row_logps, chosen_token_logps = [], []
    for r in range(rows):
        logps = [torch.log_softmax(logits[r, t], dim=-1)[labels[r, t + 1]].item()
                 for t in range(length - 1) if labels[r, t + 1] != -100]
        row_logps.append(sum(logps) / len(logps) if logps else None)
        if r < n_pairs:
            chosen_token_logps += logps
    pairs = [(c, r) for c, r in zip(row_logps[:n_pairs], row_logps[n_pairs:]) if c is not None and r is not None]
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
    log_sigmoid = lambda z: -math.log1p(math.exp(-z))  # noqa: E731
    losses = [(1 - label_smoothing) * -log_sigmoid(beta * (c - r) - gamma)
              + label_smoothing * -log_sigmoid(-(beta * (c - r) - gamma)) for c, r in pairs]
    nll = -sum(chosen_token_logps) / max(len(chosen_token_logps), 1)
    mean = lambda values: sum(values) / len(values) if values else math.nan  # noqa: E731
    return {
        "loss": sum(losses) / n_pairs + (alpha * nll if compute_nll_loss else 0.0),
        "rewards/chosen": beta * mean(chosen),
        "rewards/rejected": beta * mean(rejected),
        "rewards/accuracies": mean([float(c > r) for c, r in pairs]),
        "rewards/margins": beta * mean([c - r for c, r in pairs]),
        "logps/chosen": mean(chosen),
        "logps/rejected": mean(rejected),
        "logits/chosen": logits[:n_pairs].mean().item(),
        "logits/rejected": logits[n_pairs:].mean().item(),
        "nll_loss": nll if compute_nll_loss else 0.0,
        PAIRS_WITHOUT_TOKENS: n_pairs - len(pairs),
    }


@pytest.mark.parametrize("use_fused_loss", [True, False], ids=["fused", "from_logits"])
def test_logged_metrics_equal_hand_computed_batch(tmp_path, use_fused_loss):
    collator = PreferenceCollator(TOKENIZER, max_length=64)
    batches = [collator(random_pairs(5, seed)) for seed in (1, 2)]
    trainer = make_trainer(tmp_path, tiny_llama(), use_fused_loss)
    model = trainer.model.train()
    expected = [hand_metrics(model, batch, **OPTIONS) for batch in batches]
    assert 0.0 < sum(e["rewards/accuracies"] for e in expected) < 2.0, "accuracy ties at 0 or 1 prove little"

    losses = [trainer.compute_loss(model, batch) for batch in batches]
    for loss, hand in zip(losses, expected):
        assert loss.item() == pytest.approx(hand["loss"], rel=1e-9)
    trainer.log({"loss": sum(loss.item() for loss in losses) / 2})
    logged = trainer.state.log_history[-1]
    assert set(METRIC_NAMES) <= set(logged)
    for name in METRIC_NAMES:  # the mean over the batches seen since the last log, as TRL logs it
        assert logged[name] == pytest.approx((expected[0][name] + expected[1][name]) / 2, rel=1e-9, abs=1e-12), name


def test_evaluation_metrics_are_eval_prefixed(tmp_path):
    pairs = random_pairs(6, 3)
    trainer = make_trainer(tmp_path, tiny_llama(), per_device_eval_batch_size=6)
    hand = hand_metrics(trainer.model.eval(), PreferenceCollator(TOKENIZER, max_length=64)(pairs), **OPTIONS)
    metrics = trainer.evaluate(pairs)
    assert metrics["eval_loss"] == pytest.approx(hand["loss"], rel=1e-9)
    for name in METRIC_NAMES:
        assert metrics[f"eval_{name}"] == pytest.approx(hand[name], rel=1e-9, abs=1e-12), name
        assert name not in trainer.state.log_history[-1]
    custom = trainer.evaluate(pairs, metric_key_prefix="heldout")
    assert custom["heldout_rewards/margins"] == pytest.approx(hand["rewards/margins"], rel=1e-9)


def test_predict_reports_its_own_metrics_and_leaves_evaluate_alone(tmp_path):
    pairs = random_pairs(12, 13)
    trainer = make_trainer(tmp_path, tiny_llama(), per_device_eval_batch_size=8)
    hand = hand_metrics(trainer.model.eval(), PreferenceCollator(TOKENIZER, max_length=64)(pairs[4:]), **OPTIONS)
    alone = trainer.evaluate(pairs[:4])
    predicted = trainer.predict(pairs[4:]).metrics
    after_predict = trainer.evaluate(pairs[:4])
    for name in ("loss", *METRIC_NAMES, PAIRS_WITHOUT_TOKENS):
        assert after_predict[f"eval_{name}"] == alone[f"eval_{name}"], name
    assert predicted["test_loss"] == pytest.approx(hand["loss"], rel=1e-9)
    for name in METRIC_NAMES:  # predict's 8 pairs are one batch
        assert predicted[f"test_{name}"] == pytest.approx(hand[name], rel=1e-9, abs=1e-12), name
    assert not any(key.startswith("eval_") for key in predicted)
    custom = trainer.predict(pairs[4:], metric_key_prefix="heldout").metrics
    assert custom["heldout_rewards/margins"] == pytest.approx(hand["rewards/margins"], rel=1e-9)
    assert trainer.evaluate(pairs[:4])["eval_rewards/margins"] == alone["eval_rewards/margins"]


def test_metrics_and_masks_are_gathered_across_processes(tmp_path, monkeypatch):
    collator = PreferenceCollator(TOKENIZER, max_length=64)
    pairs = {"here": random_pairs(4, 4), "other": random_pairs(4, 9)}
    # the other process has two pairs without answer tokens, this one none
    batches = {"here": collator(pairs["here"]),
               "other": without_answer_tokens(collator(pairs["other"]), chosen=[1], rejected=[3])}
    both = without_answer_tokens(collator(pairs["here"] + pairs["other"]), chosen=[4 + 1], rejected=[4 + 3])
    trainer = make_trainer(tmp_path, tiny_llama())
    model = trainer.model.eval()
    with torch.no_grad():
        outputs = {name: trainer.simpo_forward(model, batch) for name, batch in batches.items()}
    sent_by_other = []
    monkeypatch.setattr(trainer.accelerator, "gather_for_metrics", lambda t: sent_by_other.append(t) or t)
    trainer.batch_totals(outputs["other"], batches["other"]["labels"])
    # two processes: this one's tensor, then the other's (the collectives run in the same order on both)
    monkeypatch.setattr(trainer.accelerator, "gather_for_metrics", lambda t: torch.cat([t, sent_by_other.pop(0)]))
    reduced = trainer.batch_metrics(outputs["here"], batches["here"]["labels"])
    assert not sent_by_other

    hand_both = hand_metrics(model, both, **OPTIONS)
    for name in PAIR_METRIC_NAMES:  # means over the 6 pairs with tokens of both processes
        assert reduced[name] == pytest.approx(hand_both[name], rel=1e-9, abs=1e-12), name
    hand = {name: hand_metrics(model, batch, **OPTIONS) for name, batch in batches.items()}
    for name in ("logits/chosen", "logits/rejected", "nll_loss"):  # one value per process
        assert reduced[name] == pytest.approx((hand["here"][name] + hand["other"][name]) / 2, rel=1e-9), name
    assert reduced[PAIRS_WITHOUT_TOKENS] == 2


@pytest.mark.parametrize("use_fused_loss", [True, False], ids=["fused", "from_logits"])
def test_pairs_without_answer_tokens_are_left_out_of_the_pair_metrics(tmp_path, use_fused_loss):
    collator = PreferenceCollator(TOKENIZER, max_length=64)
    pairs = [random_pairs(5, 1), random_pairs(5, 2)]
    batches = [without_answer_tokens(collator(pairs[0]), chosen=[0], rejected=[2]),
               without_answer_tokens(collator(pairs[1]), rejected=[1])]
    window = without_answer_tokens(collator(pairs[0] + pairs[1]), chosen=[0], rejected=[2, 5 + 1])
    trainer = make_trainer(tmp_path, tiny_llama(), use_fused_loss)
    model = trainer.model.train()
    expected = [hand_metrics(model, batch, **OPTIONS) for batch in batches]
    expected_window = hand_metrics(model, window, **OPTIONS)

    losses = [trainer.compute_loss(model, batch) for batch in batches]
    for loss, hand in zip(losses, expected):  # such a pair adds zero loss; the mean divides by every pair
        assert loss.item() == pytest.approx(hand["loss"], rel=1e-9)
    trainer.log({"loss": sum(loss.item() for loss in losses) / 2})
    logged = trainer.state.log_history[-1]
    assert logged[PAIRS_WITHOUT_TOKENS] == 3
    for name in PAIR_METRIC_NAMES:  # over the 7 pairs with tokens in the window
        assert logged[name] == pytest.approx(expected_window[name], rel=1e-9, abs=1e-12), name
    for name in ("logits/chosen", "logits/rejected", "nll_loss"):
        assert logged[name] == pytest.approx((expected[0][name] + expected[1][name]) / 2, rel=1e-9), name
    # the empty chosen row's log-prob 0 would have beaten its rejected row: it is no win, it is left out
    assert 0.0 < logged["rewards/accuracies"] < 1.0


@pytest.mark.parametrize("use_fused_loss", [True, False], ids=["fused", "from_logits"])
def test_a_window_without_any_pair_with_tokens_logs_nan_pair_metrics(tmp_path, use_fused_loss):
    batch = without_answer_tokens(PreferenceCollator(TOKENIZER, max_length=64)(random_pairs(3, 5)),
                                  chosen=[0, 2], rejected=[1, 2])
    trainer = make_trainer(tmp_path, tiny_llama(), use_fused_loss)
    model = trainer.model.train()
    hand = hand_metrics(model, batch, **OPTIONS)
    assert trainer.compute_loss(model, batch).item() == pytest.approx(hand["loss"], rel=1e-9)  # the NLL term only
    trainer.log({"loss": hand["loss"]})
    logged = trainer.state.log_history[-1]
    assert logged[PAIRS_WITHOUT_TOKENS] == 3
    for name in PAIR_METRIC_NAMES:
        assert math.isnan(logged[name]), name
    for name in ("logits/chosen", "logits/rejected", "nll_loss"):
        assert logged[name] == pytest.approx(hand[name], rel=1e-9), name


def test_evaluation_counts_pairs_without_tokens_under_its_prefix(tmp_path):
    collator = PreferenceCollator(TOKENIZER, max_length=64)
    pairs = random_pairs(6, 7)

    def collate_with_an_empty_chosen_answer(features):
        return without_answer_tokens(collator(features), chosen=[0])

    trainer = make_trainer(tmp_path, tiny_llama(), collator=collate_with_an_empty_chosen_answer,
                           per_device_eval_batch_size=3)
    hand = hand_metrics(trainer.model.eval(), without_answer_tokens(collator(pairs), chosen=[0, 3]), **OPTIONS)
    for prefix in ("eval", "heldout"):
        metrics = trainer.evaluate(pairs, metric_key_prefix=prefix)
        assert metrics[f"{prefix}_{PAIRS_WITHOUT_TOKENS}"] == 2  # one per batch of 3
        for name in PAIR_METRIC_NAMES:
            assert metrics[f"{prefix}_{name}"] == pytest.approx(hand[name], rel=1e-9, abs=1e-12), name
    assert PAIRS_WITHOUT_TOKENS not in trainer.state.log_history[-1]


DISTRIBUTED_PAIRS = dict(n_pairs=4, generator_seed=8)


def distributed_worker(output_dir):
    """Under torchrun (2 CPU processes, gloo): evaluate 4 pairs, 2 per rank; each rank writes what it logged."""
    trainer = make_trainer(Path(output_dir), tiny_llama(seed=2), per_device_eval_batch_size=2)
    metrics = trainer.evaluate(random_pairs(**DISTRIBUTED_PAIRS))
    rank = trainer.args.process_index
    (Path(output_dir) / f"rank{rank}.json").write_text(json.dumps({"world": trainer.args.world_size, **metrics}))
    end_worker()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.subprocess
def test_two_processes_log_the_global_metrics(tmp_path):
    run_torchrun([__file__, str(tmp_path)], timeout=240)
    logged = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert logged[0]["world"] == 2
    # one process, the 4 pairs in one batch: per-pair metrics are means over all pairs of both ranks
    batch = PreferenceCollator(TOKENIZER, max_length=64)(random_pairs(**DISTRIBUTED_PAIRS))
    hand = hand_metrics(tiny_llama(seed=2).eval(), batch, **OPTIONS)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        for rank_logs in logged:
            assert rank_logs[f"eval_{name}"] == pytest.approx(hand[name], rel=1e-9, abs=1e-12), name
    for name in METRIC_NAMES:  # batch-level ones (logits means, nll) too: every rank logs the same value
        assert logged[0][f"eval_{name}"] == pytest.approx(logged[1][f"eval_{name}"], rel=1e-12), name


def one_sgd_step(tmp_path, pairs, batch_size, grad_accum, use_fused_loss):
    model = tiny_llama(seed=7)
    # The SimPO loss is a mean over pairs: exact under accumulation of equal micro-batches. The optional NLL
    # term is a per-micro-batch token mean (as in TRL's CPOTrainer), so it is left out here.
    trainer = make_trainer(tmp_path, model, use_fused_loss, train_dataset=pairs, simpo_options={**OPTIONS, "compute_nll_loss": False},
                           per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                           max_steps=1, learning_rate=0.5, optim="sgd")
    trainer.train()
    logged_loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return {name: p.detach().clone() for name, p in model.named_parameters()}, logged_loss


@pytest.mark.parametrize("use_fused_loss", [True, False], ids=["fused", "from_logits"])
def test_gradient_accumulation_gives_the_big_batch_update(tmp_path, use_fused_loss):
    # from_logits: the unpatched Llama forward takes **kwargs, so the Trainer alone would not divide by GA
    pairs = random_pairs(6, 5)  # one step consumes all of them in both runs, whatever the shuffle
    before = {name: p.detach().clone() for name, p in tiny_llama(seed=7).named_parameters()}
    big, big_loss = one_sgd_step(tmp_path / "big", pairs, 6, 1, use_fused_loss)
    accumulated, accumulated_loss = one_sgd_step(tmp_path / "ga", pairs, 3, 2, use_fused_loss)
    assert accumulated_loss == pytest.approx(big_loss, rel=1e-9)
    for name in big:
        assert not torch.equal(big[name], before[name]), f"{name} was not updated"
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-10, atol=1e-12, msg=name)


def plain_trainer(tmp_path, model, pairs, batch_size, grad_accum):
    """A plain ``transformers.Trainer`` set up for one SGD step over ``pairs`` in ``[chosen; rejected]`` batches."""
    # a max_grad_norm no gradient reaches: nothing is clipped, but the Trainer logs the gradient norm
    args = training_arguments(tmp_path, remove_unused_columns=False, per_device_train_batch_size=batch_size,
                              gradient_accumulation_steps=grad_accum, max_steps=1, learning_rate=0.5, optim="sgd",
                              max_grad_norm=1e9)
    return Trainer(model=model, args=args, train_dataset=pairs,
                   data_collator=PreferenceCollator(TOKENIZER, max_length=64))


def trained(trainer):
    """Train; the logged loss and gradient norm of the (single) step and the weights after it."""
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return logged["loss"], logged["grad_norm"], parameters(trainer.model)


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_plain_hf_trainer_accumulates_to_the_big_batch_update_in_either_patch_order(tmp_path):
    pairs = random_pairs(4, 12)  # one step consumes all of them in every run, whatever the shuffle
    initial = parameters(tiny_llama(seed=7))
    big_loss, big_grad_norm, big_weights = trained(
        plain_trainer(tmp_path / "big", apply_fused_simpo(tiny_llama(seed=7).float()), pairs, 4, 1))
    assert all(not torch.equal(big_weights[name], initial[name].float()) for name in initial)

    patched_first = plain_trainer(tmp_path / "first", apply_fused_simpo(tiny_llama(seed=7).float()), pairs, 2, 2)
    assert patched_first.model_accepts_loss_kwargs is False
    patched_after = plain_trainer(tmp_path / "after", tiny_llama(seed=7).float(), pairs, 2, 2)
    apply_fused_simpo(patched_after.model)
    # decided from the unpatched forward's **kwargs: pass num_items_in_batch, skip the division by the GA steps
    assert patched_after.model_accepts_loss_kwargs is True
    with pytest.raises(ValueError, match=r"num_items_in_batch .* trainer\.model_accepts_loss_kwargs = False"):
        patched_after.train()  # refused at the first micro-batch, before any update
    assert all(torch.equal(p, initial[name].float()) for name, p in parameters(patched_after.model).items())
    patched_after.model_accepts_loss_kwargs = False  # what the error says to do

    for trainer in (patched_first, patched_after):
        loss, grad_norm, weights = trained(trainer)
        assert loss == pytest.approx(big_loss, rel=1e-6)
        assert grad_norm == pytest.approx(big_grad_norm, rel=1e-5)
        for name, value in weights.items():
            torch.testing.assert_close(value, big_weights[name], msg=name)


def logged_training_losses(tmp_path, **arguments):
    """Per-step losses of 3 SGD steps on 6 pairs, fused loss, float32 (what compiled training runs in)."""
    # one layer, every batch of one shape: a single compiled graph, so the test stays quick
    pairs = [{key: ids[:2] for key, ids in pair.items()} for pair in random_pairs(6, 11)]
    trainer = make_trainer(tmp_path, tiny_llama(seed=4, num_hidden_layers=1).float(), train_dataset=pairs,
                           per_device_train_batch_size=2, max_steps=3, learning_rate=0.5, optim="sgd", **arguments)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_torch_compile_trains_with_the_same_losses(tmp_path):
    plain = logged_training_losses(tmp_path / "plain")
    # aot_eager: dynamo and AOT autograd trace the patched model's forward and backward, no compiler to wait for
    compiled = logged_training_losses(tmp_path / "compiled", torch_compile=True, torch_compile_backend="aot_eager")
    assert len(plain) == 3 and plain[-1] != plain[0]  # the steps changed the model
    assert compiled == pytest.approx(plain, rel=1e-4, abs=1e-6)


def test_no_patch_path_reverts_the_patch_and_matches_fused_gradients(tmp_path):
    batch = PreferenceCollator(TOKENIZER, max_length=64)(random_pairs(4, 6))
    grads = {}
    for fused in (True, False):
        trainer = make_trainer(tmp_path, tiny_llama(seed=3), use_fused_loss=fused)
        model = trainer.model.train()
        assert ("_fused_simpo_state" in model.__dict__) == fused
        trainer.compute_loss(model, batch).backward()
        grads[fused] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads[True].items():
        torch.testing.assert_close(grads[False][name], grad, rtol=1e-9, atol=1e-12, msg=name)


if __name__ == "__main__":
    distributed_worker(sys.argv[1])
