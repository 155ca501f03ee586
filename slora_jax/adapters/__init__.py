"""LoRA adapters: PEFT folder loading and validation."""

from slora_jax.adapters.peft import LoraWeights, ModuleLora, load_peft_adapter, read_adapter_config

__all__ = ["LoraWeights", "ModuleLora", "load_peft_adapter", "read_adapter_config"]
