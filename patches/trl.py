"""``FusedCPOTrainer``: TRL's ``CPOTrainer`` with the LM head fused into the preference loss. Migration::

    from trl.experimental.cpo import CPOConfig, CPOTrainer                      # before
    from trl.experimental.cpo import CPOConfig
    from patches.trl import FusedCPOTrainer as CPOTrainer                       # after: one changed import

Same constructor, tokenisation, collator, batching, logged metrics (``rewards/*``, ``logps/*``, ``logits/*``,
``nll_loss``, ``eval_*``) and objective as ``CPOTrainer`` (tested with TRL 1.16.0), but the trainer's own forward
passes run the model patched (:func:`patches.fused_simpo`) so that the ``(2B, T, V)`` logits and their float32
log-softmax are never built: the head and the loss run chunk by chunk. The patch lasts only for those calls; the
model object is otherwise left as it was given (its own forward, loss and logits, during training too).
Pairs whose chosen or rejected answer has no token left (truncation) are left out of the per-pair metrics and
counted in ``pairs/without_tokens`` (TRL averages them in): the one intended difference.

Every ``loss_type`` of TRL 1.16 is supported (sigmoid, hinge, ipo, simpo, alphapo) with every option that changes
it (``beta``, ``label_smoothing``, ``simpo_gamma``, ``cpo_alpha``, ``alpha``). Refused at construction, with a
message: other loss types, encoder-decoder models, MoE router auxiliary losses (``output_router_logits``), heads
the fused loss cannot replace, and option values (``beta <= 0``, ``cpo_alpha < 0``, ``label_smoothing`` outside
[0, 1], a non-finite ``beta``, ``cpo_alpha``, ``simpo_gamma`` or ``alpha``) for which TRL's objective is degenerate.

``FusedCPOTrainer(..., padding_free=True)`` (an argument of this trainer: TRL 1.16's ``CPOConfig`` has no such
field) runs each batch padding-free: TRL's padded ``[chosen; rejected]`` rows packed end to end into one row
(``position_ids`` restarting at each sequence, no attention mask), which the patched forward computes with
variable-length attention. Same loss, log-probs, rewards and gradients; ``logits/*`` then average the real
tokens only (TRL's include the padding positions).
"""
import contextlib
import inspect
import math
from typing import Any, Dict, Iterator, Tuple

import torch

try:
    from trl.experimental.cpo import CPOConfig, CPOTrainer
except ImportError as error:  # TRL missing, or a version without trl.experimental.cpo
    raise ImportError(
        "patches.trl (FusedCPOTrainer) needs TRL's CPOTrainer from trl.experimental.cpo; install the tested "
        "version with: pip install trl==1.16.0"
    ) from error

from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
from agent_code.liger_kernel.chunked_loss.cpo_loss import CPO_FUNCTIONS, LigerFusedLinearCPOLoss
from patches.apply import fused_simpo, unwrap_peft
from patches.heads import head_softcap, plain_linear_head
from patches.labels import IGNORE_INDEX  # TRL pads labels with it (concatenated_inputs, the collator)
from patches.options import SimPOOptions
from patches.trainer import PAIRS_WITHOUT_TOKENS, metric_value, preference_metric_totals

#: The TRL version whose CPOTrainer this trainer is tested against.
TESTED_TRL_VERSION = "1.16.0"
#: The metrics of ``CPOTrainer.get_batch_loss_metrics``, in its order (``eval_``-prefixed in evaluation).
TRL_METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected",
                    "logps/chosen", "logits/rejected", "logits/chosen", "nll_loss")


def _check_config(args: CPOConfig) -> None:
    """Refuse, naming the ``CPOConfig`` field, what the fused loss would not compute as ``CPOTrainer`` does."""
    if args.loss_type not in CPO_FUNCTIONS:
        raise ValueError(
            f"FusedCPOTrainer does not support CPOConfig.loss_type={args.loss_type!r}; supported: "
            f"{sorted(CPO_FUNCTIONS) + ['alphapo']} (use trl's CPOTrainer for other loss types)"
        )
    # finite first: an infinite cpo_alpha or a NaN simpo_gamma would otherwise be refused later, under the fused
    # loss's names (alpha, gamma), which in CPOConfig mean other things
    finite = {name: math.isfinite(getattr(args, name)) for name in ("beta", "cpo_alpha", "simpo_gamma", "alpha")}
    checks = (
        ("beta", finite["beta"] and args.beta > 0, "> 0 and finite"),
        ("cpo_alpha", finite["cpo_alpha"] and args.cpo_alpha >= 0, ">= 0 and finite"),
        ("label_smoothing", 0 <= args.label_smoothing <= 1, "in [0, 1]"),
        ("simpo_gamma", finite["simpo_gamma"], "finite"),
        ("alpha", finite["alpha"], "finite"),
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

    fused_chunk_size: int = SimPOOptions.chunk_size
    fused_compiled: bool = SimPOOptions.compiled

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
        with self.fused_loss_patch(self.model):  # refuses now what cannot be patched; leaves the model as it was
            pass

    def _fused_simpo_options(self) -> SimPOOptions:
        """The SimPO options of this trainer's configuration (what ``CPOTrainer`` copied from its ``CPOConfig``):
        the one mapping from TRL's names to the fused loss's."""
        function = CPO_FUNCTIONS[self.loss_type]
        return SimPOOptions(
            beta=self.beta,
            gamma=self.simpo_gamma if function.uses_gamma else 0.0,
            # CPOTrainer ignores label smoothing for hinge and ipo (it warns); so does the fused loss
            label_smoothing=self.label_smoothing if function.uses_label_smoothing else 0.0,
            ignore_index=IGNORE_INDEX,
            chunk_size=self.fused_chunk_size,
            compiled=self.fused_compiled,
        ).with_nll_weight(self.cpo_alpha)  # CPOTrainer adds no NLL term (and logs nll_loss 0) when cpo_alpha == 0

    def fused_loss_options(self) -> Dict[str, Any]:
        """Keyword arguments of :class:`LigerFusedLinearCPOLoss` for this trainer's configuration."""
        return dict(loss_type=self.loss_type, alphapo_alpha=self.alpha, **self._fused_simpo_options().as_dict())

    def _fused_patch_target(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` without its DDP / DeepSpeed / FSDP containers (accelerate's ``unwrap_model``, which keeps the
        mixed-precision forward wrapper). Remembered for the last ``model``: the unwrap reads package metadata, a
        few milliseconds per step."""
        cached = self.__dict__.get("_fused_target_cache")
        if cached is None or cached[0] is not model:
            cached = (model, self.accelerator.unwrap_model(model))
            self._fused_target_cache = cached
        return cached[1]

    @contextlib.contextmanager
    def fused_loss_patch(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``with trainer.fused_loss_patch(model):`` the model runs this trainer's fused loss for the block only.

        ``model`` is what the trainer calls (the model, or its DDP / DeepSpeed / FSDP / ``torch.compile`` / PEFT
        wrapper): the HF model inside it is patched with :func:`patches.fused_simpo`, and restored on exit, also
        after an exception, to exactly its previous state, with :meth:`fused_loss_module` as its ``loss_fn``.
        """
        with fused_simpo(self._fused_patch_target(model), loss_fn=self.fused_loss_module()):
            yield model

    def fused_loss_module(self) -> LigerFusedLinearSimPOLoss:
        """The loss module of :meth:`fused_loss_options`, built once per set of options (the patch installs it for
        each forward): SimPO without AlphaPO is the patch's own SimPO loss (closed-form gradient; its ``gamma`` is
        TRL's absolute margin ``simpo_gamma``), the other losses ``LigerFusedLinearCPOLoss``."""
        options = self.fused_loss_options()
        key = tuple(sorted(options.items()))
        cached = self.__dict__.get("_fused_loss_cache")
        if cached is None or cached[0] != key:
            loss_type, alphapo_alpha = options.pop("loss_type"), options.pop("alphapo_alpha")
            if loss_type == "simpo" and alphapo_alpha == 0.0:
                module = SimPOOptions(**options).loss_module()
            else:
                module = LigerFusedLinearCPOLoss(loss_type=loss_type, alphapo_alpha=alphapo_alpha, **options)
            cached = self._fused_loss_cache = (key, module)
        return cached[1]

    def fused_forward(self, model, batch: Dict[str, torch.Tensor]) -> Tuple[Any, torch.Tensor]:
        """The model, patched for this call, on ``[chosen; rejected]``, padded as ``CPOTrainer.concatenated_forward`` pads them
        (packed into one row with ``padding_free=True``).

        Returns the model's output (the loss with the NLL term and the per-pair statistics, no logits) and the
        concatenated ``(2B, T)`` labels.
        """
        concatenated_batch = self.concatenated_inputs(
            batch,
            is_encoder_decoder=self.is_encoder_decoder,
            padding_value=self.pad_token_id,
            device=self.accelerator.device,
        )
        labels = concatenated_batch["concatenated_labels"]  # (2B, T) also when packed: the metrics' pair mask
        inputs = dict(input_ids=concatenated_batch["concatenated_input_ids"],
                      attention_mask=concatenated_batch["concatenated_attention_mask"], labels=labels)
        if self.padding_free:
            inputs = pack_rows(**inputs)
        with self.fused_loss_patch(model):
            outputs = model(**inputs, use_cache=False)
        if getattr(outputs, "chosen_logps", None) is None:  # the model's own LM loss would be a silent swap
            raise RuntimeError(
                f"FusedCPOTrainer's call of {type(model).__name__} did not run the fused loss: its forward does not "
                f"reach the forward of the model inside it, which the trainer patches"
            )
        return outputs, labels

    def get_batch_loss_metrics(self, model, batch: Dict[str, torch.Tensor], train_eval: str = "train"):
        """``CPOTrainer.get_batch_loss_metrics`` from the fused loss: the same loss and metrics, by name.

        The per-pair metrics (``rewards/*``, ``logps/*``) average over the pairs with answer tokens on both sides
        (absent when the batch has none); ``pairs/without_tokens`` counts the others, which TRL averages in (their
        log-prob is NaN for simpo and ipo, 0 for sigmoid and hinge).
        """
        outputs, labels = self.fused_forward(model, batch)
        totals = preference_metric_totals(outputs, labels, self.accelerator.gather_for_metrics, IGNORE_INDEX)
        prefix = "eval_" if train_eval == "eval" else ""
        metrics = {f"{prefix}{name}": metric_value(name, *totals[name]) for name in TRL_METRIC_NAMES
                   if totals[name][1]}
        metrics[f"{prefix}{PAIRS_WITHOUT_TOKENS}"] = metric_value(PAIRS_WITHOUT_TOKENS,
                                                                  *totals[PAIRS_WITHOUT_TOKENS])
        return outputs.loss, metrics

    def log(self, logs: Dict[str, float], start_time=None) -> None:
        """``CPOTrainer.log``: each stored metric's mean over the window's batches, except ``pairs/without_tokens``,
        their sum; a per-pair metric that no batch of the window had (no pair with tokens) is logged as NaN."""
        train_eval = "train" if "loss" in logs else "eval"  # CPOTrainer.log's rule
        prefix = "eval_" if train_eval == "eval" else ""
        stored = self._stored_metrics[train_eval]
        counts = stored.pop(f"{prefix}{PAIRS_WITHOUT_TOKENS}", None)
        if counts is not None:  # the window stored batches: log every metric, in CPOTrainer's order
            window = {f"{prefix}{name}": stored.pop(f"{prefix}{name}", [math.nan]) for name in TRL_METRIC_NAMES}
            window.update(stored)  # what a subclass stored besides
            self._stored_metrics[train_eval] = window
            logs[f"{prefix}{PAIRS_WITHOUT_TOKENS}"] = sum(counts)
        return super().log(logs, start_time)


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
