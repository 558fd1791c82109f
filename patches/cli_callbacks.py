"""The Trainer callbacks of ``python -m patches train``: Ctrl-C handling and labelled progress bars."""
import contextlib
import signal
import sys
import threading

from tqdm.auto import tqdm
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.trainer_utils import has_length

from patches.cli_checks import OPTIONS_FILE, run_options, save_in_checkpoint


class StopOnInterrupt(TrainerCallback):
    """The first Ctrl-C during training asks for a stop at the end of the current optimizer step, with a checkpoint
    there; a second one (or one outside the training loop) raises ``KeyboardInterrupt`` at once.

    Every checkpoint gets the run's options (``cli_options.json``), which ``--resume`` compares with its own.
    Under several processes the request is reduced across them at each step end, so all stop at the same step.
    """

    def __init__(self, cli_args):
        self.requested = False
        self._training = False
        self._main_process = True
        self._options = run_options(cli_args)

    @contextlib.contextmanager
    def handling_sigint(self):
        """Install the Ctrl-C handler for the block (only the main thread can; elsewhere Ctrl-C is left as is)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum, frame):
        if self.requested or not self._training:
            raise KeyboardInterrupt
        self.requested = True
        if self._main_process:
            print("\nCtrl-C: stopping at the end of this optimizer step to save a checkpoint "
                  "(Ctrl-C again: quit at once, saving nothing)", file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._main_process = state.is_world_process_zero
        self._training = True

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False

    def on_step_end(self, args, state, control, **kwargs):
        if self._requested_anywhere(args):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True

    def _requested_anywhere(self, args) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        flag = torch.tensor([float(self.requested)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_save(self, args, state, control, **kwargs):
        save_in_checkpoint(args, state, OPTIONS_FILE, self._options)


class LabelledProgress(ProgressCallback):
    """tqdm bars named after what they count (evaluation before training, training, evaluation after training, with
    the split); training logs go to the training bar's postfix (loss, reward accuracy and margin) instead of one
    printed dict per step."""

    def __init__(self):
        super().__init__()
        self._trained = False
        #: the split being evaluated (set by the CLI before each evaluation), named on the evaluation bar
        self.split = "eval"

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training",
                                     dynamic_ncols=True)
        self.current_step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        self._trained = True

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and self.prediction_bar is None and has_length(eval_dataloader):
            split = self.split
            when = "after" if self._trained else "before"
            self.prediction_bar = tqdm(total=len(eval_dataloader), desc=f"evaluation {when} training ({split})",
                                       leave=self.training_bar is None, dynamic_ncols=True)
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(
                loss=f"{logs['loss']:.3f}", acc=f"{logs.get('rewards/accuracies', float('nan')):.2f}",
                margin=f"{logs.get('rewards/margins', float('nan')):.2f}", refresh=False,
            )
