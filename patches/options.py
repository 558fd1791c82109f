"""``SimPOOptions``: the SimPO options of a patched model, checked once when they are made.

The CLI, :class:`patches.trainer.SimPOTrainer` and :func:`patches.apply_fused_simpo` all carry their options in
this one object, so defaults and checks live in one place. Defaults follow the SimPO paper (beta 2.0, gamma 1.0,
i.e. gamma = 0.5 * beta, no NLL term); ``LigerFusedLinearSimPOLoss``'s own defaults (beta 0.1, gamma 0.5, NLL on)
are those of the loss module's fixed interface and differ on purpose.
"""
import dataclasses
from dataclasses import dataclass

from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOLoss, validate_simpo_options


@dataclass(frozen=True)
class SimPOOptions:
    beta: float = 2.0
    gamma: float = 1.0
    alpha: float = 1.0
    label_smoothing: float = 0.0
    compute_nll_loss: bool = False
    ignore_index: int = -100
    chunk_size: int = 1
    compiled: bool = True

    def __post_init__(self):
        validate_simpo_options(**self.as_dict())

    def as_dict(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def replace(self, **changes) -> "SimPOOptions":
        return dataclasses.replace(self, **changes)

    def loss_module(self) -> LigerFusedLinearSimPOLoss:
        """The fused loss module with these options."""
        return LigerFusedLinearSimPOLoss(**self.as_dict())


#: Option names, in declaration order (what ``apply_fused_simpo`` and ``SimPOTrainer`` accept as keywords).
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(SimPOOptions))
