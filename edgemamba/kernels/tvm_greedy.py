"""Greedy decoding on the device: the next token of each sequence from its logits, as a TIR kernel.

    ids[b] = argmax(logits[b])   the first index of the largest value, as numpy.argmax;
             -1                  where the row holds a NaN or an infinity (the Session refuses it,
                                 as its host sampler does)

A decode loop that feeds `ids` back into the next step keeps the logits on the device: per token
only the ids come back to the host (4 bytes a sequence, instead of the vocabulary's logits).
The contract in NumPy: `edgemamba.kernels.reference.greedy_pick`.
"""

from tvm.script import tirx as T

from edgemamba.kernels.tvm_common import FULL_MASK, ROW_VIEW, Pdl, pdl_marks, with_pdl

# GPU: two kernels a step. greedy_part: a block of THREADS threads per CHUNK logits of a sequence
# (each thread LOADS of them, all issued before any compare) leaves the chunk's (largest, first
# index, or -1 where the chunk holds a NaN or an infinity); greedy_final: a warp per sequence
# reduces those. One block reading a row (50,280 logits) took 7.4 µs of an H100 step; its loads
# in flight are what bounds it.
THREADS, LOADS = 256, 4
CHUNK = THREADS * LOADS


def greedy_parts(vocab: int) -> int:
    """Chunks per sequence of the GPU kernels (greedy_part's blocks per row)."""
    return -(-vocab // CHUNK)


def greedy_kernel(batch: int, vocab: int, gpu: bool, pdl: Pdl | None = None):
    """CPU: the PrimFunc greedy(logits (batch, vocab) float32, ids (batch,) int32), ids written.
    GPU: (greedy_part(logits, parts (batch, greedy_parts(vocab), 2) int32), greedy_final(parts, ids)),
    a part being (the chunk's largest value's bits, its first index or -1). pdl: both kernels wait
    for the kernel before them (the step's last) and let the next launch early."""
    lowest = T.min_value("float32")
    NP = greedy_parts(vocab)
    head, tail = pdl_marks(pdl if gpu else None)

    @T.macro
    def take(best, arg, bad, v, i, b):
        # (v, i) replaces (best, arg) if larger, or equal at a lower index; b: v's row had a non-finite
        if v > best[0] or (v == best[0] and i < arg[0]):
            best[0] = v
            arg[0] = i
        bad[0] = T.max(bad[0], b)

    @T.macro
    def warp_reduce(best, arg, bad):
        ov = T.alloc_buffer((1,), "float32", scope="local")  # the partner lane's (best, arg, bad)
        oi = T.alloc_buffer((1,), "int32", scope="local")
        ob = T.alloc_buffer((1,), "int32", scope="local")
        for s in T.unroll(5):
            ov[0] = T.tvm_warp_shuffle_xor(FULL_MASK, best[0], 16 >> s, 32, 32)
            oi[0] = T.tvm_warp_shuffle_xor(FULL_MASK, arg[0], 16 >> s, 32, 32)
            ob[0] = T.tvm_warp_shuffle_xor(FULL_MASK, bad[0], 16 >> s, 32, 32)
            take(best, arg, bad, ov[0], oi[0], ob[0])

    @T.prim_func(private=True)
    def greedy_part(logits: T.Buffer((batch, vocab), "float32", **ROW_VIEW), parts: T.Buffer((batch, NP, 2), "int32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(batch * NP, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                best = T.alloc_buffer((1,), "float32", scope="local")
                arg = T.alloc_buffer((1,), "int32", scope="local")
                bad = T.alloc_buffer((1,), "int32", scope="local")
                sv = T.alloc_buffer((THREADS // 32,), "float32", scope="shared")
                si = T.alloc_buffer((THREADS // 32,), "int32", scope="shared")
                sb = T.alloc_buffer((THREADS // 32,), "int32", scope="shared")
                vals = T.alloc_buffer((LOADS,), "float32", scope="local")
                head()
                b, lo = bx // NP, bx % NP * CHUNK
                best[0] = lowest
                arg[0] = vocab
                bad[0] = 0
                for u in T.unroll(LOADS):  # coalesced; past the row: lowest at an index past vocab, never taken
                    vals[u] = T.if_then_else(lo + u * THREADS + tx < vocab,
                                             logits[b, T.min(lo + u * THREADS + tx, vocab - 1)], lowest)
                for u in T.unroll(LOADS):
                    take(best, arg, bad, vals[u], lo + u * THREADS + tx, T.Select(T.isfinite(vals[u]), 0, 1))
                warp_reduce(best, arg, bad)
                if tx % 32 == 0:
                    sv[tx // 32] = best[0]
                    si[tx // 32] = arg[0]
                    sb[tx // 32] = bad[0]
                T.tvm_storage_sync("shared")
                if tx < 32:
                    best[0] = T.if_then_else(tx < THREADS // 32, sv[T.min(tx, THREADS // 32 - 1)], lowest)
                    arg[0] = T.if_then_else(tx < THREADS // 32, si[T.min(tx, THREADS // 32 - 1)], vocab)
                    bad[0] = T.if_then_else(tx < THREADS // 32, sb[T.min(tx, THREADS // 32 - 1)], 0)
                    warp_reduce(best, arg, bad)
                    if tx == 0:
                        parts[b, bx % NP, 0] = T.reinterpret("int32", best[0])
                        parts[b, bx % NP, 1] = T.Select(bad[0] > 0, -1, arg[0])
                tail()

    @T.prim_func(private=True)
    def greedy_final(parts: T.Buffer((batch, NP, 2), "int32"), ids: T.Buffer((batch,), "int32", **ROW_VIEW)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(batch, thread="blockIdx.x"):
            for tx in T.thread_binding(32, thread="threadIdx.x"):
                best = T.alloc_buffer((1,), "float32", scope="local")
                arg = T.alloc_buffer((1,), "int32", scope="local")
                bad = T.alloc_buffer((1,), "int32", scope="local")
                head()
                best[0] = lowest
                arg[0] = vocab
                bad[0] = 0
                for j in T.unroll(-(-NP // 32)):
                    if j * 32 + tx < NP:
                        take(best, arg, bad, T.reinterpret("float32", parts[bx, j * 32 + tx, 0]),
                             T.max(parts[bx, j * 32 + tx, 1], 0), T.Select(parts[bx, j * 32 + tx, 1] < 0, 1, 0))
                warp_reduce(best, arg, bad)
                if tx == 0:
                    ids[bx] = T.Select(bad[0] > 0, -1, arg[0])
                tail()

    @T.prim_func(private=True)
    def greedy_cpu(logits: T.Buffer((batch, vocab), "float32", **ROW_VIEW), ids: T.Buffer((batch,), "int32", **ROW_VIEW)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        best = T.alloc_buffer((batch,), "float32")  # allocated outside the parallel loop (see cpu_workers)
        arg = T.alloc_buffer((batch,), "int32")
        bad = T.alloc_buffer((batch,), "int32")
        for b in T.parallel(batch):
            best[b] = lowest
            arg[b] = vocab
            bad[b] = 0
            for i in range(vocab):
                if logits[b, i] > best[b] or (logits[b, i] == best[b] and i < arg[b]):
                    best[b] = logits[b, i]
                    arg[b] = i
                if not T.isfinite(logits[b, i]):
                    bad[b] = 1
            ids[b] = T.Select(bad[b] > 0, -1, arg[b])

    if not gpu:
        return greedy_cpu.with_attr("global_symbol", f"greedy_{batch}x{vocab}")
    return (with_pdl(greedy_part.with_attr("global_symbol", f"greedy_part_{batch}x{vocab}"), pdl),
            with_pdl(greedy_final.with_attr("global_symbol", f"greedy_final_{batch}x{vocab}"), pdl))
