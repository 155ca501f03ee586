"""`slora-jax bench` with lengths the model's context cannot hold says so, before running anything."""

import json
import time

from slora_jax.bench.cli import main
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_checkpoint


def test_default_lengths_on_a_short_context_model_are_refused_by_name(tmp_path, capsys):
    model = write_random_checkpoint(tmp_path / "model", tiny_llama_config(max_position_embeddings=256), seed=1)
    out = tmp_path / "bench.json"
    t0 = time.monotonic()
    # The default --input-range and --output-range (8-512 each) against a 256-token context.
    code = main(["--model", str(model), "--num-adapters", "2", "--duration", "2", "--dtype", "float32",
                 "--kernel-backend", "xla", "--num-pages", "128", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "context of 256 tokens" in err and "--input-range 8 512" in err and "--output-range 8 512" in err, err
    assert time.monotonic() - t0 < 30  # refused before building an engine


def test_a_replayed_trace_too_long_for_the_context_is_refused(tmp_path, capsys):
    model = write_random_checkpoint(tmp_path / "model", tiny_llama_config(max_position_embeddings=256), seed=1)
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps({"arrival_s": 0.1 * i, "adapter": 0, "input_len": 100,
                                           "output_len": 100 + 60 * i}) for i in range(3)))
    code = main(["--model", str(model), "--trace", str(trace), "--dtype", "float32", "--kernel-backend", "xla",
                 "--num-pages", "128", "--no-progress", "--out", str(tmp_path / "bench.json")])
    err = capsys.readouterr().err
    assert code == 2 and "2 of 3 requests" in err and "up to 320 tokens" in err, err
