"""Functional entry points: each is exactly its Function's ``apply``."""
from agent_code.liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction

liger_fused_linear_simpo = LigerFusedLinearSimPOFunction.apply
