"""``SimPOTrainer``: a ``transformers.Trainer`` that trains a causal LM with SimPO and logs TRL's metrics.

With ``use_fused_loss=True`` (default) the model is patched with :func:`patches.apply_fused_simpo`, so the
``(2B, T, V)`` logits never exist; with ``False`` the same loss is computed in plain PyTorch from the
model's logits (:func:`simpo_loss_from_logits`, TRL's ``CPOTrainer(loss_type="simpo")`` computation),
for comparison. Batches come from :class:`patches.collator.PreferenceCollator`.
"""
import copy
import math
from collections import defaultdict
from typing import Dict, Optional, Tuple

import torch
from transformers import Trainer

from agent_code.liger_kernel.chunked_loss.reference import simpo_from_logits
from patches import SimPOCausalLMOutputWithPast, apply_fused_simpo, revert_fused_simpo
from patches.labels import has_packed_layout, pairs_with_tokens, predicted_label_mask, shifted_target  # noqa: F401 (public here too)
from patches.options import SimPOOptions
from patches.outputs import AUX_OUTPUT_NAMES

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
#: The metrics of each pair: means over the pairs of a logging window that have answer tokens on both sides.
PAIR_METRIC_NAMES = METRIC_NAMES[:6]
#: The metrics of a whole batch (one value per process and batch), averaged over the window's batches.
BATCH_METRIC_NAMES = METRIC_NAMES[6:]
#: Number of pairs of a logging window left out of the per-pair metrics: a chosen or rejected answer with no
#: label token to predict. Their SimPO loss is zero and their log-probs would be a meaningless 0 (TRL: NaN).
PAIRS_WITHOUT_TOKENS = "pairs/without_tokens"


def preference_metric_totals(outputs: SimPOCausalLMOutputWithPast, labels: torch.Tensor, gather,
                             ignore_index: int = -100,
                             position_ids: Optional[torch.Tensor] = None) -> Dict[str, Tuple[float, int]]:
    """``{metric: (sum, count)}`` of one batch of preference outputs, reduced across processes by ``gather``
    (``accelerator.gather_for_metrics``). ``position_ids``: those of a packed batch (its ``labels`` are then
    ``(1, N)``).

    Per-pair metrics (:data:`PAIR_METRIC_NAMES`) sum over the pairs with answer tokens on both sides (``labels``
    tells which, shifted as the model shifts them), the count being those pairs; batch-level ones
    (:data:`BATCH_METRIC_NAMES`: logits means, NLL) are one value per process; :data:`PAIRS_WITHOUT_TOKENS` is
    ``(pairs left out, 1)``.
    """
    chosen, rejected = outputs.chosen_rewards.detach(), outputs.rejected_rewards.detach()
    per_pair = torch.stack([
        chosen, rejected, (chosen > rejected).to(chosen.dtype), chosen - rejected,
        outputs.chosen_logps.detach(), outputs.rejected_logps.detach(),
    ], dim=1)
    per_batch = torch.stack([outputs.chosen_logits_mean.detach(), outputs.rejected_logits_mean.detach(),
                             outputs.nll_loss.detach()]).reshape(1, len(BATCH_METRIC_NAMES))
    # at least float32 (bf16 sums would round), float64 kept
    dtype = torch.promote_types(per_pair.dtype, torch.float32)
    has_tokens = pairs_with_tokens(labels, ignore_index, position_ids).to(per_pair.device, dtype)
    # the mask travels in the same tensor as the values, so the gather keeps them aligned
    gathered = gather(torch.cat([per_pair.to(dtype), has_tokens[:, None]], dim=1))
    values, has_tokens = gathered[:, :-1], gathered[:, -1] > 0
    pair_sums = torch.where(has_tokens[:, None], values, 0).sum(dim=0).tolist()
    n_with_tokens = int(has_tokens.sum())
    totals = {name: (total, n_with_tokens) for name, total in zip(PAIR_METRIC_NAMES, pair_sums)}
    batch_values = gather(per_batch.to(torch.promote_types(per_batch.dtype, torch.float32)))
    totals.update({name: (total, batch_values.shape[0])
                   for name, total in zip(BATCH_METRIC_NAMES, batch_values.sum(dim=0).tolist())})
    totals[PAIRS_WITHOUT_TOKENS] = (float(has_tokens.numel() - n_with_tokens), 1)
    return totals


def metric_value(name: str, total: float, count: int) -> float:
    """Mean of a metric from its ``(sum, count)`` (NaN with no count); the count of pairs left out as is."""
    if name == PAIRS_WITHOUT_TOKENS:
        return int(total)
    return total / count if count else math.nan


def simpo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = SimPOOptions.beta,
    gamma: float = SimPOOptions.gamma,
    alpha: float = SimPOOptions.alpha,
    label_smoothing: float = SimPOOptions.label_smoothing,
    compute_nll_loss: bool = SimPOOptions.compute_nll_loss,
    ignore_index: int = SimPOOptions.ignore_index,
) -> SimPOCausalLMOutputWithPast:
    """SimPO from full logits, in plain PyTorch: what the fused loss replaces (the ``--no-patch`` path).

    ``logits`` ``(2B, T, V)``, ``labels`` ``(2B, T)`` unshifted (HF convention): position ``t`` predicts
    ``labels[:, t + 1]``, the log-softmax runs in float32 (at least), as TRL's ``CPOTrainer`` computes it; see
    :func:`agent_code.liger_kernel.chunked_loss.reference.simpo_from_logits` for the math. The options are checked
    as :class:`SimPOOptions` checks them (``TypeError``/``ValueError`` naming the first bad one).
    """
    SimPOOptions.from_arguments(locals())  # compute_nll_loss="no" would otherwise add the NLL term
    loss, aux_outputs = simpo_from_logits(
        logits, shifted_target(labels, ignore_index), ignore_index, beta, alpha, label_smoothing, compute_nll_loss,
        gamma, softmax_dtype=torch.promote_types(logits.dtype, torch.float32),
    )
    return SimPOCausalLMOutputWithPast(loss=loss, logits=None, **dict(zip(AUX_OUTPUT_NAMES, aux_outputs)))


def _packing_collator(collator):
    """A copy of the :class:`PreferenceCollator` ``collator`` that packs its batches."""
    from patches.collator import PreferenceCollator

    if not isinstance(collator, PreferenceCollator):
        raise TypeError(f"padding_free=True needs data_collator=PreferenceCollator(...), got "
                        f"{type(collator).__name__}; or pass padding-free batches yourself (one row, position_ids, "
                        f"no attention_mask) and leave padding_free=False")
    packing = copy.copy(collator)
    packing.padding_free = True
    return packing


class SimPOTrainer(Trainer):
    """Trainer for SimPO on ``[chosen; rejected]`` batches; logs TRL's metric names, reduced across processes.

    ``beta``, ``gamma``, ``alpha``, ``label_smoothing``, ``compute_nll_loss``, ``chunk_size`` and
    ``compiled`` are the SimPO options (those of :func:`patches.apply_fused_simpo`). The SimPO loss of a
    micro-batch is a mean over its pairs, so the trainer divides it by the gradient-accumulation steps
    itself (``model_accepts_loss_kwargs = False``): ``GA = k`` with batch ``b`` gives the update of one
    batch of ``k·b`` pairs, whatever the model's own ``accepts_loss_kwargs`` says.

    A ``model_init`` (instead of ``model``) works as with ``Trainer``: each model it returns is patched (or, with
    ``use_fused_loss=False``, unpatched) as a given ``model`` would be.

    Padding-free batches (``PreferenceCollator(padding_free=True)``: one row, ``position_ids`` restarting at each
    sequence, no attention mask) are recognised by their keys; ``padding_free=True`` makes a
    :class:`~patches.collator.PreferenceCollator` given as ``data_collator`` pack its batches (a copy of it is
    used). They need the fused loss (``use_fused_loss=True``).
    """

    def __init__(self, model=None, args=None, *, beta: float = SimPOOptions.beta, gamma: float = SimPOOptions.gamma,
                 alpha: float = SimPOOptions.alpha, label_smoothing: float = SimPOOptions.label_smoothing,
                 compute_nll_loss: bool = SimPOOptions.compute_nll_loss, use_fused_loss: bool = True,
                 chunk_size: int = SimPOOptions.chunk_size, compiled: bool = SimPOOptions.compiled,
                 ignore_index: int = SimPOOptions.ignore_index, padding_free: bool = False, **trainer_kwargs):
        options = SimPOOptions.from_arguments(locals())
        if not isinstance(use_fused_loss, bool):
            raise TypeError(f"use_fused_loss must be a bool (True or False), got {use_fused_loss!r}")
        if not isinstance(padding_free, bool):
            raise TypeError(f"padding_free must be a bool (True or False), got {padding_free!r}")
        if padding_free:
            trainer_kwargs["data_collator"] = _packing_collator(trainer_kwargs.get("data_collator"))
        if padding_free and not use_fused_loss:
            raise ValueError("padding_free=True needs use_fused_loss=True: the comparison path computes the loss "
                             "from padded logits")
        self.padding_free = padding_free
        self.options = options
        #: the options the loss-from-logits comparison path takes
        self.simpo_options = {name: getattr(options, name) for name in
                              ("beta", "gamma", "alpha", "label_smoothing", "compute_nll_loss", "ignore_index")}
        self.use_fused_loss = use_fused_loss
        if model is not None or trainer_kwargs.get("model_init") is None:
            self._patch_or_revert(model)  # a model_init's models are patched as it makes them (call_model_init)
        super().__init__(model=model, args=args, **trainer_kwargs)
        # the collator reads the prompt/chosen/rejected (or *_input_ids) columns, which the model's forward lacks
        self.args.remove_unused_columns = False
        self.model_accepts_loss_kwargs = False
        #: ``{"train" | "eval": {metric: (sum, count)}}``: training since the last log, evaluation since the
        #: current evaluation loop began
        self._stored_metrics: Dict[str, Dict[str, Tuple[float, int]]] = defaultdict(dict)

    def _patch_or_revert(self, model):
        """Patch ``model`` with the SimPO options, or take the patch off for the comparison path (which needs the
        model's own logits); returns it."""
        if self.use_fused_loss:
            return apply_fused_simpo(model, **self.options.as_dict())
        return revert_fused_simpo(model)

    def call_model_init(self, trial=None):
        """A fresh model from ``model_init``, patched (or unpatched) like a ``model`` given to the trainer."""
        return self._patch_or_revert(super().call_model_init(trial))

    def simpo_forward(self, model, inputs) -> SimPOCausalLMOutputWithPast:
        """The SimPO outputs of one ``[chosen; rejected]`` batch (fused, or from the logits), padded or packed."""
        if has_packed_layout(inputs):
            if not self.use_fused_loss:
                raise ValueError("a padding-free batch (position_ids, no attention_mask) needs use_fused_loss=True")
            return model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], labels=inputs["labels"],
                         use_cache=False)
        if self.use_fused_loss:
            return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         labels=inputs["labels"])
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return simpo_loss_from_logits(logits, inputs["labels"], **self.simpo_options)

    def batch_totals(self, outputs: SimPOCausalLMOutputWithPast, labels: torch.Tensor,
                     position_ids: Optional[torch.Tensor] = None) -> Dict[str, Tuple[float, int]]:
        """:func:`preference_metric_totals` of one batch, gathered from all processes."""
        return preference_metric_totals(outputs, labels, self.accelerator.gather_for_metrics,
                                        self.options.ignore_index, position_ids)

    metric_value = staticmethod(metric_value)

    def batch_metrics(self, outputs: SimPOCausalLMOutputWithPast, labels: torch.Tensor,
                      position_ids: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """TRL's metrics of one batch (and the count of pairs left out), reduced across processes."""
        return {name: self.metric_value(name, *total)
                for name, total in self.batch_totals(outputs, labels, position_ids).items()}

    def _store(self, outputs, inputs, train_eval: str) -> None:
        stored = self._stored_metrics[train_eval]
        position_ids = inputs["position_ids"] if has_packed_layout(inputs) else None
        for name, (total, count) in self.batch_totals(outputs, inputs["labels"], position_ids).items():
            previous_total, previous_count = stored.get(name, (0.0, 0))
            stored[name] = (previous_total + total, previous_count + count)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = self.simpo_forward(model, inputs)
        self._store(outputs, inputs, "train" if model.training else "eval")
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = self.simpo_forward(model, inputs)
        self._store(outputs, inputs, "eval")
        return outputs.loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """The Trainer's loop behind ``evaluate()`` and ``predict()``, its metrics completed with the SimPO metrics
        of its own batches as ``<metric_key_prefix>_<name>`` (``eval_…`` / ``test_…`` by default).

        Each loop's metrics are its own: ``evaluate()`` logs them and returns them, ``predict()`` returns them in
        its ``metrics``; neither leaves anything for the next evaluation or training log.
        """
        self._stored_metrics.pop("eval", None)  # left by a loop that raised, or by calls outside a loop
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            totals = self._stored_metrics.pop("eval", {})
        output.metrics.update({f"{metric_key_prefix}_{name}": self.metric_value(name, *total)
                               for name, total in totals.items()})
        return output

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """Add to a training log (one with ``loss``) each training metric stored since the last one.

        Per-pair metrics are means over the window's pairs with answer tokens (NaN when it has none), batch-level
        ones means over its batches; ``pairs/without_tokens`` counts the pairs left out. Evaluation metrics are
        already in the metrics ``evaluate()`` logs (see :meth:`evaluation_loop`).
        """
        if "loss" in logs:
            for name, (total, count) in self._stored_metrics.pop("train", {}).items():
                logs[name] = self.metric_value(name, total, count)
        return super().log(logs, start_time)
