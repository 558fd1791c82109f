"""Checks of ``python -m patches train``'s arguments that read no data and build no model.

A failed check raises :class:`CLIError`, which the CLI prints as one ``error:`` line naming the flag.
"""
import argparse
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional


class CLIError(Exception):
    """A user error: printed as ``error: <message>``, exit status 2, no traceback."""


def flag_of(name: str) -> str:
    """The flag of an option: ``--label-smoothing`` for ``label_smoothing``."""
    return f"--{name.replace('_', '-')}"


def _check_finite_positive(args: argparse.Namespace, name: str) -> None:
    value = getattr(args, name)
    if not (math.isfinite(value) and value > 0):
        raise CLIError(f"{flag_of(name)} must be a finite number > 0, got {value}")


def _check_numbers(args: argparse.Namespace) -> None:
    """Sizes, step counts, learning rate and seed (the SimPO options are :func:`simpo_options`' part)."""
    for name in ("batch_size", "grad_accum", "max_length"):
        if getattr(args, name) < 1:
            raise CLIError(f"{flag_of(name)} must be >= 1, got {getattr(args, name)}")
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
            raise CLIError(f"{flag_of(name)} {path}: {problem}")
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


#: a Trainer checkpoint folder: ``checkpoint-<optimizer step>``
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
#: the file of a checkpoint that holds the options of the run that wrote it (what ``--resume`` compares)
OPTIONS_FILE = "cli_options.json"


def save_in_checkpoint(args, state, name: str, data) -> None:
    """At a Trainer ``on_save``: ``data`` as JSON in the checkpoint just written (``name``), by the main process."""
    checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    if state.is_world_process_zero and checkpoint.is_dir():
        (checkpoint / name).write_text(json.dumps(data, indent=2))
#: options that may differ between a run and its ``--resume``: where and how it is saved, not what it trains; and
#: ``chunk_size``, how the loss is chunked (memory and speed on another card; the same numbers up to rounding)
RESUME_FREE_OPTIONS = ("command", "output_dir", "resume", "overwrite", "save_steps", "chunk_size")


def checkpoint_folders(output_dir: Path) -> List[Path]:
    """Every ``checkpoint-<step>`` folder in ``output_dir`` (complete or not), by step."""
    if not output_dir.is_dir():
        return []
    folders = [path for path in output_dir.iterdir() if path.is_dir() and CHECKPOINT_NAME.match(path.name)]
    return sorted(folders, key=lambda path: int(CHECKPOINT_NAME.match(path.name)[1]))


def last_checkpoint(output_dir: Path) -> Optional[Path]:
    """The complete checkpoint of the highest step, or None. Complete: its ``trainer_state.json`` exists, which the
    Trainer writes after the weights, optimizer, scheduler and RNG states (a save cut short has none)."""
    complete = [folder for folder in checkpoint_folders(output_dir) if (folder / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def run_options(args: argparse.Namespace) -> Dict:
    """The options that define what a run trains (paths made absolute): a checkpoint stores them, ``--resume``
    must give the same."""
    options = {name: value for name, value in vars(args).items() if name not in RESUME_FREE_OPTIONS}
    for name in ("model", "tokenizer", "data", "eval_data"):
        if options.get(name) is not None:
            options[name] = str(Path(options[name]).resolve())
    return options


def _check_not_nested(model: Path, output_dir: Path) -> None:
    """The run never writes into the model folder it reads, nor deletes it (``--overwrite`` removes the output
    folder's checkpoints), whatever the flags."""
    model_path, output_path = model.resolve(), output_dir.resolve()
    if output_path == model_path:
        raise CLIError(f"--output-dir {output_dir} is the --model folder: the run would overwrite the checkpoint it "
                       f"loads; choose another --output-dir")
    if model_path in output_path.parents:
        raise CLIError(f"--output-dir {output_dir} lies inside the --model folder {model}; choose an --output-dir "
                       f"outside it")
    if output_path in model_path.parents:
        raise CLIError(f"--model {model} lies inside --output-dir {output_dir}, which the run writes (and "
                       f"--overwrite clears of checkpoints); choose another --output-dir")


def _option_text(name: str, value) -> str:
    if isinstance(value, bool):
        return flag_of(name) if value else f"no {flag_of(name)}"
    return f"{flag_of(name)} {'(not given)' if value is None else value}"


def _check_resumable(args: argparse.Namespace, output_dir: Path) -> None:
    """``--resume``: a complete checkpoint in the output folder, written with the same options."""
    checkpoint = last_checkpoint(output_dir)
    if checkpoint is None:
        raise CLIError(f"--resume: no checkpoint in {output_dir} to continue from (a run saves one every "
                       f"--save-steps steps and when stopped with Ctrl-C)")
    options_file = checkpoint / OPTIONS_FILE
    if not options_file.is_file():
        return  # not written by this CLI (or cut short right after the save): nothing to compare with
    stored, current = json.loads(options_file.read_text()), run_options(args)
    changed = [name for name in stored if name in current and stored[name] != current[name]]
    if changed:
        raise CLIError(
            f"--resume: {checkpoint} was trained with {', '.join(_option_text(n, stored[n]) for n in changed)}, "
            f"this command has {', '.join(_option_text(n, current[n]) for n in changed)}: resume with the same "
            f"options, or start again with --overwrite"
        )


def _check_output_dir_use(args: argparse.Namespace) -> None:
    """A run never replaces another one silently: a non-empty output folder needs ``--overwrite`` (replace) or
    ``--resume`` (continue); and it never writes into the model folder it reads, even with ``--overwrite``."""
    if args.save_steps < 0:
        raise CLIError(f"--save-steps must be >= 0 (0: a checkpoint only on Ctrl-C), got {args.save_steps}")
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite exclude each other: continue the run in --output-dir, or replace it")
    output_dir = Path(args.output_dir)
    if args.model is not None:
        _check_not_nested(Path(args.model), output_dir)
    if args.resume:
        _check_resumable(args, output_dir)
    elif not args.overwrite and output_dir.is_dir() and any(output_dir.iterdir()):
        checkpoint = last_checkpoint(output_dir)
        resume = f", --resume continues it from {checkpoint.name}" if checkpoint else ""
        raise CLIError(f"--output-dir {output_dir} is not empty (a previous run?): --overwrite replaces what a run "
                       f"writes there{resume}, or choose another --output-dir")


def simpo_options(args: argparse.Namespace):
    """The run's :class:`SimPOOptions` (which checks them); an out-of-range value is an error naming its flag.
    ``--alpha`` is the weight of :meth:`SimPOOptions.with_nll_weight` (0: no NLL term)."""
    from patches.options import FLAG_OPTIONS, SimPOOptions

    values = {option.name: getattr(args, option.name) for option in FLAG_OPTIONS}
    for name, value in values.items():
        try:
            SimPOOptions(**{name: value})  # one at a time, to name the flag
        except (TypeError, ValueError) as error:
            raise CLIError(f"{flag_of(name)}: {error}") from None
    nll_weight = values.pop("alpha")
    return SimPOOptions(**values).with_nll_weight(nll_weight)


def check_args(args: argparse.Namespace):
    """Every check that reads no data and builds no model; returns the SimPO options."""
    _check_numbers(args)
    _check_paths(args)
    _check_output_dir_use(args)
    return simpo_options(args)
