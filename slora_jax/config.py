"""Frozen configuration: the base model's shape (read from config.json) and the engine's knobs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from sharding.distributed import check_distributed_args
from slora_jax.errors import ConfigError

# The seven linear projections of a Llama-family block, in the order every index table uses.
MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_MODULES = MODULES[:4]
MLP_MODULES = MODULES[4:]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2), as Hugging Face defines it."""

    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Normalised rope scaling: None, {"type": "linear", "factor": f} or
    # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None  # Mistral v0.1 style local attention
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "base"

    def __hash__(self) -> int:
        # The model's structure (nnx graphdef, a static argument of the step programs) holds this config;
        # rope_scaling is a dict, which the generated hash would refuse.
        return hash(repr(self))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection, as y = x @ W with W [in, out]."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs. Defaults work on a laptop CPU and on one GPU."""

    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16 on GPU) | "bfloat16" | "float16" | "float32"
    kernel_backend: str = "auto"  # "xla" | "pallas" | "auto" (pallas on GPU, xla on CPU)
    tensor_parallel: int = 1
    max_lora_rank: int = 64
    # Unified page pool. Either a page count, or a fraction of the device memory left after the
    # weights. On a backend that reports no memory (CPU) `cpu_pool_bytes` sizes it.
    num_pages: Optional[int] = None
    memory_fraction: float = 0.85
    cpu_pool_bytes: int = 256 << 20
    page_rows: int = 16  # rows (tokens of K or V, or rank rows of an adapter) per page
    # Batching.
    max_batch_size: int = 64  # running requests decoded in one step
    # Tokens of one step (decode tokens + prompt chunks; at least 2 x max_batch_size): longer prompts are
    # computed in chunks over several steps.
    max_prefill_tokens: int = 2048
    max_model_len: Optional[int] = None  # default: the model's max_position_embeddings
    max_adapters_on_device: int = 64  # adapter slots in the device index tables
    max_waiting: int = 100_000  # requests queued beyond this are refused with CapacityError
    # Scheduling.
    scheduler: str = "fcfs"  # "fcfs" | "cluster" | "slo" | "fair"
    # "optimistic": KV pages are taken as tokens are produced, and a full pool preempts (recomputes) the
    # newest request; "reserve": admit only if every running request fits at its maximum length.
    admission: str = "optimistic"
    # "optimistic": a new request is admitted only while this share of the pool stays free (or is held by
    # adapters nobody uses), for the running requests' next KV pages.
    kv_watermark: float = 0.01
    cluster_k: int = 4  # "cluster": adapters in a batch before same-adapter requests are preferred
    slo_first_token_s: Optional[float] = None  # "slo": drop requests that can no longer meet it
    prefetch: bool = True  # start adapter uploads for soon-to-run requests while a step runs
    prefetch_depth: int = 16  # waiting requests looked at for prefetch
    # Waiting requests whose adapters are read from disk into host memory ahead of use (reads run on
    # adapter_read_workers threads, default one per core up to 8; at most half the host cache in flight).
    read_ahead_depth: int = 256
    adapter_read_workers: Optional[int] = None
    # Where those reads run: "threads", "processes" (out of the engine's GIL: a busy engine thread slows
    # reader threads several-fold; benchmarks/NOTES.md) or "auto" (processes on GPU, threads elsewhere).
    adapter_readers: str = "auto"
    host_cache_bytes: int = 8 << 30  # bound of adapter weights held in host memory
    # On a GPU, pin that much host memory (at most half the machine's: the host tier's arena, registered for
    # DMA) when the engine is built: pinned memory grown while serving stalls the steps queued meanwhile, for up
    # to seconds per growth (benchmarks/NOTES.md), while pinning up front costs the build ~0.3-0.6 s per GiB
    # once. False: the arena stays unpinned (uploads from it are slower copies).
    pin_host_cache: bool = True
    # Scan over stacked layer weights (one compiled layer body: fast compiles) or unroll the layers
    # (per-layer arrays: no slicing of stacked weights inside the step; 1.7x faster decode on the
    # H200, benchmarks/NOTES.md). None: unroll on GPU, scan elsewhere.
    scan_layers: Optional[bool] = None
    # Queue step n+1 (fed by step n's tokens still on the device) before the host reads step n, so the
    # host's work overlaps the device's. Outputs then reach callers one step later.
    async_scheduling: bool = True
    # Decode steps whose tokens share few adapters run MBGMV's tile kernels (Pallas only; chosen per step by
    # ``pallas_kernels.lora_decode_grouping``): on the H200, 256 tokens on one adapter took 13.1-13.3 us per q/k/v
    # call against 31.8 (benchmarks/NOTES.md). False compiles two programs fewer (greedy and sampling) per
    # decode size above 16 rows.
    lora_decode_tiles: bool = True
    # Steps whose adapters all have rank <= page_rows run programs compiled for one rank block (Pallas only, and
    # only where max_lora_rank > page_rows): on the H200, 256 tokens on 256 rank-16 adapters in a rank-64 pool took
    # 50.2 against 54.3 us per q/k/v call, 8 tokens on one adapter 5.8 against 7.4 us (benchmarks/NOTES.md, "One
    # rank block"). False compiles half as many LoRA programs.
    lora_one_block_programs: bool = True
    seed: int = 0
    # JAX's persistent compilation cache: a second start with the same configuration compiles nothing.
    # None leaves it off.
    compile_cache_dir: Optional[str] = "~/.cache/slora-jax/xla"
    # A job of several processes (one per host or per GPU; ``jax.distributed``): process 0's address
    # (host:port, where it runs the coordinator), how many processes, and this one's index. All three or
    # none; the mesh then spans every process's devices, so tensor_parallel is their total.
    distributed_coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype must be 'auto', 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        if self.kernel_backend not in ("xla", "pallas", "auto"):
            raise ConfigError(f"kernel_backend must be 'xla', 'pallas' or 'auto', got {self.kernel_backend!r}")
        if self.scheduler not in ("fcfs", "cluster", "slo", "fair"):
            raise ConfigError(f"scheduler must be 'fcfs', 'cluster', 'slo' or 'fair', got {self.scheduler!r}")
        if self.admission not in ("optimistic", "reserve"):
            raise ConfigError(f"admission must be 'optimistic' or 'reserve', got {self.admission!r}")
        for name in ("tensor_parallel", "max_lora_rank", "page_rows", "max_batch_size", "max_prefill_tokens",
                     "max_adapters_on_device", "cluster_k", "read_ahead_depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 2):
            raise ConfigError(f"num_pages must be an integer >= 2, got {self.num_pages!r}")
        if self.adapter_readers not in ("auto", "threads", "processes"):
            raise ConfigError(f"adapter_readers must be 'auto', 'threads' or 'processes', got {self.adapter_readers!r}")
        if self.adapter_read_workers is not None and (not isinstance(self.adapter_read_workers, int)
                                                      or self.adapter_read_workers < 1):
            raise ConfigError(f"adapter_read_workers must be None or a positive integer, got {self.adapter_read_workers!r}")
        if not (0.0 <= self.kv_watermark < 1.0):
            raise ConfigError(f"kv_watermark must be in [0, 1), got {self.kv_watermark!r}")
        if not (0.0 < self.memory_fraction <= 1.0):
            raise ConfigError(f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        if self.slo_first_token_s is not None and not self.slo_first_token_s > 0:
            raise ConfigError(f"slo_first_token_s must be positive, got {self.slo_first_token_s!r}")
        try:
            check_distributed_args(self.distributed_coordinator, self.num_processes, self.process_id)
        except ValueError as e:
            raise ConfigError(str(e).replace("coordinator_address", "distributed_coordinator")) from None
        if self.scheduler == "slo" and self.slo_first_token_s is None:
            raise ConfigError("scheduler='slo' needs slo_first_token_s (e.g. 6.0)")

    def resolved_dtype(self, backend: str) -> str:
        """The dtype the engine runs in on ``backend`` (jax.default_backend()): "auto" is float32 on a CPU,
        where bfloat16 arithmetic is emulated and 100-1000x slower, and bfloat16 elsewhere."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if backend == "cpu" else "bfloat16"

    def resolved_readers(self, backend: str) -> str:
        """Where background adapter reads run on ``backend``: "auto" is processes on a GPU, where the
        engine thread's host work would otherwise hold reader threads back, and threads elsewhere (a CPU
        engine is for development: no processes to start)."""
        if self.adapter_readers != "auto":
            return self.adapter_readers
        return "processes" if backend == "gpu" else "threads"

    def resolved_scan_layers(self, backend: str) -> bool:
        """Scan the layers (one compiled layer body) unless told otherwise; unrolled on a GPU, where reading
        each layer's own arrays made decode steps 1.7x faster."""
        return self.scan_layers if self.scan_layers is not None else backend != "gpu"

    @property
    def multiprocess(self) -> bool:
        """Whether this engine is one process of a job of several (``num_processes`` > 1)."""
        return (self.num_processes or 1) > 1

    @property
    def max_rank_blocks(self) -> int:
        return math.ceil(self.max_lora_rank / self.page_rows)
