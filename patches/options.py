"""``SimPOOptions``: the SimPO options of a patched model, checked once when they are made.

The one source of the options: :func:`patches.apply_fused_simpo` and :class:`patches.trainer.SimPOTrainer` take
them as keywords (their signatures' defaults are this class's), the CLI's flags and their help are made from the
fields' metadata, and TRL's ``FusedCPOTrainer`` builds its options here too. Defaults follow the SimPO paper
(beta 2.0, gamma 1.0, i.e. gamma = 0.5 * beta, no NLL term); ``LigerFusedLinearSimPOLoss``'s own defaults (beta 0.1,
gamma 0.5, NLL on) are those of the loss module's fixed interface and differ on purpose.

Importing this module imports no torch (the CLI's ``--help`` builds its flags from it): the loss module's checks
are imported when an instance is made.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

#: Field metadata key: the help of the option's CLI flag (``--label-smoothing`` for ``label_smoothing``); the
#: options without it have no flag.
FLAG_HELP = "flag_help"
#: Field metadata key: the flag's default where it is not the field's (``--alpha``: see
#: :meth:`SimPOOptions.with_nll_weight`).
FLAG_DEFAULT = "flag_default"


@dataclass(frozen=True)
class SimPOOptions:
    beta: float = field(default=2.0, metadata={FLAG_HELP: "SimPO reward scale (> 0)"})
    gamma: float = field(default=1.0, metadata={FLAG_HELP: "SimPO target reward margin"})
    #: the NLL term's weight when ``compute_nll_loss``; the CLI's ``--alpha`` is the weight of
    #: :meth:`with_nll_weight`, whose 0 (no NLL term, as ``compute_nll_loss``'s default) is the flag's default
    alpha: float = field(default=1.0, metadata={
        FLAG_HELP: "weight of an NLL term on the chosen answers (>= 0; 0: pure SimPO)", FLAG_DEFAULT: 0.0})
    label_smoothing: float = field(default=0.0, metadata={FLAG_HELP: "conservative SimPO smoothing, in [0, 1]"})
    compute_nll_loss: bool = False
    ignore_index: int = -100
    chunk_size: int = field(default=1, metadata={FLAG_HELP: "pairs per chunk of the fused loss"})
    compiled: bool = True

    def __post_init__(self):
        from agent_code.liger_kernel.chunked_loss.simpo_loss import validate_simpo_options

        validate_simpo_options(**self.as_dict())

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> "SimPOOptions":
        """The options among a call's ``arguments`` (an entry point's ``locals()``, whose parameters include them
        by name); the others are left out."""
        return cls(**{name: arguments[name] for name in OPTION_NAMES if name in arguments})

    def with_nll_weight(self, weight: float) -> "SimPOOptions":
        """These options with an NLL term of weight ``weight`` on the chosen answers, none when it is 0: the rule of
        the CLI's ``--alpha`` and of TRL's ``cpo_alpha`` (``alpha = weight``, ``compute_nll_loss = weight != 0``;
        a negative weight is refused like a negative ``alpha``)."""
        return self.replace(alpha=weight, compute_nll_loss=weight != 0)

    def as_dict(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def replace(self, **changes) -> "SimPOOptions":
        return dataclasses.replace(self, **changes)

    def loss_module(self):
        """The fused loss module (``LigerFusedLinearSimPOLoss``) with these options."""
        from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOLoss

        return LigerFusedLinearSimPOLoss(**self.as_dict())


#: Option names, in declaration order (what ``apply_fused_simpo`` and ``SimPOTrainer`` accept as keywords).
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(SimPOOptions))
#: The options the CLI sets with a flag, in declaration order.
FLAG_OPTIONS = tuple(field for field in dataclasses.fields(SimPOOptions) if FLAG_HELP in field.metadata)
