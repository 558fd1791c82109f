"""SimPO with TRL's CPOTrainer API and the fused loss: ``FusedCPOTrainer`` is the one changed import.

    pip install trl==1.16.0
    python examples/trl_simpo.py                 # CPU, about a minute: train, evaluate, print TRL's metrics
    python examples/trl_simpo.py --compare       # also train TRL's own CPOTrainer and print the differences

Trains the embedded default (a random-init Llama with a 32k vocabulary, the shipped preference pairs, an
offline byte-level BPE tokenizer): nothing is downloaded. ``--compare`` runs the same seed through
``trl.experimental.cpo.CPOTrainer``, which builds the (2B, T, V) logits, and prints how far apart the logged
metrics and the final weights are (float32 rounding).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `patches`
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402

from patches.default_assets import build_default_model, build_default_tokenizer, default_data_files  # noqa: E402
from patches.trl import FusedCPOTrainer  # noqa: E402  (migration: `FusedCPOTrainer as CPOTrainer`)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss-type", default="simpo", help="CPOConfig.loss_type (sigmoid, hinge, ipo, simpo, alphapo)")
    parser.add_argument("--max-steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--beta", type=float, default=2.0)
    parser.add_argument("--simpo-gamma", type=float, default=1.0)
    parser.add_argument("--cpo-alpha", type=float, default=0.0, help="weight of the NLL term on chosen answers")
    parser.add_argument("--output-dir", default="runs/trl-simpo")
    parser.add_argument("--compare", action="store_true", help="also run TRL's CPOTrainer and compare")
    return parser.parse_args()


def run(trainer_class, args, datasets):
    tokenizer = build_default_tokenizer()
    config = CPOConfig(
        output_dir=args.output_dir, loss_type=args.loss_type, beta=args.beta, simpo_gamma=args.simpo_gamma,
        cpo_alpha=args.cpo_alpha, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=1e-3, max_length=128, logging_steps=5,
        # CPOConfig's defaults are for GPUs (bf16, gradient checkpointing); this is a float32 CPU run
        bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no", seed=0,
        disable_tqdm=True,
    )
    trainer = trainer_class(model=build_default_model(tokenizer, seed=0), args=config,
                            train_dataset=datasets["train"], eval_dataset=datasets["eval"], processing_class=tokenizer)
    trainer.train()
    evaluation = trainer.evaluate()
    return trainer, evaluation


def main():
    args = parse_arguments()
    train_file, eval_file = default_data_files()
    datasets = load_dataset("json", data_files={"train": str(train_file), "eval": str(eval_file)})
    datasets["eval"] = datasets["eval"].select(range(16))

    fused, fused_eval = run(FusedCPOTrainer, args, datasets)
    print("\nFusedCPOTrainer evaluation:")
    for name, value in fused_eval.items():
        print(f"  {name:28s} {value:.6g}")
    if not args.compare:
        return

    plain, plain_eval = run(CPOTrainer, args, datasets)
    print("\nFusedCPOTrainer vs CPOTrainer (same seed):")
    logs = zip(fused.state.log_history + [fused_eval], plain.state.log_history + [plain_eval])
    differences = {}
    for fused_logs, plain_logs in logs:
        for name, value in plain_logs.items():
            if "runtime" in name or "per_second" in name or not isinstance(value, float):
                continue
            differences[name] = max(differences.get(name, 0.0), abs(fused_logs[name] - value))
    for name, difference in sorted(differences.items()):
        print(f"  max |difference| {name:28s} {difference:.2e}")
    weight_difference = max((a - b).abs().max().item() for a, b in
                            zip(fused.model.state_dict().values(), plain.model.state_dict().values()))
    print(f"  max |difference| of the final weights  {weight_difference:.2e}")
    assert weight_difference < 1e-4, "the fused trainer drifted from TRL's"


if __name__ == "__main__":
    torch.set_num_threads(min(4, torch.get_num_threads()))
    main()
