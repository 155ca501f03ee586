"""The base model (flax.nnx Modules): config parsing, checkpoint loading, random checkpoints for tests and demos."""

from slora_jax.model.checkpoint import Tokenizer, estimate_param_bytes, load_params, load_tokenizer
from slora_jax.model.llama import MLP, Attention, DecoderLayer, Llama, from_params
from slora_jax.model.hf_config import load_model_config, parse_model_config, to_hf_config
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter, write_random_checkpoint

__all__ = [
    "MLP", "Attention", "DecoderLayer", "Llama", "from_params", "Tokenizer", "estimate_param_bytes", "load_model_config", "load_params", "load_tokenizer",
    "parse_model_config", "tiny_llama_config", "to_hf_config", "write_random_adapter", "write_random_checkpoint",
]
