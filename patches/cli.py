"""``python -m patches train``: SimPO training of a causal LM on a JSONL preference file, fused loss on.

With no arguments it trains the embedded default (patches/default_assets): a random-init 32k-vocabulary
Llama on shipped preference pairs, in a few minutes on a laptop CPU. See docs/training.md.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from patches.cli_checks import CLIError, check_args, flag_of, last_checkpoint
from patches.cli_evaluation import train_and_evaluate
from patches.cli_report import plot_training_curves, summary_table, write_report
from patches.cli_run import (EXIT_INTERRUPTED, RunInterrupted, effective_settings, header, interrupted_message,
                             quit_message, remove_previous_checkpoints)
from patches.options import FLAG_DEFAULT, FLAG_HELP, FLAG_OPTIONS

DEFAULT_OUTPUT_DIR = "runs/simpo-default"
#: the public names: the entry points, the user error and the report helpers (defined in cli_checks, cli_report)
__all__ = ["CLIError", "build_parser", "main", "plot_training_curves", "summary_table", "train"]


class _ArgumentParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown option, a value that is no number) as one ``error:`` line, exit 2."""

    def error(self, message):
        raise CLIError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default said once: ``(default: X)`` is added only where the help does not already say its
    default and there is one to say (not None, not an on/off flag's False)."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        # identity, not ==: 0 and 0.0 equal False, and a flag defaulting to 0 (--alpha, --seed) says so
        if (not action.option_strings or "default" in help_text
                or any(action.default is unsaid for unsaid in (None, False, argparse.SUPPRESS))):
            return help_text
        return f"{help_text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="python -m patches",
        description="Memory-efficient SimPO training of Hugging Face causal LMs (fused linear + SimPO loss).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train a causal LM with SimPO on a JSONL preference file (no arguments: the embedded default)",
        description="Train with SimPO. Without --model/--data: a random-init 32k-vocabulary Llama on the "
        "preference pairs shipped in patches/default_assets (a few minutes on CPU).",
        formatter_class=_HelpFormatter,
    )
    train.add_argument("--model", help="local HF checkpoint folder (safetensors, loaded offline); "
                       "default: the embedded random-init Llama")
    train.add_argument("--tokenizer", help="local tokenizer folder, for a --model checkpoint saved without its "
                       "tokenizer; default: the --model folder's")
    train.add_argument("--data", help="preference pairs: a JSONL file (one {\"prompt\", \"chosen\", \"rejected\"} "
                       "object per line; strings, or message lists with a chat-template tokenizer; also TRL's "
                       "implicit-prompt and UltraFeedback's layouts), a .json or .parquet file, or a folder written "
                       "by datasets' save_to_disk; default: the embedded pairs")
    train.add_argument("--eval-data", help="held-out pairs, in any --data format; default: the embedded held-out "
                       "pairs when --data is not given, none otherwise")
    train.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where the model, metrics.json, the plot and "
                       "the checkpoints go; must be empty unless --overwrite or --resume")
    train.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --output-dir (its "
                       "checkpoints are deleted when training starts); never allowed in the --model folder")
    train.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last "
                       "checkpoint (weights, optimizer, scheduler, RNG, data position), with the same options")
    train.add_argument("--save-steps", type=int, default=0, metavar="N", help="save a checkpoint every N optimizer "
                       "steps, keeping the last one (0: only when stopped with Ctrl-C)")
    _add_simpo_flags(train)
    train.add_argument("--lr", type=float, help="learning rate (> 0); default 1e-3 for the embedded random-init "
                       "model, 1e-6 (the SimPO paper's range) for --model")
    train.add_argument("--epochs", type=float, default=2.0, help="passes over the training pairs (> 0)")
    train.add_argument("--max-steps", type=int, default=-1,
                       help="optimizer steps (> 0), overriding --epochs; -1: train for --epochs")
    train.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch (per device)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--max-length", type=int, default=512, help="tokens per prompt + answer, after truncation")
    train.add_argument("--max-prompt-length", type=int, help="prompt tokens kept when truncating (from the "
                       "left), below --max-length; default max-length / 2")
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision: float32 master weights and "
                       "optimizer, bf16 autocast (a bf16 copy of the weights would round away updates of lr ~1e-6)")
    train.add_argument("--padding-free", action="store_true",
                       help="pack each batch's sequences into one row without padding (position_ids restarting at "
                       "each sequence; needs the fused loss and eager, sdpa, flex or flash attention)")
    train.add_argument("--no-patch", action="store_true",
                       help="compute the same SimPO loss from the full logits instead (for comparison)")
    train.add_argument("--seed", type=int, default=0, help="seed of the model init and the data order, in [0, 2**32)")
    return parser


def _add_simpo_flags(train: argparse.ArgumentParser) -> None:
    """A flag for each SimPO option that has one (:data:`patches.options.FLAG_OPTIONS`): its name, type, default
    and help are the option's."""
    for option in FLAG_OPTIONS:
        train.add_argument(flag_of(option.name), type=option.type,
                           default=option.metadata.get(FLAG_DEFAULT, option.default), help=option.metadata[FLAG_HELP])


def _load_tokenizer(args: argparse.Namespace):
    from patches.cli_tokenizer import load_tokenizer

    return load_tokenizer(args)


def _load_model(args: argparse.Namespace, tokenizer):
    from transformers import AutoModelForCausalLM

    from patches.default_assets import build_default_model

    if args.model is None:
        model = build_default_model(tokenizer, seed=args.seed)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise CLIError(f"--model {args.model}: cannot load it offline with safetensors ({error})") from None
    # --bf16 is mixed precision (the Trainer's bf16 autocast): the weights stay float32, because AdamW steps of
    # ~lr = 1e-6 on bf16 weights (spacing ~1e-4 at typical magnitudes) would be rounded away.
    return model.float()


def _tokenize(numbered_records, path: Path, collator, label: str):
    before = collator.skipped_records
    features = collator.tokenize_dataset(numbered_records, source=str(path))
    if not features:
        raise CLIError(f"{path}: every record was skipped (empty answers)")
    print(f"{label}: {len(features)} pairs from {path} ({collator.skipped_records - before} skipped: empty answer)")
    return features


def _training_arguments(args: argparse.Namespace, lr: float, output_dir: Path):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,  # one log entry per optimizer step: the per-step curves and metrics.json
        # checkpoints every --save-steps, the last one kept (--resume needs no other); a Ctrl-C saves one anyway
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=1,
        report_to=[],
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),  # bf16 on CPU needs it said explicitly
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def _data_paths(args: argparse.Namespace) -> Dict[str, Path]:
    """``{"train": file}``, plus ``"heldout"`` when there are held-out pairs (the embedded ones by default)."""
    from patches.default_assets import default_data_files

    embedded_data = args.data is None
    paths = {"train": default_data_files()[0] if embedded_data else Path(args.data)}
    if args.eval_data or embedded_data:
        paths["heldout"] = Path(args.eval_data) if args.eval_data else default_data_files()[1]
    return paths


def _prepare_data(args: argparse.Namespace, tokenizer, paths: Dict[str, Path], records: Dict[str, list]):
    """The collator and the tokenized pairs of each split."""
    from patches.collator import PreferenceCollator

    collator = PreferenceCollator(tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                  padding_free=args.padding_free)
    return collator, {split: _tokenize(records[split], paths[split], collator, split) for split in paths}


def _check_token_ids(args: argparse.Namespace, model, collator, paths: Dict[str, Path], datasets: Dict[str, list]):
    """Every token id the run feeds the model (the pairs' and the padding's) is a row of its embedding: with a
    tokenizer that is not the model's, the first forward would end in an ``IndexError`` from the embedding lookup."""
    n_tokens = model.get_input_embeddings().num_embeddings
    from patches.cli_tokenizer import tokenizer_source

    flag, path = tokenizer_source(args)
    where = f"{flag} {path}" if path is not None else "the tokenizer"
    mismatch = (f"{where}: the model's vocabulary has {n_tokens} tokens (ids 0 to {n_tokens - 1}), but "
                f"the tokenizer gives id {{}} {{}}: the tokenizer is not the one the model was trained with")
    if collator.pad_token_id >= n_tokens:
        raise CLIError(mismatch.format(collator.pad_token_id, "to the padding"))
    for split, features in datasets.items():
        highest = max((max(ids, default=-1) for feature in features for key, ids in feature.items()
                       if key.endswith("input_ids")), default=-1)
        if highest >= n_tokens:
            raise CLIError(mismatch.format(highest, f"in {paths[split]}"))


def _build_trainer(args: argparse.Namespace, options, lr: float, model, tokenizer, collator, train_dataset):
    from transformers.trainer_callback import ProgressCallback

    from patches.cli_callbacks import LabelledProgress
    from patches.trainer import SimPOTrainer

    trainer = SimPOTrainer(
        model=model, args=_training_arguments(args, lr, Path(args.output_dir)), **options.as_dict(),
        use_fused_loss=not args.no_patch, padding_free=args.padding_free, data_collator=collator, train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LabelledProgress())
    return trainer


def train(args: argparse.Namespace) -> Dict:
    """Run one training; returns what is written to ``metrics.json``. Stopped by Ctrl-C, it saves the model,
    ``metrics.json`` and a checkpoint, then raises :class:`~patches.cli_run.RunInterrupted`."""
    options = check_args(args)
    from patches.preference_data import load_preference_records

    paths = _data_paths(args)
    # Read and check the data before building the model: a bad line fails fast.
    records = {split: load_preference_records(path) for split, path in paths.items()}
    lr = args.lr if args.lr is not None else (1e-3 if args.model is None else 1e-6)

    import torch
    from transformers import set_seed

    from patches.cli_callbacks import StopOnInterrupt

    set_seed(args.seed)
    started = time.time()
    tokenizer = _load_tokenizer(args)
    collator, datasets = _prepare_data(args, tokenizer, paths, records)
    model = _load_model(args, tokenizer)
    _check_token_ids(args, model, collator, paths, datasets)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}, {n_params / 1e6:.1f} M parameters, vocabulary "
          f"{model.config.vocab_size}; loss: {'plain PyTorch from logits (--no-patch)' if args.no_patch else 'fused'}")
    trainer = _build_trainer(args, options, lr, model, tokenizer, collator, datasets["train"])
    settings = effective_settings(args, lr, model, trainer, collator, len(datasets["train"]))
    print(header(settings))
    output_dir = Path(args.output_dir)
    resume_from = _start_run(args, trainer, output_dir)
    stop = StopOnInterrupt(args)
    trainer.add_callback(stop)
    with stop.handling_sigint():
        before, train_output, after = train_and_evaluate(trainer, datasets, resume_from, stop)

    output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(output_dir))  # collective under FSDP: every rank takes part, rank 0 writes
    result = {
        "config": {key: value for key, value in vars(args).items() if key != "command"} | {"lr": lr},
        "data": {"train": str(paths["train"]), "heldout": str(paths["heldout"]) if "heldout" in paths else None,
                 "pairs": {split: len(features) for split, features in datasets.items()},
                 "skipped_records": collator.skipped_records},
        "model": {"class": type(model).__name__, "parameters": n_params, "vocab_size": model.config.vocab_size},
        "hyperparameters": settings | {"steps": trainer.state.max_steps},
        "resumed_from": str(resume_from) if resume_from else None,
        "interrupted": stop.requested,
        "before": before,
        "after": after,
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "total_runtime_s": time.time() - started,
        "steps": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "torch": torch.__version__,
    }
    if trainer.is_world_process_zero():
        write_report(trainer, output_dir, result, summary=not stop.requested)
    if stop.requested:
        message = interrupted_message(trainer, output_dir, args.overwrite) if trainer.is_world_process_zero() else ""
        raise RunInterrupted(message)
    return result


def _start_run(args: argparse.Namespace, trainer, output_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from (``--resume``); with ``--overwrite``, the replaced run's checkpoints removed
    (now that the new run's model is built: a run that fails earlier leaves the old one whole)."""
    if args.resume:
        checkpoint = last_checkpoint(output_dir)
        print(f"resuming from {checkpoint} (its weights, optimizer, scheduler, RNG and data position)")
        return checkpoint
    if args.overwrite and trainer.is_world_process_zero():
        removed = remove_previous_checkpoints(output_dir)
        if removed:
            print(f"--overwrite: removed the previous run's {', '.join(removed)} from {output_dir}")
    return None


def _user_errors() -> tuple:
    """The errors shown as one ``error:`` line: the CLI's own, bad data, an unsupported model."""
    from patches import UnsupportedModelError
    from patches.collator import PreferenceDataError

    return CLIError, PreferenceDataError, UnsupportedModelError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        train(args)
    except RunInterrupted as stopped:  # files saved: every process reaches the end together
        if str(stopped):
            print(stopped, file=sys.stderr)
        _end_distributed_run()
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop: nothing saved, no traceback
        print(quit_message(Path(args.output_dir) if args is not None else None), file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as error:  # evaluated only when something was raised: --help imports no torch
        print(f"error: {error}", file=sys.stderr)
        return 2
    _end_distributed_run()
    return 0


def _end_distributed_run() -> None:
    from patches.distributed import end_distributed_run  # torch is imported by now; --help never gets here

    end_distributed_run()
