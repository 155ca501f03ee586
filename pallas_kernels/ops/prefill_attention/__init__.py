"""Causal attention over packed variable-length sequences (prefill)."""
