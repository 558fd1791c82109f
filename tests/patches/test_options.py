"""SimPOOptions is the one source of the SimPO options: every entry point's parameters, the CLI's flags and TRL's
knobs are checked against its fields, names and defaults, so that a drift fails here."""
import argparse
import dataclasses
import inspect
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patches.apply import apply_fused_simpo
from patches.cli import build_parser
from patches.options import FLAG_HELP, FLAG_OPTIONS, OPTION_NAMES, SimPOOptions
from patches.trainer import SimPOTrainer, simpo_loss_from_logits

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = {field.name: field.default for field in dataclasses.fields(SimPOOptions)}


def option_parameters(function) -> dict:
    """``{name: default}`` of ``function``'s parameters that are SimPO options, in the signature's order."""
    return {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()
            if name in OPTION_NAMES}


def test_apply_fused_simpo_takes_every_option_in_order_with_its_default():
    parameters = list(inspect.signature(apply_fused_simpo).parameters.values())
    positional = {p.name: p.default for p in parameters[1:] if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}
    assert list(positional) == list(OPTION_NAMES)  # the positional order is the fields'
    assert positional == DEFAULTS


def test_simpo_trainer_takes_every_option_with_its_default():
    assert option_parameters(SimPOTrainer.__init__) == DEFAULTS


def test_the_loss_from_logits_takes_the_options_it_uses_with_their_defaults():
    parameters = option_parameters(simpo_loss_from_logits)
    assert set(parameters) == {"beta", "gamma", "alpha", "label_smoothing", "compute_nll_loss", "ignore_index"}
    assert parameters == {name: DEFAULTS[name] for name in parameters}


@pytest.mark.parametrize("name, value", [("beta", -1.0), ("beta", True), ("label_smoothing", 3.0),
                                         ("compute_nll_loss", "no"), ("ignore_index", 1.5)])
def test_the_loss_from_logits_refuses_bad_options_as_the_options_do(name, value):
    logits, labels = torch.randn(4, 5, 7), torch.randint(0, 7, (4, 5))
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must"):
        simpo_loss_from_logits(logits, labels, **{name: value})


def test_fused_cpo_trainer_knobs_default_to_the_options():
    trl = pytest.importorskip("patches.trl")
    assert (trl.FusedCPOTrainer.fused_chunk_size, trl.FusedCPOTrainer.fused_compiled) == (
        DEFAULTS["chunk_size"], DEFAULTS["compiled"])


def train_flags() -> dict:
    """``{dest: action}`` of the ``train`` command's options."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in subparsers.choices["train"]._actions}


def test_cli_flags_are_the_flagged_options_with_their_type_default_and_help():
    actions = train_flags()
    flagged = {option.name for option in FLAG_OPTIONS}
    assert {name for name in actions if name in OPTION_NAMES} == flagged
    for option in FLAG_OPTIONS:
        action = actions[option.name]
        assert action.option_strings == [f"--{option.name.replace('_', '-')}"]
        assert (action.type, action.help) == (option.type, option.metadata[FLAG_HELP])
        if option.name == "alpha":  # --alpha is the NLL weight: its default leaves the NLL term off, as the options'
            assert SimPOOptions().with_nll_weight(action.default).compute_nll_loss == DEFAULTS["compute_nll_loss"]
            assert action.default == 0.0
        else:
            assert action.default == option.default, option.name


def test_the_nll_weight_switches_the_nll_term_on_when_not_zero():
    weight = random.uniform(0.01, 2.0)
    on = SimPOOptions(beta=3.0).with_nll_weight(weight)
    assert (on.alpha, on.compute_nll_loss, on.beta) == (weight, True, 3.0)
    off = SimPOOptions(compute_nll_loss=True).with_nll_weight(0.0)
    assert (off.alpha, off.compute_nll_loss) == (0.0, False)
    with pytest.raises(ValueError, match="^alpha must be >= 0"):
        SimPOOptions().with_nll_weight(-weight)


def test_options_are_built_from_a_calls_arguments_alone():
    arguments = {"model": object(), "beta": 1.5, "chunk_size": 3, "padding_free": True}
    assert SimPOOptions.from_arguments(arguments) == SimPOOptions(beta=1.5, chunk_size=3)


@pytest.mark.subprocess
def test_the_cli_flags_are_made_without_importing_torch():
    """``python -m patches train --help`` stays quick: the options' module, which the flags come from, imports no
    torch until options are made."""
    code = "import sys, patches.cli; patches.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
