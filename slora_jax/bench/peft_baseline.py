"""The transformers + PEFT baseline of the S-LoRA paper: static batches of one adapter at a time.

As the paper's baseline: requests that have arrived are grouped by adapter; the adapter of the oldest one
is swapped in (its weights copied into a PEFT LoRA slot of its rank) and up to ``batch_size`` of its
requests run as one static batch (prompts padded to the longest, greedy decoding with a KV cache until the
longest output is done; each request finishes at the step its own output length is reached). Then the next
group. Runs on torch's GPU when there is one, else on the CPU (only sensible for tiny models).
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from typing import Optional, Sequence

import numpy as np

from slora_jax.bench.harness import RunResult, _progress
from slora_jax.bench.metrics import RequestRecord
from slora_jax.bench.trace import TraceRequest, prompt_tokens
from slora_jax.config import ModelConfig
from slora_jax.errors import ConfigError

_TORCH_DTYPES = ("float32", "bfloat16", "float16")


def torch_device(prefer: Optional[str] = None) -> str:
    import torch

    if prefer:
        return prefer
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_hf_model(cfg: ModelConfig, model_dir: Optional[str], dtype: str, device: str, seed: int = 0):
    """A LlamaForCausalLM-family model: loaded from ``model_dir``, or random weights of ``cfg``'s shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slora_jax.model.hf_config import to_hf_config

    if dtype not in _TORCH_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(_TORCH_DTYPES)}, got {dtype!r}")
    tdtype = getattr(torch, dtype)
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56

    def make(fn, *a):
        model = fn(*a, **{dtype_kw: tdtype})
        return model.to(tdtype)

    if model_dir is not None:
        model = make(AutoModelForCausalLM.from_pretrained, model_dir).to(device)
    else:
        hf = to_hf_config(cfg)
        conf = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
        torch.manual_seed(seed)
        with torch.device(device):
            model = make(AutoModelForCausalLM.from_config, conf)
        with torch.no_grad():  # random weights for a throughput run; values do not matter, finiteness does
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
    model.eval()
    return model


class PeftBaseline:
    """One PEFT model with a LoRA slot per distinct rank; adapters are swapped into the slots by copy."""

    def __init__(self, model, cfg: ModelConfig, adapters: dict, batch_size: int = 8):
        """``adapters``: name -> LoraWeights (host float32; several names may share one object)."""
        import torch
        from peft import LoraConfig, get_peft_model

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"--peft-batch-size must be a positive integer, got {batch_size!r}")
        self.cfg = cfg
        self.adapters = adapters
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        ranks = sorted({int(l.rank) for l in adapters.values()})
        targets = sorted({m for l in adapters.values() for m in l.target_modules})
        self.model = model
        self.slots: dict[int, str] = {}
        if ranks:
            for i, r in enumerate(ranks):
                lc = LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
                name = f"rank{r}"
                if i == 0:
                    self.model = get_peft_model(model, lc, adapter_name=name)
                else:
                    self.model.add_adapter(name, lc)
                self.slots[r] = name
            self.model.eval()
        self._layers = self._lora_layers()
        self._loaded: dict[str, object] = {}  # slot -> LoraWeights now in it
        fwd = inspect.signature(self._base().forward).parameters
        self._cache_kw = "cache" if "cache" in fwd else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in fwd), None)
        self.swaps = 0
        self.swap_s = 0.0
        self._torch = torch

    def unload(self):
        """The base model with every LoRA slot removed (peft injects layers into the model it wraps)."""
        return self.model.unload() if self.slots else self.model

    def _base(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _lora_layers(self) -> dict:
        """(layer, module) -> the peft LoraLayer of that projection."""
        out = {}
        for name, mod in self.model.named_modules():
            if hasattr(mod, "lora_A") and hasattr(mod, "scaling") and ".layers." in name:
                parts = name.split(".")
                i = parts.index("layers")
                out[(int(parts[i + 1]), parts[-1])] = mod
        return out

    def _swap_in(self, lora) -> str:
        """Copy ``lora``'s weights into the slot of its rank (skipped if it is already there)."""
        slot = self.slots[int(lora.rank)]
        if self._loaded.get(slot) is not lora:
            t0 = time.perf_counter()
            torch = self._torch
            with torch.no_grad():
                for (l, m), mod in self._layers.items():
                    ml = lora.modules.get(m)
                    a_w, b_w = mod.lora_A[slot].weight, mod.lora_B[slot].weight  # [r, in], [out, r]
                    if ml is None:
                        b_w.zero_()
                        continue
                    a_w.copy_(torch.from_numpy(np.ascontiguousarray(ml.a[l])))
                    b_w.copy_(torch.from_numpy(np.ascontiguousarray(ml.b[l].T)))
                    mod.scaling[slot] = float(ml.scales[l])
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self._loaded[slot] = lora
            self.swaps += 1
            self.swap_s += time.perf_counter() - t0
        return slot

    def generate(self, prompts: list[list[int]], adapter: Optional[str], steps: int, on_token=None) -> np.ndarray:
        """Greedy tokens [B, steps] of one static batch on ``adapter`` (None = base model)."""
        if adapter is None or not self.slots:
            ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else _null()
        else:
            self.model.set_adapter(self._swap_in(self.adapters[adapter]))
            ctx = _null()
        with ctx:
            return self._generate(prompts, steps, on_token or (lambda step: None))

    def _generate(self, prompts: list[list[int]], steps: int, on_token) -> np.ndarray:
        """Greedy decoding of a static batch; ``on_token(step)`` after each step (step 0 = first token)."""
        torch = self._torch
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        # Prompts padded (left) to the longest with their own tokens repeated: every row computes as much.
        ids = torch.tensor([(p * (width // len(p) + 1))[:width - len(p)] + p for p in prompts], device=self.device)
        cache = DynamicCache()
        kw = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw:
            kw[self._keep_kw] = 1
        out = []
        with torch.no_grad():
            for step in range(steps):
                logits = self.model(input_ids=ids, **kw).logits[:, -1]
                ids = logits.argmax(-1, keepdim=True)
                out.append(ids.cpu().numpy()[:, 0])  # waits for the step, as a streaming server would
                on_token(step)
        return np.stack(out, axis=1) if out else np.zeros((len(prompts), 0), np.int64)

    def run(self, trace: Sequence[TraceRequest], adapters: Sequence[Optional[str]], *,
            time_limit_s: Optional[float] = None, progress: bool = True, desc: str = "peft",
            prompt_seed: int = 0) -> RunResult:
        """Serve ``trace`` on the trace's clock; same records and metrics as ``harness.run_trace``."""
        n = len(trace)
        prompts = prompt_tokens(trace, self.cfg.vocab_size, seed=prompt_seed)
        records = [RequestRecord(i, adapters[i], r.input_len, r.output_len, r.arrival_s)
                   for i, r in enumerate(trace)]
        order = sorted(range(n), key=lambda i: trace[i].arrival_s)
        upcoming = deque(order)
        arrived: list[int] = []
        bar = _progress(n, desc, progress)
        t0 = time.monotonic()
        finished = 0
        timed_out = False
        while finished < n:
            now = time.monotonic() - t0
            if time_limit_s is not None and now > time_limit_s:
                timed_out = True
                break
            while upcoming and trace[upcoming[0]].arrival_s <= now:
                arrived.append(upcoming.popleft())
            if not arrived:
                wait = trace[upcoming[0]].arrival_s - now
                if time_limit_s is not None:
                    wait = min(wait, time_limit_s - now)
                time.sleep(max(wait, 0.0))
                continue
            adapter = adapters[arrived[0]]
            batch = [i for i in arrived if adapters[i] == adapter][:self.batch_size]
            chosen = set(batch)
            arrived = [i for i in arrived if i not in chosen]
            outs = [trace[i].output_len for i in batch]

            def on_token(step, batch=batch, outs=outs):
                t = time.monotonic() - t0
                for i, n_out in zip(batch, outs):
                    rec = records[i]
                    if step == 0:
                        rec.first_token_s = t
                    if step + 1 == n_out:
                        rec.finish_s, rec.finish_reason, rec.generated = t, "length", n_out

            self.generate([prompts[i] for i in batch], adapter, max(outs), on_token)
            finished += len(batch)
            bar.n = finished
            bar.refresh()
        bar.close()
        end = time.monotonic() - t0
        if timed_out:
            for rec in records:
                if rec.finish_s is None or rec.finish_s > end:
                    rec.finish_reason, rec.finish_s = None, None
            total = end
        else:
            total = max([r.finish_s for r in records if r.finish_s is not None] + [1e-9])
        engine = {"backend": "peft", "device": str(self.device), "batch_size": self.batch_size,
                  "adapter_swaps": self.swaps, "adapter_swap_s": self.swap_s, "timed_out": timed_out}
        return RunResult(records, total, engine, {})


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
