"""Multi-adapter LoRA for decode (one row per token, MBGMV)."""
