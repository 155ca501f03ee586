"""The S-LoRA serving benchmark (``slora-jax bench``).

Modules: ``trace`` (the paper's synthetic workload and JSONL replay), ``harness`` (replay against a running
engine on the trace's clock), ``metrics`` (throughput, latencies, SLO attainment, user satisfaction),
``setup`` (base model and adapters), ``merged`` and ``peft_baseline`` (baselines), ``plots``, ``cli``.
"""
