"""The scenarios of the 2-process FSDP2 parity test: which model, layout and precision each one shards.

The model, global batch, options, training loop and layouts are those of ``fsdp2_setup.py`` (the multi-GPU
benchmark's too); the worker (``fsdp2_worker.py``, under torchrun) and the test (one process) use
them with the same seed and batch, so every difference comes from the sharding.
"""
STEPS = 3
#: name -> (tied embeddings, layout, bf16 mixed precision, training steps); layouts: see fsdp2_setup.shard
SCENARIOS = {
    "root": (False, "root", False, STEPS),
    "root_tied": (True, "root", False, STEPS),
    "accelerate_fsdp2": (False, "accelerate", False, 1),
    "accelerate_fsdp2_tied": (True, "accelerate", False, 1),
    "lm_head_own_unit": (False, "lm_head_unit", False, 1),
    "bf16_mixed_precision": (True, "root", True, 1),
}
#: scenarios whose trained model the worker saves (``save_full_model``) for the reload test
SAVED = ("root", "root_tied")
