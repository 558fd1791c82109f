"""FusedCPOTrainer against TRL's own CPOTrainer: same metrics, same eval, same weights after a few steps.

Both trainers train the same tiny random Llama (vocab ~300, built here) on the first pairs of the embedded
preference data, tokenised by a byte-level BPE trained here: nothing is downloaded. Skipped without TRL,
except the test that importing the integration without TRL says what to install.
"""
import ast
import functools
import gc
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patches.fused_forward import STATE_ATTRIBUTE
from patches.trainer import PAIR_METRIC_NAMES
from tests.helpers import random_llama

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

#: keys of the Trainer's logs that measure time, not training
TIMING_KEYS = ("runtime", "per_second")
N_RECORDS = 8


@pytest.fixture(scope="module")
def trl_env():
    """TRL's classes, ours, a tiny tokenizer and dataset (skips the module's TRL tests without TRL)."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    return build_env()


def build_env():
    import datasets
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from patches.default_assets import TRAIN_FILE
    from patches.trl import FusedCPOTrainer

    records = [json.loads(line) for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines()[:N_RECORDS]]
    texts = [record[key] for record in records for key in ("prompt", "chosen", "rejected")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return dict(CPOConfig=CPOConfig, CPOTrainer=CPOTrainer, FusedCPOTrainer=FusedCPOTrainer, tokenizer=tokenizer,
                dataset=datasets.Dataset.from_list(records))


def tiny_llama(vocab_size, seed=0, **config_overrides):
    return random_llama(seed, vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        bos_token_id=0, eos_token_id=1, pad_token_id=2,
                        # logits spread over several units, so that a wrong margin or smoothing shows
                        initializer_range=0.2, **config_overrides)


def make_trainer(env, trainer_class, model=None, peft_config=None, max_steps=2, **config):
    options = dict(output_dir="unused", per_device_train_batch_size=2, per_device_eval_batch_size=2,
                   max_steps=max_steps, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                   logging_steps=1, bf16=False, use_cpu=True, gradient_checkpointing=False, report_to=[],
                   save_strategy="no", seed=0, max_length=64, disable_tqdm=True, dataloader_num_workers=0)
    options.update(config)
    model = tiny_llama(len(env["tokenizer"])) if model is None else model
    return trainer_class(model=model, args=env["CPOConfig"](**options), train_dataset=env["dataset"],
                         eval_dataset=env["dataset"].select(range(2)), processing_class=env["tokenizer"],
                         peft_config=peft_config)


def train_and_evaluate(env, trainer_class, **kwargs):
    """(log history without timings, eval metrics without timings, trained weights) of a short run."""
    trainer = make_trainer(env, trainer_class, **kwargs)
    trainer.train()
    evaluation = trainer.evaluate()

    def without_timings(logs):
        return {k: v for k, v in logs.items() if not any(key in k for key in TIMING_KEYS)}

    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return [without_timings(logs) for logs in trainer.state.log_history], without_timings(evaluation), weights


def assert_same_run(expected, actual):
    expected_logs, expected_eval, expected_weights = expected
    actual_logs, actual_eval, actual_weights = actual
    assert len(actual_logs) == len(expected_logs)
    for step, (want, got) in enumerate(zip(expected_logs + [expected_eval], actual_logs + [actual_eval])):
        # the one name TRL does not log: the count of pairs without answer tokens, with the metrics of steps
        prefix = "eval_" if "eval_loss" in want else ""
        counts = {f"{prefix}pairs/without_tokens": 0} if "loss" in want or "eval_loss" in want else {}
        assert {name: got[name] for name in got.keys() - want.keys()} == counts, f"log {step}: metric names differ"
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=2e-5, abs=2e-6), f"log {step}, {name}"
    assert actual_weights.keys() == expected_weights.keys()
    for name, weight in expected_weights.items():
        torch.testing.assert_close(actual_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)


#: every loss type of TRL's CPOTrainer and every option that changes it. AlphaPO (``alpha``) is tested with
#: length-normalised log-probs: on summed ones ``exp(logp)`` underflows to 0 in float32 and TRL's loss is NaN.
PARITY_CONFIGS = {
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=0.0),
    # gradient accumulation: both divide the micro-batch mean by the accumulation steps
    "simpo-nll-smoothing-grad-accum": dict(loss_type="simpo", beta=1.5, simpo_gamma=0.4, cpo_alpha=0.6,
                                           label_smoothing=0.2, gradient_accumulation_steps=2),
    "sigmoid": dict(loss_type="sigmoid", beta=0.3, label_smoothing=0.1),
    "hinge": dict(loss_type="hinge", beta=0.05, cpo_alpha=0.5),
    "ipo-alphapo": dict(loss_type="ipo", beta=0.4, cpo_alpha=0.0, alpha=-0.3),
    "alphapo": dict(loss_type="alphapo", beta=2.5, simpo_gamma=0.3, alpha=0.2),
}


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_matches_cpo_trainer(trl_env, name):
    config = PARITY_CONFIGS[name]
    expected = train_and_evaluate(trl_env, trl_env["CPOTrainer"], **config)
    actual = train_and_evaluate(trl_env, trl_env["FusedCPOTrainer"], **config)
    assert_same_run(expected, actual)
    logs = expected[0][0]
    assert {"rewards/chosen", "rewards/margins", "logps/chosen", "logits/rejected", "nll_loss"} <= logs.keys()
    assert "eval_rewards/accuracies" in expected[1]
    if config.get("cpo_alpha", 1.0) == 0 or config["loss_type"] == "alphapo":
        assert logs["nll_loss"] == 0.0  # TRL logs 0 and adds no NLL term when cpo_alpha == 0
    else:
        assert logs["nll_loss"] > 0.0


def answers_have_tokens(record):
    """Whether a tokenised pair still has a label token in both answers."""
    return all(any(label != -100 for label in record[f"{side}_labels"]) for side in ("chosen", "rejected"))


def test_pairs_without_answer_tokens_are_left_out_and_counted(trl_env):
    """``max_length=36`` leaves a pair no answer token (its prompt fills it): the metrics are TRL's over the other
    pairs, batch by batch, where TRL's own are NaN; ``pairs/without_tokens`` counts the pairs left out."""
    config = dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0, max_length=36)
    fused = make_trainer(trl_env, trl_env["FusedCPOTrainer"], max_steps=2, gradient_accumulation_steps=2, **config)
    trl = make_trainer(trl_env, trl_env["CPOTrainer"], **config)
    records = fused.train_dataset
    empty = [i for i, record in enumerate(records) if not answers_have_tokens(record)]
    a, b, c = [i for i, record in enumerate(records) if answers_have_tokens(record)][:3]
    assert empty, "max_length no longer truncates an answer to nothing"

    # evaluation batches of 2: (a, e) mixed, (b, c) with tokens, (e, e) without
    order = [a, empty[0], b, c, empty[0], empty[0]]
    got = fused.evaluate(records.select(order))
    trl_whole = trl.evaluate(trl.train_dataset.select(order))
    trl_batches_with_tokens = [trl.evaluate(trl.train_dataset.select(pairs)) for pairs in ([a], [b, c])]
    assert math.isnan(trl_whole["eval_rewards/chosen"])  # TRL's own mean over the pairs
    assert got["eval_pairs/without_tokens"] == 3
    for name in PAIR_METRIC_NAMES:
        want = sum(metrics[f"eval_{name}"] for metrics in trl_batches_with_tokens) / 2
        assert got[f"eval_{name}"] == pytest.approx(want, rel=2e-5, abs=2e-6), name
    for name in ("logits/chosen", "logits/rejected", "nll_loss"):  # per batch, defined for every batch
        assert got[f"eval_{name}"] == pytest.approx(trl_whole[f"eval_{name}"], rel=2e-5, abs=2e-6), name
    only_empty = fused.evaluate(records.select(empty[:1] * 2))
    assert only_empty["eval_pairs/without_tokens"] == 2
    assert all(math.isnan(only_empty[f"eval_{name}"]) for name in PAIR_METRIC_NAMES)

    # training: one epoch of 8 pairs, logged every 2 micro-batches of 2: each left-out pair counted once
    fused.train()
    logs = [entry for entry in fused.state.log_history if "loss" in entry]
    assert len(logs) == 2
    assert sum(entry["pairs/without_tokens"] for entry in logs) == len(empty)
    assert all(math.isfinite(entry[name]) for entry in logs for name in PAIR_METRIC_NAMES)


def test_gradient_checkpointing_and_no_logits(trl_env):
    """With gradient checkpointing the run is the same; lm_head never returns a (rows, T, V) tensor."""
    config = dict(loss_type="simpo", beta=2.0, cpo_alpha=0.5, gradient_checkpointing=True)
    expected = train_and_evaluate(trl_env, trl_env["CPOTrainer"], **config)

    vocab = len(trl_env["tokenizer"])
    model = tiny_llama(vocab)
    head_outputs = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_outputs.append(output))
    actual = train_and_evaluate(trl_env, trl_env["FusedCPOTrainer"], model=model, **config)
    assert_same_run(expected, actual)
    assert head_outputs, "lm_head's hooks must still run (FSDP relies on them)"
    for output in head_outputs:
        tensors = output if isinstance(output, tuple) else (output,)
        assert all(not (isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[-1] == vocab) for t in tensors)


def test_lora_matches_cpo_trainer(trl_env):
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])

    config = dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.2, learning_rate=0.5)
    expected = train_and_evaluate(trl_env, trl_env["CPOTrainer"], peft_config=lora(), **config)
    actual = train_and_evaluate(trl_env, trl_env["FusedCPOTrainer"], peft_config=lora(), **config)
    assert all("lora_" in name for name in actual[2]), "only the adapters train"
    assert_same_run(expected, actual)


def test_bf16_autocast_agrees_with_cpo_trainer(trl_env):
    """bf16 mixed precision: TRL rounds its logits to bf16, the fused loss keeps float32 statistics."""
    config = dict(loss_type="simpo", beta=2.0, cpo_alpha=0.5, bf16=True, max_steps=1)
    first_logs = []
    for trainer_class in (trl_env["CPOTrainer"], trl_env["FusedCPOTrainer"]):
        trainer = make_trainer(trl_env, trainer_class, **config)
        trainer.train()
        first_logs.append(trainer.state.log_history[0])
    want, got = first_logs
    for name in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "nll_loss"):
        assert got[name] == pytest.approx(want[name], rel=3e-2, abs=2e-2), name


def test_constructor_is_cpo_trainers():
    pytest.importorskip("trl")
    import inspect

    from trl.experimental.cpo import CPOTrainer

    from patches.trl import FusedCPOTrainer

    assert issubclass(FusedCPOTrainer, CPOTrainer)
    ours, theirs = inspect.signature(FusedCPOTrainer).parameters, inspect.signature(CPOTrainer).parameters
    assert [name for name in ours if name != "padding_free"] == list(theirs)
    assert all(ours[name] == parameter for name, parameter in theirs.items())
    assert ours["padding_free"].kind is inspect.Parameter.KEYWORD_ONLY and ours["padding_free"].default is False


def test_padding_free_trains_as_padded_batches(trl_env):
    """padding_free=True: each batch packed into one row; the same losses, rewards, log-probs and weights."""
    config = dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.3, gradient_checkpointing=True)
    expected = train_and_evaluate(trl_env, trl_env["FusedCPOTrainer"], **config)
    model = tiny_llama(len(trl_env["tokenizer"]))
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    actual = train_and_evaluate(trl_env, functools.partial(trl_env["FusedCPOTrainer"], padding_free=True),
                                model=model, **config)
    args, kwargs = calls[0]
    assert args == () and "attention_mask" not in kwargs and kwargs["input_ids"].shape[0] == 1
    assert kwargs["position_ids"].shape == kwargs["input_ids"].shape == kwargs["labels"].shape
    # the logits means average the real tokens only: padded batches average their padding positions too
    def without(run, *names):
        logs, evaluation, weights = run
        drop = lambda metrics: {k: v for k, v in metrics.items() if not any(n in k for n in names)}  # noqa: E731
        return [drop(entry) for entry in logs], drop(evaluation), weights

    # assert_same_run expects the reference without our pairs/without_tokens (TRL's names)
    assert_same_run(without(expected, "logits/", "pairs/without_tokens"), without(actual, "logits/"))
    with pytest.raises(TypeError, match="padding_free must be a bool"):
        make_trainer(trl_env, functools.partial(trl_env["FusedCPOTrainer"], padding_free="yes"))


@pytest.mark.parametrize("config, message", [
    (dict(loss_type="kto_pair"), "loss_type='kto_pair'"),
    (dict(loss_type="dpo"), "loss_type='dpo'"),
    (dict(beta=0.0), "CPOConfig.beta > 0"),
    (dict(cpo_alpha=-0.1), "CPOConfig.cpo_alpha >= 0"),
    (dict(loss_type="simpo", label_smoothing=1.5), "CPOConfig.label_smoothing in [0, 1]"),
    (dict(beta=math.inf), "CPOConfig.beta > 0 and finite"),
    (dict(cpo_alpha=math.inf), "CPOConfig.cpo_alpha >= 0 and finite"),  # not blamed on alpha (AlphaPO's)
    (dict(loss_type="simpo", simpo_gamma=math.nan), "CPOConfig.simpo_gamma finite"),
    (dict(loss_type="alphapo", alpha=math.nan), "CPOConfig.alpha finite"),
])
def test_refuses_configs_it_would_not_compute_exactly(trl_env, config, message):
    with pytest.raises(ValueError) as error:
        make_trainer(trl_env, trl_env["FusedCPOTrainer"], **config)
    assert message in str(error.value)


def test_refuses_router_aux_loss_and_lora_on_the_head(trl_env):
    from peft import LoraConfig

    from patches.heads import UnsupportedModelError

    vocab = len(trl_env["tokenizer"])
    with pytest.raises(ValueError, match="output_router_logits"):
        make_trainer(trl_env, trl_env["FusedCPOTrainer"], model=tiny_llama(vocab, output_router_logits=True))
    with pytest.raises(UnsupportedModelError):
        make_trainer(trl_env, trl_env["FusedCPOTrainer"],
                     peft_config=LoraConfig(r=2, target_modules=["lm_head"], lora_dropout=0.0))


def test_refuses_encoder_decoder(trl_env):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(trl_env["tokenizer"]), d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                      decoder_start_token_id=2, pad_token_id=2, eos_token_id=1)
    with pytest.raises(ValueError, match="encoder-decoder"):
        make_trainer(trl_env, trl_env["FusedCPOTrainer"], model=T5ForConditionalGeneration(config))


def assert_plain_model(model, vocab_size):
    """``model`` is the HF model it was given as: no patch state, and with labels it returns what a never-patched
    model with its weights returns (the LM loss and the logits)."""
    assert STATE_ATTRIBUTE not in vars(model)
    reference = tiny_llama(vocab_size)
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(3, vocab_size, (1, 9))
    with torch.no_grad():
        got, want = model(input_ids=tokens, labels=tokens), reference(input_ids=tokens, labels=tokens)
    assert got.logits is not None, "the model's forward still computes the fused loss"
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)


class _FailingLayer:
    """Forward hook on a decoder layer that raises once armed: an exception inside the trainer's forward."""

    armed = False

    def __call__(self, module, args, output):
        if self.armed:
            raise KeyboardInterrupt("stopped mid-step")


def test_model_is_left_as_given_outside_the_trainers_forward(trl_env):
    """Construction, training (between steps), evaluation, prediction, an exception raised inside a training step
    and the trainer's collection leave the model as ``CPOTrainer`` leaves it: its own forward, loss and logits."""
    from transformers import TrainerCallback

    vocab = len(trl_env["tokenizer"])
    attributes = {}
    for trainer_class in (trl_env["CPOTrainer"], trl_env["FusedCPOTrainer"]):
        model = tiny_llama(vocab)
        failing = _FailingLayer()
        model.model.layers[-1].register_forward_hook(failing)
        trainer = make_trainer(trl_env, trainer_class, model=model, loss_type="sigmoid", cpo_alpha=0.3)
        between_steps = []

        class CheckBetweenSteps(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                between_steps.append(model(input_ids=torch.tensor([[5, 6, 7]])).logits is not None)

        trainer.add_callback(CheckBetweenSteps())
        assert_plain_model(model, vocab)
        trainer.train()
        assert between_steps == [True, True]
        assert_plain_model(model, vocab)
        trainer.evaluate()
        assert_plain_model(model, vocab)
        trainer.predict(trainer.eval_dataset)
        assert_plain_model(model, vocab)
        failing.armed = True
        with pytest.raises(KeyboardInterrupt, match="stopped mid-step"):
            trainer.train()
        failing.armed = False
        assert_plain_model(model, vocab)
        del trainer
        gc.collect()
        assert_plain_model(model, vocab)
        attributes[trainer_class.__name__] = sorted(vars(model))
    assert attributes["FusedCPOTrainer"] == attributes["CPOTrainer"]


def test_checkpoints_saved_model_pickling_and_unwrap(trl_env, tmp_path):
    """bf16 mixed precision (accelerate wraps the model's forward): checkpoints and ``save_model`` hold the trained
    weights, the model pickles, and accelerate's unwrap takes its wrapper off the plain model."""
    from transformers import LlamaForCausalLM

    vocab = len(trl_env["tokenizer"])
    trainer = make_trainer(trl_env, trl_env["FusedCPOTrainer"], output_dir=str(tmp_path), save_strategy="steps",
                           save_steps=1, bf16=True, loss_type="simpo", cpo_alpha=0.5)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    trained = trainer.model.state_dict()
    for saved in (tmp_path / "checkpoint-2", tmp_path / "final"):
        loaded = LlamaForCausalLM.from_pretrained(saved).state_dict()
        assert loaded.keys() == trained.keys()
        for name, weight in trained.items():
            torch.testing.assert_close(loaded[name], weight, rtol=0, atol=0, msg=name)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert unwrapped is trainer.model
    assert_plain_model(unwrapped, vocab)  # float32 logits again: the bf16 autocast came off
    assert_plain_model(pickle.loads(pickle.dumps(unwrapped)), vocab)


def test_a_forward_that_skips_the_patch_is_an_error_not_another_loss(trl_env):
    """If the trainer's call of the model never reaches the patched forward, the step raises instead of training
    on the model's own LM loss."""
    import contextlib

    class Unpatched(trl_env["FusedCPOTrainer"]):
        def fused_loss_patch(self, model):
            return contextlib.nullcontext(model)

    trainer = make_trainer(trl_env, Unpatched, max_steps=1)
    with pytest.raises(RuntimeError, match="did not run the fused loss"):
        trainer.train()


@pytest.mark.subprocess
def test_import_without_trl_says_what_to_install():
    """``import patches`` needs no TRL; ``import patches.trl`` without it names the pip command."""
    code = (
        "import sys; sys.modules['trl'] = None\n"  # makes 'import trl' raise ImportError
        "import patches\n"
        "try:\n"
        "    import patches.trl\n"
        "except ImportError as error:\n"
        "    print(error)\n"
        "else:\n"
        "    raise SystemExit('imported without TRL')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install trl==1.16.0" in result.stdout


def test_uses_only_the_public_api_of_the_patch():
    """patches.trl imports no private name of the patches package: the patch is driven through its public API."""
    tree = ast.parse((REPO / "patches" / "trl.py").read_text())
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("patches")
               for alias in node.names if alias.name.startswith("_")]
    assert private == []
