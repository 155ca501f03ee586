"""slora-jax: serve thousands of LoRA adapters over one base LLM, in JAX.

    import slora_jax as sj
    engine = sj.Engine.from_pretrained("path/to/hf-model", config=sj.EngineConfig(dtype="bfloat16"))
    engine.load_adapter("fr-poetry", "path/to/peft-adapter")
    outs = engine.generate([[1, 2, 3]], adapters=["fr-poetry"], sampling=sj.SamplingParams(max_tokens=16))
"""

from slora_jax import errors
from slora_jax.config import EngineConfig, ModelConfig
from slora_jax.engine.engine import Engine
from slora_jax.errors import AdapterError, CapacityError, ConfigError, ModelError, RequestError, UnknownAdapterError
from slora_jax.types import AdapterInfo, RequestMetrics, RequestOutput, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AdapterError", "AdapterInfo", "CapacityError", "ConfigError", "Engine", "EngineConfig", "ModelConfig",
    "ModelError", "RequestError", "RequestMetrics", "RequestOutput", "SamplingParams", "UnknownAdapterError",
    "errors", "__version__",
]
