"""Multi-adapter LoRA for prefill (runs of tokens sharing an adapter, MBGMM)."""
