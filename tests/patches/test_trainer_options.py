"""SimPOTrainer option checks: a bad option raises, naming it, before the model is patched or reverted."""
import math

import pytest
from transformers import TrainingArguments

from patches import apply_fused_simpo, patched_loss_fn
from patches.trainer import SimPOTrainer

BAD_OPTIONS = [
    ("compute_nll_loss", "False", TypeError),
    ("compute_nll_loss", 1, TypeError),
    ("chunk_size", 0, ValueError),
    ("chunk_size", 2.0, TypeError),
    ("beta", -2, ValueError),
    ("beta", 0.0, ValueError),
    ("gamma", math.nan, TypeError),
    ("alpha", -0.5, ValueError),
    ("label_smoothing", 2, ValueError),
    ("compiled", "yes", TypeError),
    ("ignore_index", -100.0, TypeError),
    ("use_fused_loss", "yes", TypeError),
    ("use_fused_loss", 1, TypeError),
]


def training_arguments(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no")


@pytest.mark.parametrize("name, value, error", BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v, _ in BAD_OPTIONS])
def test_bad_option_raises_naming_it_and_leaves_the_model_unpatched(tmp_path, tiny_model, name, value, error):
    model = tiny_model("llama")
    before = dict(model.__dict__)
    with pytest.raises(error, match=f"^{name} must"):
        SimPOTrainer(model, training_arguments(tmp_path), **{name: value})
    assert model.__dict__ == before  # no forward, state or accepts_loss_kwargs set
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("use_fused_loss", [True, False])
def test_bad_option_keeps_an_earlier_patch_and_its_options(tmp_path, tiny_model, use_fused_loss):
    model = apply_fused_simpo(tiny_model("llama"), beta=3.0, chunk_size=2)
    loss_fn, forward = patched_loss_fn(model), model.forward
    with pytest.raises(ValueError, match="^beta must be > 0"):
        SimPOTrainer(model, training_arguments(tmp_path), beta=-2, use_fused_loss=use_fused_loss)
    # neither re-patched with other options nor reverted by the comparison path
    assert patched_loss_fn(model) is loss_fn and model.forward == forward
    assert (loss_fn.beta, loss_fn.chunk_size) == (3.0, 2)


def test_good_options_reach_the_patched_loss(tmp_path, tiny_model):
    options = dict(beta=1.5, gamma=0.3, alpha=0.2, label_smoothing=0.1, compute_nll_loss=True, chunk_size=3,
                   compiled=False, ignore_index=-1)
    trainer = SimPOTrainer(tiny_model("llama"), training_arguments(tmp_path), **options)
    loss_fn = patched_loss_fn(trainer.model)
    assert {name: getattr(loss_fn, name) for name in options} == options
    assert trainer.options.as_dict() == options


@pytest.mark.parametrize("use_fused_loss", [True, False])
def test_models_from_model_init_are_patched_like_a_given_model(tmp_path, tiny_model, use_fused_loss):
    made = []

    def model_init():  # an already patched model: the comparison path must take the patch off
        made.append(apply_fused_simpo(tiny_model("llama"), beta=9.0))
        return made[-1]

    trainer = SimPOTrainer(args=training_arguments(tmp_path), model_init=model_init, beta=1.5, chunk_size=2,
                           use_fused_loss=use_fused_loss)
    fresh = trainer.call_model_init()  # what train() uses for each run (and hyperparameter trial)
    assert made == [trainer.model, fresh] and fresh is not trainer.model
    for model in made:
        loss_fn = patched_loss_fn(model)
        if use_fused_loss:
            assert (loss_fn.beta, loss_fn.chunk_size) == (1.5, 2)
        else:
            assert loss_fn is None and "forward" not in model.__dict__
