"""``FusedCPOTrainer``: TRL's ``CPOTrainer`` with the LM head fused into the preference loss. Migration::

    from trl.experimental.cpo import CPOConfig, CPOTrainer                      # before
    from trl.experimental.cpo import CPOConfig
    from patches.trl import FusedCPOTrainer as CPOTrainer                       # after: one changed import

Same constructor, tokenisation, collator, batching, logged metrics (``rewards/*``, ``logps/*``, ``logits/*``,
``nll_loss``, ``eval_*``) and objective as ``CPOTrainer`` (tested with TRL 1.16.0), but the model's forward is
patched (:func:`patches.apply_fused_simpo`) so that the ``(2B, T, V)`` logits and their float32 log-softmax are
never built: the head and the loss run chunk by chunk. Every ``loss_type`` of TRL 1.16 is supported (sigmoid,
hinge, ipo, simpo, alphapo) with every option that changes it (``beta``, ``label_smoothing``, ``simpo_gamma``,
``cpo_alpha``, ``alpha``). Refused at construction, with a message: other loss types, encoder-decoder models,
MoE router auxiliary losses (``output_router_logits``), heads the fused loss cannot replace, and option values
(``beta <= 0``, ``cpo_alpha < 0``, ``label_smoothing`` outside [0, 1]) for which TRL's objective is degenerate.

``FusedCPOTrainer(..., padding_free=True)`` (an argument of this trainer: TRL 1.16's ``CPOConfig`` has no such
field) runs each batch padding-free: TRL's padded ``[chosen; rejected]`` rows packed end to end into one row
(``position_ids`` restarting at each sequence, no attention mask), which the patched forward computes with
variable-length attention. Same loss, log-probs, rewards and gradients; ``logits/*`` then average the real
tokens only (TRL's include the padding positions).
"""
import inspect
from typing import Any, Dict

import torch

try:
    from trl.experimental.cpo import CPOConfig, CPOTrainer
except ImportError as error:  # TRL missing, or a version without trl.experimental.cpo
    raise ImportError(
        "patches.trl (FusedCPOTrainer) needs TRL's CPOTrainer from trl.experimental.cpo; install the tested "
        "version with: pip install trl==1.16.0"
    ) from error

from agent_code.liger_kernel.chunked_loss.cpo_loss import CPO_FUNCTIONS, LigerFusedLinearCPOLoss
from patches.apply import _patch_state, apply_fused_simpo, unwrap_peft
from patches.heads import head_softcap, plain_linear_head

#: The TRL version whose CPOTrainer this trainer is tested against.
TESTED_TRL_VERSION = "1.16.0"
#: TRL's label padding value (``concatenated_inputs`` and the collator pad labels with it).
IGNORE_INDEX = -100


def _check_config(args: CPOConfig) -> None:
    """Refuse, naming the ``CPOConfig`` field, what the fused loss would not compute as ``CPOTrainer`` does."""
    if args.loss_type not in CPO_FUNCTIONS:
        raise ValueError(
            f"FusedCPOTrainer does not support CPOConfig.loss_type={args.loss_type!r}; supported: "
            f"{sorted(CPO_FUNCTIONS) + ['alphapo']} (use trl's CPOTrainer for other loss types)"
        )
    checks = (
        ("beta", args.beta > 0, "> 0"),
        ("cpo_alpha", args.cpo_alpha >= 0, ">= 0"),
        ("label_smoothing", 0 <= args.label_smoothing <= 1, "in [0, 1]"),
    )
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"FusedCPOTrainer needs CPOConfig.{name} {expected}, got {getattr(args, name)!r}")


def _check_model(model) -> None:
    """Refuse models whose CPO loss the fused forward cannot reproduce (checked before the dataset is tokenised)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"FusedCPOTrainer supports decoder-only causal LMs; {type(model).__name__} is an "
                         f"encoder-decoder model (use trl's CPOTrainer)")
    if getattr(config, "output_router_logits", False):
        raise ValueError(
            "FusedCPOTrainer does not add the MoE router auxiliary loss (model.config.output_router_logits=True); "
            "set output_router_logits=False or use trl's CPOTrainer"
        )
    inner = unwrap_peft(model)
    head_softcap(inner)  # UnsupportedModelError for heads the fused loss cannot replace
    plain_linear_head(inner)


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The rows of a padded batch end to end in one row, padding dropped: ``input_ids``, ``position_ids``
    (restarting at 0 at each row) and ``labels``, each ``(1, N)``, N the number of tokens the mask keeps. Each
    row's kept tokens must be contiguous (left or right padding)."""
    keep = attention_mask.bool()
    positions = keep.long().cumsum(dim=1) - 1
    return dict(input_ids=input_ids[keep][None], position_ids=positions[keep][None], labels=labels[keep][None])


class FusedCPOTrainer(CPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` whose loss never materialises the ``(2B, T, V)`` logits.

    Takes ``CPOTrainer``'s arguments, and ``padding_free`` (keyword, default False): pack each batch into one row
    (see the module's docstring). The fused loss's own knobs are class attributes (set them on a subclass):
    ``fused_chunk_size`` (pairs per chunk, default 1) and ``fused_compiled`` (allow compiled kernels; False forces
    plain PyTorch).
    """

    fused_chunk_size: int = 1
    fused_compiled: bool = True

    def __init__(self, *args, padding_free: bool = False, **kwargs):
        if not isinstance(padding_free, bool):
            raise TypeError(f"padding_free must be a bool (True or False), got {padding_free!r}")
        self.padding_free = padding_free
        bound = inspect.signature(CPOTrainer.__init__).bind(self, *args, **kwargs)
        config, model = bound.arguments.get("args"), bound.arguments.get("model")
        if config is not None:  # without args CPOTrainer raises its own error
            _check_config(config)
        if isinstance(model, torch.nn.Module):
            _check_model(model)
        super().__init__(*args, **kwargs)
        _check_model(self.model)  # again: a model given by name is loaded (and PEFT-wrapped) by CPOTrainer
        self._patch_model(self.model)

    def fused_loss_options(self) -> Dict[str, Any]:
        """Keyword arguments of :class:`LigerFusedLinearCPOLoss` for this trainer's configuration."""
        function = CPO_FUNCTIONS[self.loss_type]
        return dict(
            loss_type=self.loss_type,
            ignore_index=IGNORE_INDEX,
            beta=self.beta,
            alpha=self.cpo_alpha,
            # CPOTrainer ignores label smoothing for hinge and ipo (it warns); so does the fused loss
            label_smoothing=self.label_smoothing if function.uses_label_smoothing else 0.0,
            # CPOTrainer adds no NLL term (and logs nll_loss 0) when cpo_alpha == 0
            compute_nll_loss=self.cpo_alpha != 0,
            compiled=self.fused_compiled,
            gamma=self.simpo_gamma if function.uses_gamma else 0.0,
            chunk_size=self.fused_chunk_size,
            alphapo_alpha=self.alpha,
        )

    def _patch_model(self, model) -> None:
        """Patch ``model``'s forward with the fused loss of this trainer's ``loss_type``.

        SimPO without AlphaPO uses the SimPO loss of :func:`apply_fused_simpo` itself (closed-form gradient; its
        ``gamma`` is TRL's absolute margin ``simpo_gamma``); the other losses replace the patch's loss module.
        """
        options = self.fused_loss_options()
        loss_type, alphapo_alpha = options.pop("loss_type"), options.pop("alphapo_alpha")
        if loss_type == "simpo" and alphapo_alpha == 0.0:
            apply_fused_simpo(model, **options)
            return
        loss_fn = LigerFusedLinearCPOLoss(loss_type=loss_type, alphapo_alpha=alphapo_alpha, **options)
        apply_fused_simpo(model, ignore_index=options["ignore_index"], chunk_size=options["chunk_size"],
                          compiled=options["compiled"])
        _patch_state(model).loss_fn = loss_fn

    def fused_forward(self, model, batch: Dict[str, torch.Tensor]):
        """The patched model on ``[chosen; rejected]``, padded as ``CPOTrainer.concatenated_forward`` pads them
        (packed into one row with ``padding_free=True``).

        Returns the model's output: the loss (with the NLL term) and the per-pair statistics, no logits.
        """
        concatenated_batch = self.concatenated_inputs(
            batch,
            is_encoder_decoder=self.is_encoder_decoder,
            padding_value=self.pad_token_id,
            device=self.accelerator.device,
        )
        inputs = dict(input_ids=concatenated_batch["concatenated_input_ids"],
                      attention_mask=concatenated_batch["concatenated_attention_mask"],
                      labels=concatenated_batch["concatenated_labels"])
        if self.padding_free:
            inputs = pack_rows(**inputs)
        outputs = model(**inputs, use_cache=False)
        if getattr(outputs, "chosen_logps", None) is None:  # the model's own LM loss would be a silent swap
            raise RuntimeError(
                "FusedCPOTrainer's model is no longer patched with the fused loss (was revert_fused_simpo called, "
                "or its forward replaced?); build a new trainer"
            )
        return outputs

    def get_batch_loss_metrics(self, model, batch: Dict[str, torch.Tensor], train_eval: str = "train"):
        """``CPOTrainer.get_batch_loss_metrics`` from the fused loss: the same loss and metrics, by name."""
        outputs = self.fused_forward(model, batch)
        chosen_rewards, rejected_rewards = outputs.chosen_rewards, outputs.rejected_rewards
        gather = self.accelerator.gather_for_metrics
        prefix = "eval_" if train_eval == "eval" else ""
        # the names, order and reductions of CPOTrainer.get_batch_loss_metrics
        values = {
            "rewards/chosen": gather(chosen_rewards).mean(),
            "rewards/rejected": gather(rejected_rewards).mean(),
            "rewards/accuracies": gather((chosen_rewards > rejected_rewards).float()).mean(),
            "rewards/margins": gather(chosen_rewards - rejected_rewards).mean(),
            "logps/rejected": gather(outputs.rejected_logps).mean(),
            "logps/chosen": gather(outputs.chosen_logps).mean(),
            "logits/rejected": gather(outputs.rejected_logits_mean).mean(),
            "logits/chosen": gather(outputs.chosen_logits_mean).mean(),
            "nll_loss": gather(outputs.nll_loss).mean(),
        }
        metrics = {f"{prefix}{name}": value.item() for name, value in values.items()}
        return outputs.loss, metrics


def _signature_with_padding_free() -> inspect.Signature:
    """``CPOTrainer.__init__``'s signature with the keyword-only ``padding_free`` of this trainer."""
    signature = inspect.signature(CPOTrainer.__init__)
    parameters = list(signature.parameters.values())
    extra = inspect.Parameter("padding_free", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)
    at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    return signature.replace(parameters=[*parameters[:at], extra, *parameters[at:]])


# help() and the Trainer's introspection see CPOTrainer's own parameters (and padding_free)
FusedCPOTrainer.__init__.__signature__ = _signature_with_padding_free()

__all__ = ["FusedCPOTrainer", "TESTED_TRL_VERSION"]
