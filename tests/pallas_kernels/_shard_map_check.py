"""Run by test_composition.py in a subprocess with two simulated CPU devices (XLA_FLAGS set there).

`main`: each op runs under jax.shard_map on a 2-device mesh, sharded the way the engine shards
it, and must equal the same op unsharded. `lower_for_gpu`: the compiled kernels lower for CUDA
under shard_map with check_vma=True. Prints "ok ..." per check; any failure raises.

Interpret-mode Pallas needs check_vma=False under shard_map (jax's interpreter indexes varying
refs with non-varying grid indices and trips the check); the compiled GPU path does not.
"""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as Ps

import pallas_kernels as pk
from pallas_kernels.testing import kv_page_tables, make_lora_case, relative_error


def main(implementation, check_vma):
    assert jax.device_count() == 2, jax.devices()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    shard_map = functools.partial(jax.shard_map, mesh=mesh, check_vma=check_vma)
    rng = np.random.default_rng(0)
    rep = Ps()

    # LoRA: tokens split over devices, pool and tables replicated.
    outs = (32, 16)
    ranks = rng.choice([0, 4, 16], size=(3, 2, 2)).astype(np.int32)
    case = make_lora_case(rng, num_layers=2, num_pages=120, page_rows=16, width=16, d_in=32, out_sizes=outs,
                          ranks=ranks)
    T = 32
    slot = np.sort(rng.integers(-1, 3, T)).astype(np.int32)
    x = rng.standard_normal((T, 32)).astype(np.float32)
    y = rng.standard_normal((T, 48)).astype(np.float32)
    tables = (case.pool, case.a_pages, case.b_pages, case.ranks, case.scales)
    for op in (pk.lora_decode, pk.lora_prefill):
        def local(y, x, slot, pool, a, b, r, s):
            return op(y, x, pool, 1, a, b, r, s, slot, out_sizes=outs, implementation=implementation)

        sharded = jax.jit(shard_map(
            local, in_specs=(Ps("x"), Ps("x"), Ps("x")) + (rep,) * 5, out_specs=Ps("x")
        ))(y, x, slot, *tables)
        whole = jax.jit(local)(y, x, slot, *tables)
        assert relative_error(sharded, whole, base=y) < 1e-6, op.__name__
        print("ok", op.__name__)

    # Paged attention with the KV heads split: each device holds W/2 columns of the pool.
    B, NB, D, Nkv, Nq = 3, 4, 16, 2, 4
    lengths = np.array([5, 64, 17], np.int32)
    kp, vp = kv_page_tables(rng, lengths, NB, 64, 16)
    pool = rng.standard_normal((2, 64, 16, Nkv * D)).astype(np.float32)
    q = rng.standard_normal((B, Nq, D)).astype(np.float32)

    def attn(q, pool, kp, vp, lengths):
        return pk.paged_decode_attention(q, pool, 1, kp, vp, lengths, sm_scale=0.25, implementation=implementation)

    sharded = jax.jit(shard_map(
        attn, in_specs=(Ps(None, "x"), Ps(None, None, None, "x"), rep, rep, rep), out_specs=Ps(None, "x")
    ))(q, pool, kp, vp, lengths)
    assert relative_error(sharded, jax.jit(attn)(q, pool, kp, vp, lengths)) < 1e-6
    print("ok paged_decode_attention")

    # Prefill attention with heads split.
    T = 40
    seg = np.repeat([0, 1], [25, 15]).astype(np.int32)
    pos = np.concatenate([np.arange(25), np.arange(15)]).astype(np.int32)
    qp = rng.standard_normal((T, Nq, D)).astype(np.float32)
    kk = rng.standard_normal((T, Nkv, D)).astype(np.float32)

    def pre(q, k, v, seg, pos):
        return pk.prefill_attention(q, k, v, seg, pos, sm_scale=0.25, implementation=implementation)

    sharded = jax.jit(shard_map(
        pre, in_specs=(Ps(None, "x"),) * 3 + (rep, rep), out_specs=Ps(None, "x")
    ))(qp, kk, kk, seg, pos)
    assert relative_error(sharded, jax.jit(pre)(qp, kk, kk, seg, pos)) < 1e-6
    print("ok prefill_attention")

    # K/V write with the pool's columns split.
    k = rng.standard_normal((3, Nkv * D)).astype(np.float32)
    rows = np.array([3, 70, -1], np.int32)

    def wr(pool, k, rows):
        return pk.write_kv(pool, 0, k, k, rows, rows + 1, implementation=implementation)

    col = Ps(None, None, None, "x")
    sharded = jax.jit(shard_map(wr, in_specs=(col, Ps(None, "x"), rep), out_specs=col))(pool, k, rows)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jax.jit(wr)(pool, k, rows)))
    print("ok write_kv")




def lower_for_gpu():
    """The compiled (Triton) kernels lowered for CUDA: under shard_map with check_vma=True, and alone
    at Llama-2-7B / Llama-3-8B sizes. Lowering builds the Triton IR of every kernel (shapes, dtypes,
    indexing) without a GPU; only Triton's own compilation is left for the GPU machine."""
    from jax import export

    from pallas_kernels import _backend

    _backend.interpret_mode = lambda: False  # lower the GPU kernels even on this CPU host
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    skip = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

    def export_cuda(name, f, *args):
        text = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=skip)(*args).mlir_module()
        assert "__gpu$xla.gpu.triton" in text, name
        print("ok lowered", name)

    def sharded(name, fn, in_specs, out_specs, *args):
        export_cuda(name, jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs), *args)

    def sd(shape, dtype, spec=None):
        sharding = None if spec is None else jax.sharding.NamedSharding(mesh, spec)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    bf, i32, f32 = jnp.bfloat16, jnp.int32, jnp.float32
    outs, T, S, L, P, R, W = (1024, 256, 256), 64, 4, 2, 100, 16, 256
    tok, rep, heads, cols = Ps("x"), Ps(), Ps(None, "x"), Ps(None, None, None, "x")
    lora_args = (
        sd((T, 1536), bf, tok), sd((T, 1024), bf, tok), sd((T,), i32, tok), sd((L, P, R, W), bf, rep),
        sd((S, 3, 4, 4), i32, rep), sd((S, 3, 4, 4), i32, rep), sd((S, L, 3), i32, rep), sd((S, L, 3), f32, rep),
    )
    for op in (pk.lora_decode, pk.lora_prefill):
        def local(y, x, slot, pool, a, b, r, s, op=op):
            return op(y, x, pool, 1, a, b, r, s, slot, out_sizes=outs, implementation="pallas")

        sharded(op.__name__, local, (tok,) * 3 + (rep,) * 5, tok, *lora_args)

    def attn(q, pool, kp, vp, n):
        return pk.paged_decode_attention(q, pool, 0, kp, vp, n, sm_scale=0.1, implementation="pallas")

    sharded("paged_decode_attention", attn, (heads, cols, rep, rep, rep), heads, sd((8, 8, 64), bf, heads),
            sd((L, P, R, 4 * 64), bf, cols), sd((8, 6), i32, rep), sd((8, 6), i32, rep), sd((8,), i32, rep))

    def pre(q, k, v, s, p):
        return pk.prefill_attention(q, k, v, s, p, sm_scale=0.1, sliding_window=32, implementation="pallas")

    sharded("prefill_attention", pre, (heads, heads, heads, rep, rep), heads, sd((200, 8, 64), bf, heads),
            sd((200, 4, 64), bf, heads), sd((200, 4, 64), bf, heads), sd((200,), i32, rep), sd((200,), i32, rep))
    sharded("write_kv", lambda pool, k, r: pk.write_kv(pool, 1, k, k, r, r, implementation="pallas"),
            (cols, heads, rep), cols, sd((L, P, R, W), bf, cols), sd((T, W), bf, heads), sd((T,), i32, rep))

    # Unsharded at real sizes: bf16 pool with W = 1024 (8 KV heads x 128).
    pool = sd((4, 64, 16, 1024), bf)
    export_cuda(  # B * Nkv = 16 programs: the page table is split
        "paged_decode_attention split",
        lambda q, pool, kp, n: pk.paged_decode_attention(q, pool, 2, kp, kp, n, sm_scale=0.1, implementation="pallas"),
        sd((2, 32, 128), bf), pool, sd((2, 256), i32), sd((2,), i32),
    )
    export_cuda(  # a mixed step's prompt chunks over the same pool: 300 tokens of 3 requests, sliding window
        "paged_prefill_attention",
        lambda q, pool, row, pos, kp: pk.paged_prefill_attention(q, pool, 1, row, pos, kp, kp, sm_scale=0.1,
                                                                 sliding_window=100, implementation="pallas"),
        sd((300, 32, 128), bf), pool, sd((300,), i32), sd((300,), i32), sd((4, 40), i32),
    )
    for op, t in ((pk.lora_decode, 16), (pk.lora_prefill, 512)):
        def mlp(y, x, pool, a, b, r, s, slot, op=op):
            return op(y, x, pool, 3, a, b, r, s, slot, out_sizes=(11008, 11008), implementation="pallas")

        export_cuda(f"{op.__name__} gate/up", mlp, sd((t, 22016), bf), sd((t, 4096), bf), pool, sd((8, 2, 4, 4), i32),
                    sd((8, 2, 11, 4), i32), sd((8, 4, 2), i32), sd((8, 4, 2), f32), sd((t,), i32))

    # MBGMV's groupings at the benchmark's q/k/v GQA shape, from one token (single splits) to a full batch, in
    # bf16 and float32 (tl.dot at full precision).
    from pallas_kernels.ops.lora_decode import pallas_triton as mbgmv
    from pallas_kernels.ops.lora_layout import LoraDims

    for grouping in ("kernel", "sort", "runs", "none"):
        for t, dt in ((1, bf), (2, bf), (8, bf), (256, bf), (40, f32)):
            p_ = sd((2, 64, 16, 1024), dt)
            dims = LoraDims(num_tokens=t, d_in=4096, out_sizes=(4096, 1024, 1024), num_layers=2, num_pages=64,
                            page_rows=16, width=1024, num_slots=8, in_chunks=4, out_chunks_max=4, rank_blocks=4)

            def qkv(y, x, pool, a, b, r, s, slot, grouping=grouping, dims=dims):
                return mbgmv.lora_decode_pallas(y, x, pool, 1, a, b, r, s, slot, dims=dims, interpret=False,
                                                grouping=grouping)

            export_cuda(f"lora_decode {grouping} T={t} {jnp.dtype(dt).name}", qkv, sd((t, 6144), dt),
                        sd((t, 4096), dt), p_, sd((8, 3, 4, 4), i32), sd((8, 3, 4, 4), i32), sd((8, 2, 3), i32),
                        sd((8, 2, 3), f32), sd((t,), i32))

    # The copy kernel of benchmarks/bandwidth.py.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
    import bandwidth

    for dt in (bf, jnp.uint32):
        export_cuda(f"bandwidth copy {jnp.dtype(dt).name}", lambda x: bandwidth._pallas_copy(x, interpret=False),
                    sd((1 << 20,), dt))


if __name__ == "__main__":
    if sys.argv[1] == "lower":
        lower_for_gpu()
    else:
        main(sys.argv[1], sys.argv[2] == "check_vma")
