"""The independent reference: transformers (+ peft) in float32, eager attention, no KV cache."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np


@functools.lru_cache(maxsize=16)
def _model(model_dir: str, adapter_dir: Optional[str]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter_dir is not None:
        from peft import PeftModel

        # Wrapping injects LoRA layers into ``model``, so each (model, adapter) pair loads its own base.
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def hf_model(model_dir, adapter_dir=None):
    """The cached float32 transformers model (a PeftModel when ``adapter_dir`` is given). Do not modify it."""
    return _model(str(model_dir), None if adapter_dir is None else str(adapter_dir))


def hf_logits(model_dir, adapter_dir, token_ids: Sequence[int]) -> np.ndarray:
    """Logits [len(token_ids), V] float32 of one sequence, positions 0..len-1."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        out = hf_model(model_dir, adapter_dir)(input_ids=ids, use_cache=False)
    return out.logits[0].float().numpy()


def hf_greedy(model_dir, adapter_dir, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The ``max_new_tokens`` greedy tokens after ``token_ids`` (argmax each step, no EOS stop, full recompute)."""
    seq = list(token_ids)
    for _ in range(max_new_tokens):
        seq.append(int(np.argmax(hf_logits(model_dir, adapter_dir, seq)[-1])))
    return seq[len(token_ids):]
