"""What makes a ``python -m patches train`` run safe to stop, continue and read: its checkpoints, the messages of
an interrupted run, and its effective settings (the header). The Trainer callbacks are in :mod:`patches.cli_callbacks`.

Ctrl-C during training stops it at the end of the optimizer step in progress (never halfway through an update),
saves a checkpoint there, the model and ``metrics.json`` so far, and ends with one line and exit status 130. A
second Ctrl-C, or one outside the training loop, quits at once and saves nothing.
"""
import math
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from patches.cli_checks import checkpoint_folders, last_checkpoint

#: exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130


class RunInterrupted(Exception):
    """Training was stopped by Ctrl-C after its files were saved; the message (empty on processes other than the
    first) says what was saved and where."""


def remove_previous_checkpoints(output_dir: Path) -> List[str]:
    """``--overwrite``: delete the checkpoints of the run being replaced (else ``--resume`` could later continue
    from one of them, and the Trainer's rotation could keep one instead of the new run's); returns their names."""
    removed = []
    for folder in checkpoint_folders(output_dir):
        shutil.rmtree(folder)
        removed.append(folder.name)
    return removed


def interrupted_message(trainer, output_dir: Path, overwrite: bool = False) -> str:
    """The one line a run stopped by Ctrl-C ends with (``overwrite``: its command has ``--overwrite``, which
    ``--resume`` replaces)."""
    state = trainer.state
    checkpoint = last_checkpoint(output_dir)
    saved = f"the model, metrics.json and {checkpoint.name}" if checkpoint else "the model and metrics.json"
    how = "--resume instead of --overwrite" if overwrite else "and --resume"
    resume = f"; continue it with the same command {how}" if checkpoint else ""
    return f"interrupted at step {state.global_step} of {state.max_steps}: saved {saved} in {output_dir}/{resume}"


def quit_message(output_dir: Optional[Path]) -> str:
    """The one line of a run that quit without saving (Ctrl-C twice, or outside the training loop)."""
    checkpoint = last_checkpoint(output_dir) if output_dir is not None else None
    if checkpoint is None:
        return "interrupted: quit without saving"
    return f"interrupted: quit without saving; --resume continues from {checkpoint}"


def planned_steps(n_pairs: int, training_args) -> int:
    """Optimizer steps of the run, as the Trainer counts them: ``--max-steps``, or the epochs times the steps of one
    epoch (a process's share of the batches, a last partial accumulation counting as a step)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    batches = math.ceil(n_pairs / training_args.per_device_train_batch_size)
    per_process = math.ceil(batches / training_args.world_size)  # accelerate evens the processes' shares out
    steps_per_epoch = max(math.ceil(per_process / training_args.gradient_accumulation_steps), 1)
    return math.ceil(training_args.num_train_epochs * steps_per_epoch)


def effective_settings(cli_args, lr: float, model, trainer, collator, n_train_pairs: int) -> Dict:
    """What the run trains with, defaults resolved: stored in ``metrics.json`` and shown by :func:`header`."""
    training_args = trainer.args
    lr_source = ("--lr" if cli_args.lr is not None
                 else "default with --model" if cli_args.model is not None else "default of the embedded model")
    return {
        "lr": lr, "lr_source": lr_source, "beta": cli_args.beta, "gamma": cli_args.gamma, "alpha": cli_args.alpha,
        "label_smoothing": cli_args.label_smoothing, "batch_size": cli_args.batch_size,
        "grad_accum": cli_args.grad_accum, "processes": training_args.world_size,
        "pairs_per_step": cli_args.batch_size * cli_args.grad_accum * training_args.world_size,
        "steps": planned_steps(n_train_pairs, training_args), "max_length": collator.max_length,
        "max_prompt_length": collator.max_prompt_length,
        "precision": "bf16 mixed (float32 weights)" if cli_args.bf16 else "float32",
        "padding_free": cli_args.padding_free, "attention": getattr(model.config, "_attn_implementation", None),
        "loss": "from logits (--no-patch)" if cli_args.no_patch else "fused",
        "save_steps": cli_args.save_steps,
    }


def header(settings: Dict) -> str:
    """Two lines: the optimisation's numbers, then the shape of the run."""
    processes = f" x {settings['processes']} processes" if settings["processes"] > 1 else ""
    checkpoints = (f"a checkpoint every {settings['save_steps']} steps" if settings["save_steps"]
                   else "a checkpoint only on Ctrl-C")
    return (
        f"hyperparameters: lr {settings['lr']:g} ({settings['lr_source']}), beta {settings['beta']:g}, "
        f"gamma {settings['gamma']:g}, alpha {settings['alpha']:g}, label smoothing {settings['label_smoothing']:g}\n"
        f"run: {settings['steps']} optimizer steps of {settings['pairs_per_step']} pairs (batch "
        f"{settings['batch_size']} x grad accum {settings['grad_accum']}{processes}); max length "
        f"{settings['max_length']} (prompt {settings['max_prompt_length']}); {settings['precision']}; "
        f"{'packed (padding-free)' if settings['padding_free'] else 'padded'} batches; attention "
        f"{settings['attention']}; {checkpoints}"
    )
