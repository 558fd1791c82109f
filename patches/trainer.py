"""``SimPOTrainer``: a ``transformers.Trainer`` that trains a causal LM with SimPO and logs TRL's metrics.

With ``use_fused_loss=True`` (default) the model is patched with :func:`patches.apply_fused_simpo`, so the
``(2B, T, V)`` logits never exist; with ``False`` the same loss is computed in plain PyTorch from the
model's logits (:func:`simpo_loss_from_logits`, TRL's ``CPOTrainer(loss_type="simpo")`` computation),
for comparison. Batches come from :class:`patches.collator.PreferenceCollator`.
"""
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from transformers import Trainer

from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction
from patches import SimPOCausalLMOutputWithPast, apply_fused_simpo, revert_fused_simpo
from patches.options import SimPOOptions

#: Metric names as TRL's CPOTrainer logs them (``eval_``-prefixed in evaluation).
METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "nll_loss",
)


def simpo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    compute_nll_loss: bool = False,
    ignore_index: int = -100,
) -> SimPOCausalLMOutputWithPast:
    """SimPO from full logits, in plain PyTorch: what the fused loss replaces.

    ``logits`` ``(2B, T, V)``, ``labels`` ``(2B, T)`` unshifted (HF convention). Log-softmax in float32 (at
    least), position ``t`` predicts ``labels[:, t + 1]``; a row's log-prob is the mean over its non-ignored
    tokens; ``loss = mean_i(-(1-ls)·logσ(z_i) - ls·logσ(-z_i)) + alpha·nll`` with
    ``z_i = beta·(logp_chosen_i - logp_rejected_i) - gamma``. A pair with a row holding no token adds zero
    loss (as the fused loss does); the mean still divides by B.
    """
    n_pairs = logits.shape[0] // 2
    stat_dtype = torch.promote_types(logits.dtype, torch.float32)
    # TRL's logits/* metrics average every position of the unshifted logits
    chosen_logits_mean = logits[:n_pairs].detach().to(stat_dtype).mean()
    rejected_logits_mean = logits[n_pairs:].detach().to(stat_dtype).mean()
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    valid = labels != ignore_index
    log_probs = torch.log_softmax(logits.to(stat_dtype), dim=-1)
    token_logps = log_probs.gather(-1, labels.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1) * valid
    counts = valid.sum(dim=1)
    row_logps = token_logps.sum(dim=1) / counts.clamp(min=1)
    chosen_logps, rejected_logps = row_logps[:n_pairs], row_logps[n_pairs:]
    pair_has_tokens = (counts[:n_pairs] > 0) & (counts[n_pairs:] > 0)
    # the fused loss's own pair loss (sum over the pairs given / B), on the pairs that have tokens
    loss = LigerFusedLinearSimPOFunction.preference_loss_fn(
        chosen_logps[pair_has_tokens], rejected_logps[pair_has_tokens], labels, beta=beta, gamma=gamma,
        label_smoothing=label_smoothing,
    )[0]
    nll = -token_logps[:n_pairs].sum() / counts[:n_pairs].sum().clamp(min=1)
    if compute_nll_loss:
        loss = loss + alpha * nll
    return SimPOCausalLMOutputWithPast(
        loss=loss.to(logits.dtype),
        logits=None,
        chosen_logps=chosen_logps.detach(),
        rejected_logps=rejected_logps.detach(),
        chosen_logits_mean=chosen_logits_mean,
        rejected_logits_mean=rejected_logits_mean,
        nll_loss=nll.detach() if compute_nll_loss else torch.zeros((), device=logits.device),
        chosen_rewards=beta * chosen_logps.detach(),
        rejected_rewards=beta * rejected_logps.detach(),
    )


class SimPOTrainer(Trainer):
    """Trainer for SimPO on ``[chosen; rejected]`` batches; logs TRL's metric names, reduced across processes.

    ``beta``, ``gamma``, ``alpha``, ``label_smoothing``, ``compute_nll_loss``, ``chunk_size`` and
    ``compiled`` are the SimPO options (those of :func:`patches.apply_fused_simpo`). The SimPO loss of a
    micro-batch is a mean over its pairs, so the trainer divides it by the gradient-accumulation steps
    itself (``model_accepts_loss_kwargs = False``): ``GA = k`` with batch ``b`` gives the update of one
    batch of ``k·b`` pairs, whatever the model's own ``accepts_loss_kwargs`` says.
    """

    def __init__(self, model=None, args=None, *, beta: float = 2.0, gamma: float = 1.0, alpha: float = 1.0,
                 label_smoothing: float = 0.0, compute_nll_loss: bool = False, use_fused_loss: bool = True,
                 chunk_size: int = 1, compiled: bool = True, ignore_index: int = -100, **trainer_kwargs):
        options = SimPOOptions(beta=beta, gamma=gamma, alpha=alpha, label_smoothing=label_smoothing,
                               compute_nll_loss=compute_nll_loss, ignore_index=ignore_index, chunk_size=chunk_size,
                               compiled=compiled)
        if not isinstance(use_fused_loss, bool):
            raise TypeError(f"use_fused_loss must be a bool (True or False), got {use_fused_loss!r}")
        self.options = options
        #: the options the loss-from-logits comparison path takes
        self.simpo_options = {name: getattr(options, name) for name in
                              ("beta", "gamma", "alpha", "label_smoothing", "compute_nll_loss", "ignore_index")}
        self.use_fused_loss = use_fused_loss
        if use_fused_loss:
            apply_fused_simpo(model, **options.as_dict())
        else:
            revert_fused_simpo(model)  # the comparison path needs the model's own logits
        super().__init__(model=model, args=args, **trainer_kwargs)
        # the collator reads the prompt/chosen/rejected (or *_input_ids) columns, which the model's forward lacks
        self.args.remove_unused_columns = False
        self.model_accepts_loss_kwargs = False
        self._stored_metrics: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
        self._eval_prefix = "eval"

    def simpo_forward(self, model, inputs) -> SimPOCausalLMOutputWithPast:
        """The SimPO outputs of one ``[chosen; rejected]`` batch (fused, or from the logits)."""
        if self.use_fused_loss:
            return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         labels=inputs["labels"])
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return simpo_loss_from_logits(logits, inputs["labels"], **self.simpo_options)

    def batch_metrics(self, outputs: SimPOCausalLMOutputWithPast) -> Dict[str, float]:
        """TRL's metrics of one batch, each gathered from all processes before the mean."""
        gather = self.accelerator.gather_for_metrics
        chosen, rejected = outputs.chosen_rewards.detach(), outputs.rejected_rewards.detach()
        per_pair = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": (chosen > rejected).to(chosen.dtype),
            "rewards/margins": chosen - rejected,
            "logps/chosen": outputs.chosen_logps.detach(),
            "logps/rejected": outputs.rejected_logps.detach(),
            "logits/chosen": outputs.chosen_logits_mean.detach().reshape(1),
            "logits/rejected": outputs.rejected_logits_mean.detach().reshape(1),
            "nll_loss": outputs.nll_loss.detach().reshape(1),
        }
        # at least float32 (bf16 means would round), float64 kept
        return {name: gather(value.to(torch.promote_types(value.dtype, torch.float32))).mean().item()
                for name, value in per_pair.items()}

    def _store(self, outputs, train_eval: str) -> None:
        for name, value in self.batch_metrics(outputs).items():
            self._stored_metrics[train_eval][name].append(value)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = self.simpo_forward(model, inputs)
        self._store(outputs, "train" if model.training else "eval")
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = self.simpo_forward(model, inputs)
        self._store(outputs, "eval")
        return outputs.loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._eval_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_prefix = "eval"

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the mean of each stored metric since the last log (``<prefix>_`` names in evaluation)."""
        if any(key.startswith(f"{self._eval_prefix}_") for key in logs):
            train_eval, prefix = "eval", f"{self._eval_prefix}_"
        elif "loss" in logs:
            train_eval, prefix = "train", ""
        else:
            return super().log(logs, start_time)
        for name, values in self._stored_metrics.pop(train_eval, {}).items():
            logs[prefix + name] = sum(values) / len(values)
        return super().log(logs, start_time)
