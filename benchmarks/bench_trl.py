"""TRL's ``CPOTrainer(loss_type="simpo")`` against ``patches.trl.FusedCPOTrainer``: peak memory and step time.

Each trainer trains a Llama-3.2-1B-shaped model (random init, bf16 weights, SDPA attention, gradient
checkpointing, AdamW) for a few steps of ``--pairs`` preference pairs per step, for each sequence length T:
every row holds exactly T tokens (a T/4 prompt, a 3T/4 answer, checked on the tokenised data and on a
collated batch before training). Measured per (trainer, T): the peak GPU memory of training
(``torch.cuda.max_memory_allocated``, reset after the model is built, so weights are included) and the
median step time of the steps after the first (which compiles kernels). An OOM ends that trainer's sweep
(longer T only needs more). The T in ``--first-seq-lens`` run first for both trainers, then the others
by increasing T; a config starts only if its predicted time fits ``--budget-s`` and stops after two steps
once ``--config-budget-s`` or the global budget has passed. Writes ``trl_memory.json`` and
``trl_memory.md`` into ``--out``. Usage (GPU, under 9 minutes on an H200)::

    python benchmarks/bench_trl.py --out outputs/trl_memory
    python benchmarks/bench_trl.py --smoke --out /tmp/trl_smoke     # CPU: tiny model, checks the logic

Nothing is downloaded: the text is random words of the default tokenizer (patches.default_assets), each
one BPE token, so that the token counts are exact.
"""
import argparse
import gc
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `patches`, `benchmarks`
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

from benchmarks.bench_training_memory import GIB, LLAMA_3_2_1B, build_model, git_commit  # noqa: E402

TRAINERS = ("CPOTrainer", "FusedCPOTrainer")
IGNORE_INDEX = -100
#: --smoke: a tiny CPU model (the 1B shape but 2 layers, hidden 64) and sizes that run in seconds
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   vocab_size=32000)
SMOKE_DEFAULTS = dict(seq_lens=[64, 128], first_seq_lens=[64], pairs=2, steps=2, layers=2)
GPU_DEFAULTS = dict(seq_lens=[1024, 2048, 4096, 8192, 16384, 32768], first_seq_lens=[1024, 4096], pairs=8, steps=5,
                    layers=LLAMA_3_2_1B["num_hidden_layers"])
#: steps a config needs for a step time: the first step (kernel compilation, allocator warm-up) is not timed
MIN_STEPS = 2


def single_token_words(tokenizer):
    """Words ``w`` for which ``" " + w`` is exactly one token: a text of n such words is n tokens."""
    words = sorted(token[1:] for token in tokenizer.get_vocab() if re.fullmatch("Ġ[a-z]+", token))
    encoded = tokenizer([" " + word for word in words], add_special_tokens=False)["input_ids"]
    words = [word for word, ids in zip(words, encoded) if len(ids) == 1]
    if len(words) < 10:
        raise RuntimeError(f"the tokenizer has only {len(words)} single-token words; cannot build exact-length text")
    return words


def make_dataset(words, n_rows: int, seq_len: int, seed: int = 0):
    """Preference rows whose tokenisation by CPOTrainer is exactly ``seq_len`` tokens, a quarter of them prompt.

    TRL 1.16's CPOTrainer never truncates a decoder-only prompt (it has no ``max_prompt_length``): the prompt
    is ``seq_len // 4 - 1`` words, to which CPOTrainer prepends BOS. The answers are longer than needed and
    CPOTrainer cuts each (its EOS too) to ``max_length - prompt`` tokens. Every word keeps its leading space,
    so prompt and answer never merge into one token.
    """
    import datasets

    rng = random.Random(seed)

    def text(n_words):
        return "".join(" " + word for word in rng.choices(words, k=n_words))

    prompt_words, answer_words = seq_len // 4 - 1, seq_len - seq_len // 4 + 8
    rows = [dict(prompt=text(prompt_words), chosen=text(answer_words), rejected=text(answer_words))
            for _ in range(n_rows)]
    return datasets.Dataset.from_list(rows)


def check_tokens(trainer, pairs: int, seq_len: int) -> int:
    """Tokens per step of a batch collated by ``trainer``; raises unless every row is exactly ``seq_len`` tokens."""
    data = trainer.train_dataset
    prompt_len = seq_len // 4
    for half in ("chosen", "rejected"):
        lengths = {len(ids) for ids in data[f"{half}_input_ids"]}
        prompts = {sum(label == IGNORE_INDEX for label in labels) for labels in data[f"{half}_labels"]}
        if lengths != {seq_len} or prompts != {prompt_len}:
            raise RuntimeError(f"{half} rows tokenised to lengths {sorted(lengths)} with prompts {sorted(prompts)}; "
                               f"expected {seq_len} tokens with a {prompt_len}-token prompt")
    batch = trainer.data_collator([data[i] for i in range(pairs)])
    concatenated = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=trainer.pad_token_id,
                                               device=torch.device("cpu"))
    input_ids, mask = concatenated["concatenated_input_ids"], concatenated["concatenated_attention_mask"]
    answer_tokens = int((concatenated["concatenated_labels"] != IGNORE_INDEX).sum())
    if input_ids.shape != (2 * pairs, seq_len) or int(mask.sum()) != 2 * pairs * seq_len or \
            answer_tokens != 2 * pairs * (seq_len - prompt_len):
        raise RuntimeError(f"collated batch {tuple(input_ids.shape)} with {int(mask.sum())} tokens and "
                           f"{answer_tokens} answer tokens; expected ({2 * pairs}, {seq_len}), all tokens real")
    return int(mask.sum())


def make_step_timer(synchronize, config_deadline: float, global_deadline: float):
    """A TrainerCallback timing each optimizer step; it ends training past a deadline once MIN_STEPS are done."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.times.append(time.perf_counter() - self._start)
            if len(self.times) >= MIN_STEPS and time.time() > min(config_deadline, global_deadline):
                control.should_training_stop = True

    return StepTimer()


def cpo_config(args, seq_len: int, cuda: bool):
    from trl.experimental.cpo import CPOConfig

    return CPOConfig(
        output_dir=args.trainer_dir, loss_type="simpo", cpo_alpha=args.cpo_alpha,
        max_length=seq_len, per_device_train_batch_size=args.pairs, max_steps=args.steps, logging_steps=1,
        learning_rate=1e-6, lr_scheduler_type="constant", optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda, use_cpu=not cuda, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, report_to=[], save_strategy="no", seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )


def peak_memory(cuda: bool) -> dict:
    """Peak allocated (what the table reports) and reserved GiB since the last reset; None on the CPU."""
    if not cuda:
        return dict(peak_gib=None, peak_reserved_gib=None)
    return dict(peak_gib=torch.cuda.max_memory_allocated() / GIB,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def run_config(name: str, seq_len: int, args, tokenizer, words, global_deadline: float, cuda: bool) -> dict:
    """Train ``name`` at sequence length ``seq_len``; the row of measurements (``oom`` True if it did not fit)."""
    from trl.experimental.cpo import CPOTrainer

    from patches.apply import unwrap_peft
    from patches.trl import FusedCPOTrainer

    trainer_class = {"CPOTrainer": CPOTrainer, "FusedCPOTrainer": FusedCPOTrainer}[name]
    row = dict(trainer=name, seq_len=seq_len, pairs=args.pairs, status="ok", oom=False)
    started = time.time()
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    timer = make_step_timer(synchronize, started + args.config_budget_s, global_deadline)
    dataset = make_dataset(words, args.steps * args.pairs, seq_len)
    model = trainer = None
    try:
        if cuda:
            model = build_model(False, args.layers)  # the Trainer turns gradient checkpointing on
            synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            model = build_model(False, args.layers, device="cpu", dtype=torch.float32, **SMOKE_SHAPE)
        trainer = trainer_class(model=model, args=cpo_config(args, seq_len, cuda), train_dataset=dataset,
                                processing_class=tokenizer, callbacks=[timer])
        row["tokens"] = check_tokens(trainer, args.pairs, seq_len)
        setup_s = time.time() - started
        trainer.train()
        synchronize()
        times = timer.times
        row.update(setup_s=setup_s, steps=len(times), first_step_s=times[0],
                   step_s=statistics.median(times[1:]) if len(times) > 1 else None,
                   losses=[log["loss"] for log in trainer.state.log_history if "loss" in log],
                   gradient_checkpointing=unwrap_peft(trainer.model).is_gradient_checkpointing, **peak_memory(cuda))
    except torch.OutOfMemoryError:
        row.update(status="oom", oom=True, steps=len(timer.times), **peak_memory(cuda))
    # outside the except block: the exception's traceback no longer holds the step's tensors
    if trainer is not None:
        trainer.accelerator.free_memory()
    del trainer, model, dataset
    free_memory(cuda)
    row["wall_s"] = time.time() - started
    if cuda:
        row["allocated_after_gib"] = torch.cuda.memory_allocated() / GIB  # ~0: nothing leaks into the next config
    return row


def schedule(seq_lens, first_seq_lens):
    """(trainer, T) in run order: the T of ``first_seq_lens`` for both trainers, then the rest by increasing T."""
    first = [seq_len for seq_len in first_seq_lens if seq_len in seq_lens]
    rest = sorted(set(seq_lens) - set(first))
    return [(name, seq_len) for seq_len in first + rest for name in TRAINERS]


def predicted_s(done: list, seq_len: int) -> float:
    """Time a config of ``seq_len`` needs for MIN_STEPS, from the trainer's largest finished one (0 if none)."""
    finished = [row for row in done if not row["oom"] and row["steps"] >= MIN_STEPS]
    if not finished:
        return 0.0
    last = max(finished, key=lambda row: row["seq_len"])
    minimal = last["setup_s"] + last["first_step_s"] + last["step_s"]
    # attention makes the step superlinear in T; (T/T0)^1.5 errs on the long side
    return minimal * max(1.0, seq_len / last["seq_len"]) ** 1.5


def sweep(args, cuda: bool) -> list:
    import datasets

    from patches.default_assets import build_default_tokenizer

    datasets.disable_progress_bars()  # CPOTrainer tokenises each config's rows: one bar per map otherwise
    tokenizer = build_default_tokenizer()
    words = single_token_words(tokenizer)
    deadline = time.time() + args.budget_s
    rows = []
    for name, seq_len in schedule(args.seq_lens, args.first_seq_lens):
        done = [row for row in rows if row["trainer"] == name and "skipped" not in row["status"]]
        ooms = [row["seq_len"] for row in done if row["oom"]]
        if ooms and seq_len >= min(ooms):
            status = f"skipped: OOM at T={min(ooms)}"
        elif time.time() + predicted_s(done, seq_len) > deadline:
            status = "skipped: time budget"
        else:
            row = run_config(name, seq_len, args, tokenizer, words, deadline, cuda)
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        rows.append(dict(trainer=name, seq_len=seq_len, pairs=args.pairs, status=status, oom=False))
        print(f"{name} T={seq_len}: {status}", flush=True)
    return rows


def largest_fit(rows, name: str) -> str:
    ok = [row["seq_len"] for row in rows if row["trainer"] == name and row["status"] == "ok"]
    ooms = [row["seq_len"] for row in rows if row["trainer"] == name and row["oom"]]
    if not ok:
        return f"none (OOM at T={min(ooms)})" if ooms else "none run"
    best = max(ok)
    return f"T={best} (OOM at T={min(ooms)})" if ooms else f"T={best} (no OOM up to the longest T run)"


def cells(row) -> list:
    if row is None:
        return ["not run", "—"]
    if row["oom"]:
        return ["OOM", "—"]
    if row["status"] != "ok":
        return ["not run" if "OOM" in row["status"] else "not run (time)", "—"]
    peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
    step = "—" if row["step_s"] is None else f"{row['step_s']:.2f}"
    return [peak, step]


def markdown(rows, meta: dict) -> str:
    shape = ("Llama-3.2-1B shape" if not meta["smoke"] else "smoke shape (CPU, no GPU memory)") + \
        f" ({meta['layers']} layers), random init"
    lines = [
        f"TRL {meta['trl']} `CPOTrainer(loss_type=\"simpo\", cpo_alpha={meta['cpo_alpha']})` vs "
        f"`patches.trl.FusedCPOTrainer`: {shape}, {'bf16' if meta['cuda'] else 'float32'} weights, SDPA, "
        f"gradient checkpointing, {meta['optim']}, {meta['pairs']} pairs per step (every row T tokens: T/4 prompt, "
        f"3T/4 answer), up to {meta['steps']} steps; step time is the median after the first step. "
        f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, commit {meta['commit']}.",
        "",
        "| T | tokens/step | CPOTrainer peak GiB | CPOTrainer step s | FusedCPOTrainer peak GiB | "
        "FusedCPOTrainer step s |",
        "|---|---|---|---|---|---|",
    ]
    for seq_len in sorted({row["seq_len"] for row in rows}):
        by_trainer = {row["trainer"]: row for row in rows if row["seq_len"] == seq_len}
        values = [cell for name in TRAINERS for cell in cells(by_trainer.get(name))]
        lines.append(f"| {seq_len} | {2 * meta['pairs'] * seq_len} | " + " | ".join(values) + " |")
    lines.append("")
    for name in TRAINERS:
        lines.append(f"- largest T that fits, {name}: {largest_fit(rows, name)}")
    return "\n".join(lines) + "\n"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/trl_memory")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script's logic")
    parser.add_argument("--seq-lens", type=int, nargs="+", help=f"default {GPU_DEFAULTS['seq_lens']}")
    parser.add_argument("--first-seq-lens", type=int, nargs="+",
                        help=f"T run first for both trainers (default {GPU_DEFAULTS['first_seq_lens']})")
    parser.add_argument("--pairs", type=int, help=f"preference pairs per step (default {GPU_DEFAULTS['pairs']})")
    parser.add_argument("--steps", type=int, help=f"CPOConfig.max_steps (default {GPU_DEFAULTS['steps']})")
    parser.add_argument("--layers", type=int, help=f"decoder layers (default {GPU_DEFAULTS['layers']})")
    parser.add_argument("--cpo-alpha", type=float, default=0.0, help="CPOConfig.cpo_alpha (0: SimPO, no NLL term)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="no config starts that would end after this")
    parser.add_argument("--config-budget-s", type=float, default=90.0,
                        help="a config stops after this long (once it has timed a step)")
    parser.add_argument("--commit", help="commit measured (default: git rev-parse of the working tree)")
    args = parser.parse_args(argv)
    for key, value in (SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = [seq_len for seq_len in args.seq_lens if seq_len % 4 or seq_len < 8]
    if bad:
        parser.error(f"--seq-lens must be multiples of 4 and at least 8 (T/4 prompt tokens), got {bad}")
    if args.pairs < 1 or args.steps < MIN_STEPS:
        parser.error(f"--pairs must be >= 1 and --steps >= {MIN_STEPS} (the first step is not timed)")
    return args


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    import transformers
    import trl

    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_trl.py measures GPU memory and needs CUDA; use --smoke for the CPU check")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(0) if cuda else "cpu", cuda=cuda, smoke=args.smoke,
                torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__,
                commit=args.commit or git_commit(), pairs=args.pairs, steps=args.steps, layers=args.layers,
                cpo_alpha=args.cpo_alpha, optim="fused AdamW" if cuda else "AdamW",
                budget_s=args.budget_s, config_budget_s=args.config_budget_s)
    started = time.time()
    with tempfile.TemporaryDirectory() as trainer_dir:  # the Trainer's output_dir; nothing is saved there
        args.trainer_dir = trainer_dir
        rows = sweep(args, cuda)
    meta["wall_s"] = time.time() - started
    result = {"meta": meta, "rows": rows}
    (out / "trl_memory.json").write_text(json.dumps(result, indent=2))
    report = markdown(rows, meta)
    (out / "trl_memory.md").write_text(report)
    print(report)
    for row in rows:  # NaN/inf losses would make the timings meaningless
        if row["status"] == "ok" and not all(math.isfinite(loss) for loss in row["losses"]):
            raise SystemExit(f"{row['trainer']} T={row['seq_len']}: non-finite losses {row['losses']}")
    return result


if __name__ == "__main__":
    main()
