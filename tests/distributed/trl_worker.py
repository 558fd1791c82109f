"""``FusedCPOTrainer`` for a few steps on the embedded default (one process, or under ``accelerate launch``);
writes the per-step training losses to ``<output_dir>/losses.json`` (on the main process).

Usage: ``python tests/distributed/trl_worker.py OUTPUT_DIR PAIRS_PER_DEVICE`` (the DeepSpeed test runs it both ways).
``cpo_alpha`` is 0: TRL's NLL term is a token mean over each process's micro-batch, so with it a run over several
processes differs from one process by design (with or without DeepSpeed).
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import load_dataset  # noqa: E402
from trl.experimental.cpo import CPOConfig  # noqa: E402

from patches.default_assets import build_default_model, build_default_tokenizer, default_data_files  # noqa: E402
from patches.trl import FusedCPOTrainer  # noqa: E402
from tests.distributed.launcher import end_worker  # noqa: E402

STEPS = 3


def main(output_dir: str, pairs_per_device: int) -> None:
    tokenizer = build_default_tokenizer()
    train = load_dataset("json", data_files=str(default_data_files()[0]))["train"]
    config = CPOConfig(
        output_dir=output_dir, loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0, label_smoothing=0.1,
        max_steps=STEPS, per_device_train_batch_size=pairs_per_device, learning_rate=1e-3, max_length=96,
        logging_steps=1, bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
        seed=0, disable_tqdm=True,
    )
    trainer = FusedCPOTrainer(model=build_default_model(tokenizer, seed=0), args=config, train_dataset=train,
                              processing_class=tokenizer)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and "step" in entry]
        Path(output_dir, "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    end_worker()
