"""Output of a patched model called with ``labels``."""
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

# re-exported: the auxiliary outputs' names, in the order of docs/interface.md
from agent_code.liger_kernel.chunked_loss.simpo_loss import AUX_OUTPUT_NAMES  # noqa: F401


#: Name of the KV-cache field of HF model outputs: ``cache`` in recent transformers 5.x (``past_key_values`` is then
#: a deprecated alias that logs a warning), ``past_key_values`` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class SimPOCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` with ``logits=None`` and the SimPO statistics (all detached).

    Rows ``[0, B)`` of the batch are the chosen responses, rows ``[B, 2B)`` the rejected ones.

    chosen_logps / rejected_logps: (B,) mean log-prob of each row over its tokens with ``labels != ignore_index``.
    chosen_logits_mean / rejected_logits_mean: () mean of all the half's logits, every position and vocab entry
        (TRL's ``logits/chosen`` and ``logits/rejected`` metrics).
    nll_loss: () cross-entropy of the chosen rows (0 unless ``compute_nll_loss``).
    chosen_rewards / rejected_rewards: (B,) ``beta * chosen_logps`` and ``beta * rejected_logps``.
    """

    chosen_logps: Optional[torch.FloatTensor] = None
    rejected_logps: Optional[torch.FloatTensor] = None
    chosen_logits_mean: Optional[torch.FloatTensor] = None
    rejected_logits_mean: Optional[torch.FloatTensor] = None
    nll_loss: Optional[torch.FloatTensor] = None
    chosen_rewards: Optional[torch.FloatTensor] = None
    rejected_rewards: Optional[torch.FloatTensor] = None
