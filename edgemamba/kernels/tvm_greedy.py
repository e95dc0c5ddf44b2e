"""Greedy decoding on the device: the next token of each sequence from its logits, as a TIR kernel.

    ids[b] = argmax(logits[b])   the first index of the largest value, as numpy.argmax;
             -1                  where the row holds a NaN or an infinity (the Session refuses it,
                                 as its host sampler does)

A decode loop that feeds `ids` back into the next step keeps the logits on the device: per token
only the ids come back to the host (4 bytes a sequence, instead of the vocabulary's logits).
"""

import numpy as np
from tvm.script import tirx as T

from edgemamba.kernels.tvm_common import FULL_MASK, ROW_VIEW

THREADS = 1024  # GPU: one block a sequence


def greedy_reference(logits):
    """The contract, in NumPy: (batch, vocab) -> (batch,) int32."""
    out = np.argmax(logits, axis=1).astype(np.int32)
    out[~np.all(np.isfinite(logits), axis=1)] = -1
    return out


def greedy_kernel(batch: int, vocab: int, gpu: bool):
    """The PrimFunc greedy(logits (batch, vocab) float32, ids (batch,) int32), ids written."""
    lowest = T.min_value("float32")
    INFLIGHT = 16  # GPU: loads a thread issues before comparing them
    ROUNDS = -(-vocab // (THREADS * INFLIGHT))

    @T.macro
    def take(best, arg, bad, v, i, b):
        # (v, i) replaces (best, arg) if larger, or equal at a lower index; b: v's row had a non-finite
        if v > best[0] or (v == best[0] and i < arg[0]):
            best[0] = v
            arg[0] = i
        bad[0] = T.max(bad[0], b)

    @T.macro
    def warp_reduce(best, arg, bad, ov, oi, ob):
        for s in T.unroll(5):
            ov[0] = T.tvm_warp_shuffle_xor(FULL_MASK, best[0], 16 >> s, 32, 32)
            oi[0] = T.tvm_warp_shuffle_xor(FULL_MASK, arg[0], 16 >> s, 32, 32)
            ob[0] = T.tvm_warp_shuffle_xor(FULL_MASK, bad[0], 16 >> s, 32, 32)
            take(best, arg, bad, ov[0], oi[0], ob[0])

    @T.prim_func(private=True)
    def greedy_gpu(logits: T.Buffer((batch, vocab), "float32", **ROW_VIEW), ids: T.Buffer((batch,), "int32", **ROW_VIEW)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(batch, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                best = T.alloc_buffer((1,), "float32", scope="local")
                arg = T.alloc_buffer((1,), "int32", scope="local")
                bad = T.alloc_buffer((1,), "int32", scope="local")
                ov = T.alloc_buffer((1,), "float32", scope="local")
                oi = T.alloc_buffer((1,), "int32", scope="local")
                ob = T.alloc_buffer((1,), "int32", scope="local")
                sv = T.alloc_buffer((THREADS // 32,), "float32", scope="shared")
                si = T.alloc_buffer((THREADS // 32,), "int32", scope="shared")
                sb = T.alloc_buffer((THREADS // 32,), "int32", scope="shared")
                vals = T.alloc_buffer((INFLIGHT,), "float32", scope="local")
                best[0] = lowest
                arg[0] = vocab
                bad[0] = 0
                # coalesced: thread tx takes every THREADS-th logit, INFLIGHT loads issued before any
                # compare (one block reads the row: its speed is the loads a thread keeps in flight)
                for j0 in range(ROUNDS):
                    for u in T.unroll(INFLIGHT):
                        vals[u] = T.if_then_else((j0 * INFLIGHT + u) * THREADS + tx < vocab,
                                                 logits[bx, T.min((j0 * INFLIGHT + u) * THREADS + tx, vocab - 1)],
                                                 lowest)
                    for u in T.unroll(INFLIGHT):  # past the row: lowest at an index past vocab, never taken
                        take(best, arg, bad, vals[u], (j0 * INFLIGHT + u) * THREADS + tx,
                             T.Select(T.isfinite(vals[u]), 0, 1))
                warp_reduce(best, arg, bad, ov, oi, ob)
                if tx % 32 == 0:
                    sv[tx // 32] = best[0]
                    si[tx // 32] = arg[0]
                    sb[tx // 32] = bad[0]
                T.tvm_storage_sync("shared")
                if tx < 32:
                    best[0] = sv[tx]
                    arg[0] = si[tx]
                    bad[0] = sb[tx]
                    warp_reduce(best, arg, bad, ov, oi, ob)
                    if tx == 0:
                        ids[bx] = T.Select(bad[0] > 0, -1, arg[0])

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

    f = greedy_gpu if gpu else greedy_cpu
    return f.with_attr("global_symbol", f"greedy_{batch}x{vocab}")
