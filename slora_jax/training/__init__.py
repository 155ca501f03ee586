"""LoRA fine-tuning in JAX (optax) on the served base model, saved in PEFT's format.

    from slora_jax.training import train_lora, save_peft_adapter
    lora = train_lora(engine, None, sequences, rank=8, alpha=16, steps=200)
    engine.load_adapter_weights("mine", lora)
    save_peft_adapter(lora, "adapters/mine", base_model_name="my-base")
"""

from slora_jax.training.lora import (TrainedLora, base_model, base_params, causal_lm_logits, init_lora,
                                     lora_params, model_loss, next_token_loss, pack_sequences, resolve_targets,
                                     train_lora)
from slora_jax.training.peft_format import peft_lora_config, save_peft_adapter

__all__ = [
    "TrainedLora", "base_model", "base_params", "causal_lm_logits", "init_lora", "lora_params", "model_loss",
    "next_token_loss",
    "pack_sequences", "peft_lora_config", "resolve_targets", "save_peft_adapter", "train_lora",
]
