"""Token selection on the device, vectorised over the batch: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array,
           seeds: jax.Array, counters: jax.Array, *, greedy_only: bool = False) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row.

    logits [B, V] float32; temperature/top_p [B] float32; top_k [B] int32 (0 = off);
    seeds [B] uint32 and counters [B] int32 (tokens generated so far): the key of a row is
    fold_in(PRNGKey(seed), counter), so a seeded request gives the same tokens whatever batch it
    is in and after a preemption. ``greedy_only`` (static, known on the host) skips the sort of the
    vocabulary, which costs more than the rest of sampling. Returns (tokens [B] int32, log-probabilities [B] float32 of the
    chosen tokens under the unmodified distribution).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # A static choice, not lax.cond: a device-side conditional makes XLA:GPU read the predicate on the
    # host, which stalls the dispatching thread until the whole step has run.
    tokens = greedy if greedy_only else _sample_filtered(logits, temperature, top_p, top_k, seeds, counters,
                                                         greedy)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _sample_filtered(logits, temperature, top_p, top_k, seeds, counters, greedy):
    V = logits.shape[-1]
    t = jnp.maximum(temperature, 1e-6)[:, None]
    vals, idx = jax.lax.top_k(logits / t, V)  # sorted descending
    rank = jnp.arange(V, dtype=jnp.int32)[None, :]
    k = jnp.where(top_k > 0, top_k, V)[:, None]
    vals = jnp.where(rank < k, vals, -jnp.inf)
    probs = jax.nn.softmax(vals, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    vals = jnp.where((before < top_p[:, None]) | (rank == 0), vals, -jnp.inf)

    def draw(seed, counter, row):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), counter)
        return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(seeds, counters, vals)
    sampled = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
