"""The CLI's evaluations around training: "before" inside ``trainer.train()`` (so the Trainer wraps the model for
DDP or DeepSpeed first), kept in each checkpoint for a resumed run, and "after"."""
import json
from pathlib import Path
from typing import Dict, Optional

from patches.cli_checks import save_in_checkpoint


def evaluate_all(trainer, datasets: Dict[str, list]) -> Dict[str, Dict[str, float]]:
    """``{split: {metric: value}}`` with the ``eval_<split>_`` prefix stripped."""
    from patches.cli_callbacks import LabelledProgress

    results = {}
    for split, features in datasets.items():
        prefix = f"eval_{split}"
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, LabelledProgress):
                callback.split = split  # the evaluation bar's label
        metrics = trainer.evaluate(features, metric_key_prefix=prefix)
        results[split] = {key[len(prefix) + 1:]: value for key, value in metrics.items() if key.startswith(prefix)}
    return results


#: file in each checkpoint holding the metrics of the evaluation before training (a resumed run reports them)
BEFORE_TRAINING_FILE = "before_training.json"


def _evaluation_on_train_begin(trainer, datasets: Optional[Dict[str, list]], results: Dict[str, Dict[str, float]]):
    """A callback that fills ``results`` with :func:`evaluate_all` of ``datasets`` (unless None) at
    ``on_train_begin``: inside ``trainer.train()``, after the Trainer has wrapped the model for training (DDP,
    DeepSpeed's engine) and before the first step, where its own ``eval_on_start`` runs. Each checkpoint keeps
    ``results`` (``BEFORE_TRAINING_FILE``)."""
    from transformers import TrainerCallback

    class EvaluateOnTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if datasets is not None:
                results.update(evaluate_all(trainer, datasets))

        def on_save(self, args, state, control, **kwargs):
            save_in_checkpoint(args, state, BEFORE_TRAINING_FILE, results)

    return EvaluateOnTrainBegin()


def _before_training_of(checkpoint: Path) -> Dict[str, Dict[str, float]]:
    """The "before" metrics a resumed run's first part measured (empty if its checkpoint has none)."""
    saved = checkpoint / BEFORE_TRAINING_FILE
    return json.loads(saved.read_text()) if saved.is_file() else {}


def train_and_evaluate(trainer, datasets: Dict[str, list], resume_from: Optional[Path] = None, stop=None):
    """``(before, train_output, after)``: metrics per split around ``trainer.train()`` (from the checkpoint
    ``resume_from``); no "after" when ``stop`` (:class:`~patches.cli_callbacks.StopOnInterrupt`) stopped it."""
    # "before" on held-out pairs only when there are some: the random-init model scores them like the
    # training pairs, and one pass less keeps the default run short.
    # It runs inside train(): a trainer.evaluate() before train() marks the bare model as prepared for the Trainer's
    # accelerator, which then never wraps it for training (transformers 5.17 to 5.24): under DDP each rank would
    # train its own replica, unsynchronised, and under DeepSpeed no training engine would exist.
    # Under FSDP the evaluation inside train() (of the sharded model) has not been run on GPUs: "after" only.
    # A resumed run reports the "before" its first part measured (train() loads the checkpoint's weights before
    # on_train_begin, so evaluating there would score the partly trained model).
    before: Dict[str, Dict[str, float]] = _before_training_of(resume_from) if resume_from else {}
    resume = str(resume_from) if resume_from else None
    if trainer.is_fsdp_enabled:
        if trainer.is_world_process_zero():
            print("evaluation before training: skipped under FSDP (the evaluation after training runs)")
        return before, trainer.train(resume_from_checkpoint=resume), _after(trainer, datasets, stop)
    evaluated = None if resume_from else {k: v for k, v in datasets.items() if k != "train"} or datasets
    callback = _evaluation_on_train_begin(trainer, evaluated, before)
    trainer.add_callback(callback)
    try:
        train_output = trainer.train(resume_from_checkpoint=resume)
    finally:
        trainer.remove_callback(callback)
    return before, train_output, _after(trainer, datasets, stop)


def _after(trainer, datasets: Dict[str, list], stop) -> Dict[str, Dict[str, float]]:
    """The evaluation after training, none when ``stop`` (Ctrl-C) ended it early."""
    return {} if stop is not None and stop.requested else evaluate_all(trainer, datasets)
