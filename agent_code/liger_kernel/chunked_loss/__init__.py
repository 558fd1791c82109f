from agent_code.liger_kernel.chunked_loss.fused_linear_preference import LigerFusedLinearPreferenceBase  # noqa: F401
from agent_code.liger_kernel.chunked_loss.functional import liger_fused_linear_simpo  # noqa: F401
from agent_code.liger_kernel.chunked_loss.simpo_loss import (  # noqa: F401
    LigerFusedLinearSimPOFunction,
    LigerFusedLinearSimPOLoss,
)

__all__ = [
    "LigerFusedLinearPreferenceBase",
    "LigerFusedLinearSimPOFunction",
    "LigerFusedLinearSimPOLoss",
    "liger_fused_linear_simpo",
]
