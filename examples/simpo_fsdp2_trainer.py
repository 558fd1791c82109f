"""SimPO with the fused loss on several GPUs: ``SimPOTrainer`` (the HF Trainer path) under accelerate's FSDP2.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # where required
    accelerate launch --config_file configs/accelerate_fsdp2.yaml examples/simpo_fsdp2_trainer.py \\
        --max-steps 20 --output-dir runs/simpo-fsdp2

Trains the embedded default (random-init 32k-vocabulary Llama, shipped preference pairs; ``--model`` for a local
checkpoint instead), evaluates on the held-out pairs, saves a plain HF checkpoint (the config's
``FULL_STATE_DICT``: gathered on rank 0) and ``metrics.json``. Each process takes its own pairs of every batch.

Under FSDP2 the Trainer shards the model together with its optimizer when training starts, so this script
evaluates only after training: ``trainer.evaluate()`` before ``trainer.train()`` fails under FSDP2
("a model and optimizer must be passed together").
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `patches`

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments  # noqa: E402

from patches.collator import PreferenceCollator, load_preference_jsonl  # noqa: E402
from patches.default_assets import build_default_model, build_default_tokenizer, default_data_files  # noqa: E402
from patches.trainer import SimPOTrainer  # noqa: E402


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local HF checkpoint folder; default: the embedded random-init Llama")
    parser.add_argument("--output-dir", default="runs/simpo-fsdp2")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=2.0)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=512)
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    else:
        tokenizer = build_default_tokenizer()
        model = build_default_model(tokenizer)
    collator = PreferenceCollator(tokenizer, max_length=args.max_length)
    train_file, eval_file = default_data_files()
    train_pairs = collator.tokenize_dataset(load_preference_jsonl(train_file), source=str(train_file))
    eval_pairs = collator.tokenize_dataset(load_preference_jsonl(eval_file), source=str(eval_file))
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, logging_steps=1, save_strategy="no",
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = SimPOTrainer(
        model=model, args=training_args, beta=args.beta, gamma=args.gamma, data_collator=collator,
        train_dataset=train_pairs, eval_dataset=eval_pairs, processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        sharding = type(trainer.model_wrapped).__name__
        report = dict(sharded_as=sharding, processes=trainer.args.world_size, eval=metrics,
                      log_history=trainer.state.log_history)
        Path(args.output_dir, "metrics.json").write_text(json.dumps(report, indent=2))
        print(f"{sharding} on {trainer.args.world_size} processes, {trainer.state.global_step} steps; held-out: "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_rewards")))


if __name__ == "__main__":
    main()
