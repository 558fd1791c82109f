"""Memory-efficient fused linear + preference losses (independent implementation)."""
