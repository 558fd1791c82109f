"""Checks of ``python -m patches train``'s arguments that read no data and build no model.

A failed check raises :class:`CLIError`, which the CLI prints as one ``error:`` line naming the flag.
"""
import argparse
import math
import os
import tempfile
from pathlib import Path


class CLIError(Exception):
    """A user error: printed as ``error: <message>``, exit status 2, no traceback."""


#: the SimPO options set on the command line, with their flags
SIMPO_FLAGS = {"beta": "--beta", "gamma": "--gamma", "alpha": "--alpha", "label_smoothing": "--label-smoothing",
               "chunk_size": "--chunk-size"}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _check_finite_positive(args: argparse.Namespace, name: str) -> None:
    value = getattr(args, name)
    if not (math.isfinite(value) and value > 0):
        raise CLIError(f"{_flag(name)} must be a finite number > 0, got {value}")


def _check_numbers(args: argparse.Namespace) -> None:
    """Sizes, step counts, learning rate and seed (the SimPO options are :func:`simpo_options`' part)."""
    for name in ("batch_size", "grad_accum", "max_length"):
        if getattr(args, name) < 1:
            raise CLIError(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.max_prompt_length is None and args.max_length < 2:
        raise CLIError(f"--max-length must be >= 2 (a prompt token and an answer token), got {args.max_length}")
    if args.max_prompt_length is not None and not 1 <= args.max_prompt_length < args.max_length:
        raise CLIError(f"--max-prompt-length must be >= 1 and below --max-length ({args.max_length}), "
                       f"got {args.max_prompt_length}")
    if args.max_steps < 1 and args.max_steps != -1:
        raise CLIError(f"--max-steps must be > 0, or -1 to train for --epochs, got {args.max_steps}")
    _check_finite_positive(args, "epochs")
    if args.lr is not None:
        _check_finite_positive(args, "lr")
    if not 0 <= args.seed < 2**32:
        raise CLIError(f"--seed must be in [0, 2**32), got {args.seed}")
    if getattr(args, "padding_free", False) and args.no_patch:
        raise CLIError("--padding-free needs the fused loss: drop --no-patch (which computes the loss from padded "
                       "logits)")


def _check_paths(args: argparse.Namespace) -> None:
    """Input files and the model folder exist; the output folder can be made (no file in its way)."""
    from patches.cli_tokenizer import check_tokenizer_args
    from patches.preference_data import data_path_problem

    for name in ("data", "eval_data"):
        path = getattr(args, name)
        problem = None if path is None else data_path_problem(path)
        if problem is not None:
            raise CLIError(f"{_flag(name)} {path}: {problem}")
    check_tokenizer_args(args)
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise CLIError(f"--model {args.model}: not a local HF checkpoint folder (no config.json)")
    output_dir = Path(args.output_dir)
    for path in (output_dir, *output_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == output_dir else f" ({path} is a file)"
                raise CLIError(f"--output-dir {output_dir}: not a folder{where}")
            _check_takes_new_folders(path, output_dir)
            break


def _check_takes_new_folders(folder: Path, output_dir: Path) -> None:
    """The nearest existing folder of ``--output-dir`` takes a new folder (the Trainer creates the rest when it is
    built, after the model): tried for real, since permissions alone say nothing for root or on /proc."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".patches-write-check-", dir=folder))
    except OSError as error:
        raise CLIError(f"--output-dir {output_dir}: cannot create it in {folder} ({error.strerror})") from None


def simpo_options(args: argparse.Namespace):
    """The run's :class:`SimPOOptions` (which checks them); an out-of-range value is an error naming its flag."""
    from patches.options import SimPOOptions

    values = {name: getattr(args, name) for name in SIMPO_FLAGS}
    for name, flag in SIMPO_FLAGS.items():
        try:
            SimPOOptions(**{name: values[name]})  # one at a time, to name the flag
        except (TypeError, ValueError) as error:
            raise CLIError(f"{flag}: {error}") from None
    return SimPOOptions(**values, compute_nll_loss=args.alpha > 0)


def check_args(args: argparse.Namespace):
    """Every check that reads no data and builds no model; returns the SimPO options."""
    _check_numbers(args)
    _check_paths(args)
    return simpo_options(args)
