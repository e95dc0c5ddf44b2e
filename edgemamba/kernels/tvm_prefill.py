"""Prefill kernels as TVM TIR: a chunk of t tokens of one sequence (t symbolic), plus the embedding.

    embed        h = E[ids]                                       (also the decode step's first kernel)
    row_norm     RMSNorm of each row (Mamba-2: the gated, grouped norm) into the matmul input
    matmul       out = [res +] x · Wᵀ [+ bias]                    x (t, K), W (N, K) as in torch
    conv_chunk   causal conv + silu over the chunk, in place on the conv channels, state in place (CPU)
    conv_out     the same out of place, every token at once (GPU)
    bcdt_norm    Falcon-Mamba's weightless RMSNorm of Δ, B and C, in place
    scan         the selective scan over the chunk, sequential in time, state in place (CPU)
    scan_states, scan_pieces
                 the same split in time into pieces scanned at once, the states carried between
                 them (GPU; `ScanChunkSpec`)
    last_row     the final hidden row, for the lm_head GEMV

GPU: matmul on tensor cores (WMMA) where its input is fp16, else TVM's dlight rule (CUDA cores); the
scans run one thread per (channel, lane) with lanes splitting d_state (Mamba-2: a thread takes several
channels of a head). CPU: rows or channels in parallel, matmul as register-tiled dot products, the
conv and the scan one task per channel walking the chunk.
"""

from dataclasses import dataclass  # no `from __future__ import annotations`: TVMScript reads the real annotations

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script import tirx as T

from edgemamba.kernels.tvm_common import (FULL_MASK, ROW_VIEW, c_name, clip_dt_expr, drop_unused_params, exp_expr,
                                          lane_reduce, Pdl, pdl_marks, rsum, silu_expr, softplus_expr, with_pdl)
from edgemamba.reference import rms_norm, silu
from edgemamba.spec import ModelSpec

THREADS = 128


def _rows(name: str = "t"):
    return tirx.Var(name, "int64")


# ---------------------------------------------------------------------------------------------
# embedding and the last row
# ---------------------------------------------------------------------------------------------
def embed_kernel(vocab: int, d: int, wdtype: str, gpu: bool, pdl: Pdl | None = None):
    """h (rows, d) float32 = E[ids] (int8: times the row's scale); rows symbolic (the decode batch
    or the prefill chunk). pdl (GPU, sm_90+): programmatic dependent launch, waiting first thing."""
    t = _rows()
    quantized = wdtype == "int8"
    pdl = pdl if gpu else None
    head, tail = pdl_marks(pdl)

    def row(E, E_scale, i, j):
        return T.Cast("float32", E[i, j]) * E_scale[i] if quantized else T.Cast("float32", E[i, j])

    @T.prim_func(private=True)
    def embed(ids: T.Buffer((t,), "int32", **ROW_VIEW), E: T.Buffer((vocab, d), wdtype),
              E_scale: T.Buffer((vocab,), "float32"), h: T.Buffer((t, d), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if gpu:
            for bx in T.thread_binding((t * d + THREADS - 1) // THREADS, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    head()
                    if bx * THREADS + tx < t * d:
                        h[(bx * THREADS + tx) // d, (bx * THREADS + tx) % d] = row(
                            E, E_scale, ids[(bx * THREADS + tx) // d], (bx * THREADS + tx) % d)
                    tail()
        else:
            for i in T.parallel(t):
                for j in range(d):
                    h[i, j] = row(E, E_scale, ids[i], j)

    names = ["ids", "E", "E_scale", "h"] if quantized else ["ids", "E", "h"]
    return with_pdl(drop_unused_params(embed, names, f"embed_{vocab}x{d}_{wdtype}"), pdl)


def last_row_kernel(d: int, gpu: bool):
    t = _rows()

    @T.prim_func(private=True)
    def last_row(h: T.Buffer((t, d), "float32"), out: T.Buffer((1, d), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if gpu:
            for bx in T.thread_binding((d + THREADS - 1) // THREADS, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    if bx * THREADS + tx < d:
                        out[0, bx * THREADS + tx] = h[t - 1, bx * THREADS + tx]
        else:
            for j in range(d):
                out[0, j] = h[t - 1, j]

    return last_row.with_attr("global_symbol", f"last_row_{d}")


# ---------------------------------------------------------------------------------------------
# row norms
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowNormSpec:
    k: int
    out_dtype: str = "float32"  # the matmul's input dtype
    groups: int = 1
    gated: bool = False  # Mamba-2: norm of x·silu(z), z read from a (t, z_cols) buffer at z_off
    norm_on_x: bool = False  # norm_before_gate: norm(x)·w·silu(z)
    z_cols: int = 1
    z_off: int = 0
    eps: float = 1e-5

    @property
    def params(self) -> list[str]:
        return ["x", "z", "w", "out"] if self.gated else ["x", "w", "out"]

    def name(self) -> str:
        g = f"_gated_g{self.groups}{'x' if self.norm_on_x else 'u'}_z{self.z_off}of{self.z_cols}" if self.gated else ""
        return f"row_norm_{self.k}_{self.out_dtype}{g}"


def row_norm_reference(s: RowNormSpec, x, w, z=None):
    if not s.gated:
        return rms_norm(x, w, s.eps).astype(s.out_dtype)
    gate = silu(z[:, s.z_off : s.z_off + s.k])
    grouped = (x if s.norm_on_x else x * gate).reshape(len(x), s.groups, -1)
    u = rms_norm(grouped, None, s.eps).reshape(x.shape) * w
    return (u * gate if s.norm_on_x else u).astype(s.out_dtype)


def row_norm_kernel(s: RowNormSpec, gpu: bool):
    """GPU: one warp per row, lanes strided along K, statistics shared by shuffles. CPU: rows in parallel."""
    t, K, G = _rows(), s.k, s.groups
    GS = K // G
    ZC = s.z_cols if s.gated else 1

    def value(x, z, i, k):  # x, or x·silu(z): what the norm's statistics see when gated on u
        return x[i, k] * silu_expr(z[i, s.z_off + k], not gpu) if s.gated else x[i, k]

    def stat(x, z, i, k):
        return x[i, k] if s.norm_on_x else value(x, z, i, k)

    def final(x, z, w, i, k, rstd):
        u = (x[i, k] if s.norm_on_x else value(x, z, i, k)) * rstd * w[k]
        return T.Cast(s.out_dtype, u * silu_expr(z[i, s.z_off + k], not gpu) if s.norm_on_x else u)

    @T.prim_func(private=True)
    def row_norm(x: T.Buffer((t, K), "float32"), z: T.Buffer((t, ZC), "float32"), w: T.Buffer((K,), "float32"),
                 out: T.Buffer((t, K), s.out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if gpu:
            for i in T.thread_binding(t, thread="blockIdx.x"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    ss = T.alloc_buffer((1,), "float32", scope="local")
                    for g in range(G):
                        ss[0] = T.float32(0)
                        for ko in range((GS + 31) // 32):
                            if ko * 32 + tx < GS:
                                ss[0] = ss[0] + stat(x, z, i, g * GS + ko * 32 + tx) * stat(x, z, i, g * GS + ko * 32 + tx)
                        for j in T.unroll(5):
                            ss[0] = ss[0] + T.tvm_warp_shuffle_down(FULL_MASK, ss[0], 16 >> j, 32, 32)
                        ss[0] = T.tvm_warp_shuffle(FULL_MASK, ss[0], 0, 32, 32)
                        for ko in range((GS + 31) // 32):
                            if ko * 32 + tx < GS:
                                out[i, g * GS + ko * 32 + tx] = final(
                                    x, z, w, i, g * GS + ko * 32 + tx, T.rsqrt(ss[0] / T.float32(GS) + T.float32(s.eps)))
        else:
            for i in T.parallel(t):
                ss = T.alloc_buffer((1,), "float32", scope="local")
                for g in range(G):
                    ss[0] = T.float32(0)
                    for k in range(GS):
                        ss[0] = ss[0] + stat(x, z, i, g * GS + k) * stat(x, z, i, g * GS + k)
                    for k in range(GS):
                        out[i, g * GS + k] = final(x, z, w, i, g * GS + k, T.rsqrt(ss[0] / T.float32(GS) + T.float32(s.eps)))

    return drop_unused_params(row_norm, s.params, s.name())


# ---------------------------------------------------------------------------------------------
# matmul
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatmulSpec:
    n: int
    k: int
    wdtype: str = "float32"
    adtype: str = "float32"  # dtype of x
    x_cols: int = 0  # width of x (0: k); read at columns [x_off, x_off + k)
    x_off: int = 0
    bias: bool = False
    residual: bool = False  # out = res + x·Wᵀ
    w_kn: bool = False  # W stored (K, N) instead

    @property
    def xw(self) -> int:
        return self.x_cols or self.k

    @property
    def w_shape(self) -> tuple[int, int]:
        return (self.k, self.n) if self.w_kn else (self.n, self.k)

    @property
    def quantized(self) -> bool:
        """int8 W with one float32 scale per output (row of W): applied in the epilogue."""
        return self.wdtype == "int8"

    @property
    def params(self) -> list[str]:
        return (["x", "W"] + (["w_scale"] if self.quantized else []) + (["bias"] if self.bias else [])
                + (["res"] if self.residual else []) + ["out"])

    def name(self) -> str:
        x = f"_x{self.x_off}of{self.xw}" if self.x_cols else ""
        return (f"matmul_{self.n}x{self.k}_{self.adtype}_{self.wdtype}{x}" + ("_wkn" if self.w_kn else "")
                + ("_bias" if self.bias else "") + ("_res" if self.residual else ""))


def matmul_reference(s: MatmulSpec, x, W, bias=None, res=None, w_scale=None):
    W = W.T if s.w_kn else W
    if s.quantized:
        W = W.astype(np.float64) * w_scale[:, None]
    y = x[:, s.x_off : s.x_off + s.k].astype(np.float64) @ W.astype(np.float64).T
    if s.bias:
        y = y + bias
    if s.residual:
        y = y + res
    return y.astype(np.float32)


def matmul_kernel(s: MatmulSpec, gpu: bool, target: tvm.target.Target | None = None):
    if not gpu:
        return _matmul_cpu(s)
    return _matmul_wmma(s) if wmma_eligible(s) else _matmul_gpu(s, target)


def wmma_eligible(s: MatmulSpec) -> bool:
    """fp16 × fp16 with 16-byte aligned rows: the tensor-core kernel; otherwise CUDA cores (the
    small float32 x_proj and dt_proj of Mamba-1)."""
    return (s.adtype == "float16" and s.wdtype in ("float16", "int8") and not s.w_kn and s.k % WMMA_BK == 0
            and s.xw % 8 == 0 and s.x_off % 8 == 0)


WMMA_BM, WMMA_BN, WMMA_BK = 64, 64, 32


def _matmul_wmma(s: MatmulSpec):
    """Tensor cores through WMMA (16×16×16, fp16 in, fp32 accumulate). A block of 4 warps makes a
    64×64 tile of out, each warp 32×32 (2×2 fragments); K goes in steps of 32 through shared
    memory, loaded with 16-byte accesses. Rows past t and columns past N read clamped indices and
    are not stored. The tile is staged through shared memory for the epilogue (bias, residual)."""
    t, N, K = _rows(), s.n, s.k
    BM, BN, BK = WMMA_BM, WMMA_BN, WMMA_BK
    LD = BK + 8  # halves per shared row: 80 bytes, a multiple of 16 as WMMA requires, off the bank period
    CLD = BN + 4  # floats per row of the fp32 staging tile
    NBN = (N + BN - 1) // BN
    ZN = N if s.residual else 1

    @T.prim_func(private=True)
    def matmul(x: T.Buffer((t, s.xw), "float16"), W: T.Buffer((N, K), s.wdtype), w_scale: T.Buffer((N,), "float32"),
               bias: T.Buffer((N,), "float32"), res: T.Buffer((t, ZN), "float32"), out: T.Buffer((t, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bn in T.thread_binding(NBN, thread="blockIdx.x"):
            for bm in T.thread_binding((t + BM - 1) // BM, thread="blockIdx.y"):
                for warp in T.thread_binding(4, thread="threadIdx.y"):
                    for lane in T.thread_binding(32, thread="threadIdx.x"):
                        A_s = T.alloc_buffer((BM, LD), "float16", scope="shared")
                        B_s = T.alloc_buffer((BN, LD), "float16", scope="shared")
                        C_s = T.alloc_buffer((BM, CLD), "float32", scope="shared")
                        a_frag = T.alloc_buffer((2, 16, 16), "float16", scope="wmma.matrix_a")
                        b_frag = T.alloc_buffer((2, 16, 16), "float16", scope="wmma.matrix_b")
                        c_frag = T.alloc_buffer((4, 16, 16), "float32", scope="wmma.accumulator")
                        for f in T.unroll(4):
                            T.evaluate(T.tvm_fill_fragment(c_frag.data, 16, 16, 16, f, T.float32(0), dtype="void"))
                        for kt in range(K // BK):
                            T.tvm_storage_sync("shared")
                            # 64 rows × 32 halves of each operand: 256 pieces of 8 halves, 2 per thread
                            for p in T.unroll(2):
                                for v in T.vectorized(8):
                                    A_s[(p * 128 + warp * 32 + lane) // 4, (p * 128 + warp * 32 + lane) % 4 * 8 + v] = x[
                                        T.min(bm * BM + (p * 128 + warp * 32 + lane) // 4, t - 1),
                                        s.x_off + kt * BK + (p * 128 + warp * 32 + lane) % 4 * 8 + v]
                                for v in T.vectorized(8):  # int8 weights become fp16 here; the scale comes last
                                    B_s[(p * 128 + warp * 32 + lane) // 4, (p * 128 + warp * 32 + lane) % 4 * 8 + v] = T.Cast(
                                        "float16", W[T.min(bn * BN + (p * 128 + warp * 32 + lane) // 4, N - 1),
                                                     kt * BK + (p * 128 + warp * 32 + lane) % 4 * 8 + v])
                            T.tvm_storage_sync("shared")
                            for kk in T.unroll(BK // 16):
                                for i in T.unroll(2):
                                    T.evaluate(T.tvm_load_matrix_sync(
                                        a_frag.data, 16, 16, 16, i,
                                        A_s.access_ptr("r", offset=(warp // 2 * 32 + i * 16) * LD + kk * 16), LD,
                                        "row_major", dtype="void"))
                                for j in T.unroll(2):  # W (n, k) row-major is Wᵀ (k, n) column-major
                                    T.evaluate(T.tvm_load_matrix_sync(
                                        b_frag.data, 16, 16, 16, j,
                                        B_s.access_ptr("r", offset=(warp % 2 * 32 + j * 16) * LD + kk * 16), LD,
                                        "col_major", dtype="void"))
                                for i in T.unroll(2):
                                    for j in T.unroll(2):
                                        T.evaluate(T.tvm_mma_sync(c_frag.data, i * 2 + j, a_frag.data, i, b_frag.data, j,
                                                                  c_frag.data, i * 2 + j, dtype="void"))
                        for i in T.unroll(2):
                            for j in T.unroll(2):
                                T.evaluate(T.tvm_store_matrix_sync(
                                    c_frag.data, 16, 16, 16, i * 2 + j,
                                    C_s.access_ptr("w", offset=(warp // 2 * 32 + i * 16) * CLD + warp % 2 * 32 + j * 16),
                                    CLD, "row_major", dtype="void"))
                        T.tvm_storage_sync("shared")
                        for p in range(BM * BN // 128):
                            if (bm * BM + (p * 128 + warp * 32 + lane) // BN < t
                                    and bn * BN + (p * 128 + warp * 32 + lane) % BN < N):
                                out[bm * BM + (p * 128 + warp * 32 + lane) // BN, bn * BN + (p * 128 + warp * 32 + lane) % BN] = (
                                    _matmul_epilogue(s, C_s[(p * 128 + warp * 32 + lane) // BN, (p * 128 + warp * 32 + lane) % BN],
                                                     bias, res, bm * BM + (p * 128 + warp * 32 + lane) // BN,
                                                     bn * BN + (p * 128 + warp * 32 + lane) % BN, w_scale))

    return drop_unused_params(matmul, s.params, s.name())


def _matmul_gpu(s: MatmulSpec, target):
    """The compute as TE, scheduled by dlight's Matmul rule on CUDA cores. Its tensor-core path is
    not taken: in TVM 0.27.0 it crashes (segfault in s_tir Tensorize), so the rule is applied under
    a copy of the target whose arch string it does not parse as a number."""
    import tvm.s_tir.dlight as dl

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731  (dlight wants one index dtype throughout)
    t = _rows()
    N, K = i64(s.n), i64(s.k)
    x = te.placeholder((t, i64(s.xw)), s.adtype, name="x")
    W = te.placeholder(tuple(i64(v) for v in s.w_shape), s.wdtype, name="W")
    k = te.reduce_axis((i64(0), K), name="k")
    w_at = (lambda j, k: W[k, j]) if s.w_kn else (lambda j, k: W[j, k])
    y = te.compute((t, N), lambda i, j: te.sum(x[i, k + s.x_off].astype("float32") * w_at(j, k).astype("float32"),
                                               axis=k), name="mm")
    args = [x, W]
    if s.quantized:
        w_scale = te.placeholder((N,), "float32", name="w_scale")
        y = te.compute((t, N), lambda i, j: y[i, j] * w_scale[j], name="scaled")
        args.append(w_scale)
    if s.bias:
        bias = te.placeholder((N,), "float32", name="bias")
        y = te.compute((t, N), lambda i, j: y[i, j] + bias[j], name="biased")
        args.append(bias)
    if s.residual:
        res = te.placeholder((t, N), "float32", name="res")
        y = te.compute((t, N), lambda i, j: y[i, j] + res[i, j], name="out")
        args.append(res)
    func = te.create_prim_func(args + [y]).with_attr("global_symbol", c_name(s.name()))
    attrs = dict(target.export()) if target is not None else {"kind": "cuda"}
    attrs["arch"] = attrs.get("arch", "sm_90") + "-cuda-cores"
    with tvm.target.Target(attrs):
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(tvm.IRModule({c_name(s.name()): func}))
    return mod[c_name(s.name())].with_attr("tirx.is_scheduled", True)


def _matmul_cpu(s: MatmulSpec):
    """Tiles of 64 rows × 64 outputs in parallel; inside, RT rows × RN outputs accumulate in
    registers, VL lanes along K (rows past t re-read row t-1 and are not stored)."""
    t, N, K = _rows(), s.n, s.k
    RT, RN, VL, TILE = 4, 2, 16, 64
    KV = K // VL * VL
    NT = (N + TILE - 1) // TILE
    ZN = 1 if not s.residual else N

    def row(tb, r, t):  # clamped row index of tile row r
        return T.min(tb + r, t - 1)

    def w_at(W, j, k):
        return W[k, j] if s.w_kn else W[j, k]

    @T.prim_func(private=True)
    def matmul(x: T.Buffer((t, s.xw), s.adtype), W: T.Buffer(s.w_shape, s.wdtype), w_scale: T.Buffer((N,), "float32"),
               bias: T.Buffer((N,), "float32"),
               res: T.Buffer((t, ZN), "float32"), out: T.Buffer((t, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for tile in T.parallel(((t + TILE - 1) // TILE) * NT):
            for nb in range(TILE // RN):
                for rb in range(TILE // RT):
                    acc = T.alloc_buffer((RT, RN, VL), "float32", scope="local")
                    tb = tile // NT * TILE + rb * RT  # first row of this register tile
                    n0 = tile % NT * TILE + nb * RN
                    if tb < t and n0 < N:
                        for r, c, v in T.grid(RT, RN, VL):
                            acc[r, c, v] = T.float32(0)
                        for ko in range(K // VL):
                            for r, c in T.grid(RT, RN):
                                for v in T.vectorized(VL):
                                    acc[r, c, v] = acc[r, c, v] + T.Cast(
                                        "float32", x[row(tb, r, t), s.x_off + ko * VL + v]) * T.Cast(
                                        "float32", w_at(W, T.min(n0 + c, N - 1), ko * VL + v))
                        for r, c in T.grid(RT, RN):
                            for i in range(K - KV):
                                acc[r, c, 0] = acc[r, c, 0] + T.Cast("float32", x[row(tb, r, t), s.x_off + KV + i]) * T.Cast(
                                    "float32", w_at(W, T.min(n0 + c, N - 1), KV + i))
                            if tb + r < t and n0 + c < N:
                                out[tb + r, n0 + c] = _matmul_epilogue(s, rsum([acc[r, c, v] for v in range(VL)]),
                                                                       bias, res, tb + r, n0 + c, w_scale)

    return drop_unused_params(matmul, s.params, s.name())


def _matmul_epilogue(s: MatmulSpec, y, bias, res, i, j, w_scale):
    if s.quantized:
        y = y * w_scale[j]
    if s.bias:
        y = y + bias[j]
    if s.residual:
        y = y + res[i, j]
    return y


# ---------------------------------------------------------------------------------------------
# conv over the chunk, Falcon's B/C/Δ norm
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvChunkSpec:
    cols: int  # width of proj (in_proj_dim)
    lo: int  # conv channels are proj columns [lo, hi)
    hi: int
    d_conv: int
    conv_bias: bool

    @property
    def params(self) -> list[str]:
        return ["proj", "conv_w"] + (["conv_b"] if self.conv_bias else []) + ["conv_state"]

    def name(self) -> str:
        return f"conv_chunk_{self.cols}_c{self.lo}-{self.hi}k{self.d_conv}" + ("_bias" if self.conv_bias else "")


def conv_chunk_reference(s: ConvChunkSpec, proj, conv_w, conv_state, conv_b=None):
    """proj (t, cols) and conv_state (1, C, d_conv-1) are updated in place."""
    from edgemamba.reference import causal_conv

    out, new_state = causal_conv(proj[None, :, s.lo : s.hi], conv_state, conv_w, conv_b)
    proj[:, s.lo : s.hi] = out[0]
    conv_state[:] = new_state


def conv_chunk_kernel(s: ConvChunkSpec, gpu: bool):
    """One thread (GPU) or task (CPU) per channel walks the chunk with the window in registers."""
    t, C, KC = _rows(), s.hi - s.lo, s.d_conv

    @T.macro
    def channel(proj, conv_w, conv_b, conv_state, c):
        win = T.alloc_buffer((KC,), "float32", scope="local")  # the last KC inputs, oldest first
        for j in range(KC - 1):
            win[j] = conv_state[0, c, j]
        for i in range(t):
            win[KC - 1] = proj[i, s.lo + c]
            proj[i, s.lo + c] = silu_expr(rsum([conv_w[c, j] * win[j] for j in range(KC)]
                                                + ([conv_b[c]] if s.conv_bias else [])), not gpu)
            for j in range(KC - 1):
                win[j] = win[j + 1]
        for j in range(KC - 1):
            conv_state[0, c, j] = win[j]

    @T.prim_func(private=True)
    def conv_chunk(proj: T.Buffer((t, s.cols), "float32"), conv_w: T.Buffer((C, KC), "float32"),
                   conv_b: T.Buffer((C,), "float32"), conv_state: T.Buffer((1, C, KC - 1), "float32", **ROW_VIEW)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if gpu:
            for bx in T.thread_binding((C + THREADS - 1) // THREADS, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    if bx * THREADS + tx < C:
                        channel(proj, conv_w, conv_b, conv_state, bx * THREADS + tx)
        else:
            for c in T.parallel(C):
                channel(proj, conv_w, conv_b, conv_state, c)

    return drop_unused_params(conv_chunk, s.params, s.name())


def bcdt_norm_reference(spec: ModelSpec, dbc):
    r, n = spec.dt_rank, spec.d_state
    for lo, width in ((0, r), (r, n), (r + n, n)):
        dbc[:, lo : lo + width] = rms_norm(dbc[:, lo : lo + width], None, spec.bcdt_rms_eps)


def bcdt_norm_kernel(spec: ModelSpec, gpu: bool):
    """Falcon-Mamba: Δ_in, B and C of each row RMS-normalised (no weight), in place."""
    t, r, n, eps = _rows(), spec.dt_rank, spec.d_state, spec.bcdt_rms_eps
    W = r + 2 * n

    @T.macro
    def norm_part(dbc, i, lo, width):
        ss = T.alloc_buffer((1,), "float32", scope="local")
        ss[0] = T.float32(0)
        for j in range(width):
            ss[0] = ss[0] + dbc[i, lo + j] * dbc[i, lo + j]
        ss[0] = T.rsqrt(ss[0] / T.float32(width) + T.float32(eps))
        for j in range(width):
            dbc[i, lo + j] = dbc[i, lo + j] * ss[0]

    @T.macro
    def one_row(dbc, i):
        norm_part(dbc, i, 0, r)
        norm_part(dbc, i, r, n)
        norm_part(dbc, i, r + n, n)

    @T.prim_func(private=True)
    def bcdt_norm(dbc: T.Buffer((t, W), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if gpu:
            for bx in T.thread_binding((t + THREADS - 1) // THREADS, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    if bx * THREADS + tx < t:
                        one_row(dbc, bx * THREADS + tx)
        else:
            for i in T.parallel(t):
                one_row(dbc, i)

    return bcdt_norm.with_attr("global_symbol", f"bcdt_norm_r{r}n{n}")


# ---------------------------------------------------------------------------------------------
# the selective scan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanSpec:
    spec: ModelSpec
    y_dtype: str = "float32"  # Mamba-1's y feeds out_proj directly: the matmul's input dtype

    @property
    def params(self) -> list[str]:
        if self.spec.arch == "mamba1":
            return ["proj", "dbc", "dt", "dt_bias", "A", "D", "ssm_state", "y"]
        return ["proj", "dt_bias", "A", "D", "ssm_state", "y"]

    def name(self) -> str:
        s = self.spec
        dims = (f"{s.d_inner}x{s.d_state}r{s.dt_rank}" if s.arch == "mamba1"
                else f"h{s.n_heads}p{s.head_dim}n{s.d_state}g{s.n_groups}")
        lim = "" if s.dt_limit == (0.0, np.inf) else f"_lim{s.dt_limit[0]:g}-{s.dt_limit[1]:g}"
        return f"scan_{s.arch}_{dims}{lim}_{self.y_dtype}"

    def lanes(self, gpu: bool) -> int:
        n = self.spec.d_state
        per_lane = 4 if self.spec.arch == "mamba1" else 8
        return max(1, min(32, n // per_lane)) if gpu and n % per_lane == 0 else 1


def scan_reference(k: ScanSpec, proj, ssm_state, *, dbc=None, dt=None, dt_bias, A, D):
    """y (t, d_inner); ssm_state (1, ...) updated in place. Mamba-1's `dbc` has B and C as the scan
    reads them (Falcon: already normalised) and dt = Δ_in · dt_projᵀ before bias and softplus."""
    from edgemamba.kernels.tvm_ssm import selective_update

    s = k.spec
    e, n, gn = s.d_inner, s.d_state, s.n_groups * s.d_state
    ys = []
    for i in range(len(proj)):
        row = proj[i : i + 1]
        if s.arch == "mamba1":
            r = s.dt_rank
            dt_i, B, C = dt[i : i + 1], dbc[i : i + 1, r : r + n], dbc[i : i + 1, r + n : r + 2 * n]
        else:
            dt_i, B, C = row[:, e + s.conv_dim :], row[:, 2 * e : 2 * e + gn], row[:, 2 * e + gn : 2 * e + 2 * gn]
        y, ssm_state[:] = selective_update(s, ssm_state, row, dt_i, B, C, dt_bias=dt_bias, A=A, D=D)
        ys.append(y)
    return np.concatenate(ys).astype(k.y_dtype)


def scan_kernel(k: ScanSpec, gpu: bool):
    f = _scan1(k, gpu) if k.spec.arch == "mamba1" else _scan2(k, gpu)
    return drop_unused_params(f, k.params, k.name())


def _scan1(k: ScanSpec, gpu: bool):
    s = k.spec
    t, e, n, r = _rows(), s.d_inner, s.d_state, s.dt_rank
    NL = k.lanes(gpu)
    SPL = n // NL
    NT = e * NL
    reduce = lane_reduce(NL)
    state_loop = T.unroll if gpu else T.vectorized  # CPU: one channel's states in vector registers

    @T.macro
    def channel(proj, dbc, dt, dt_bias, A, D, ssm_state, y, th, active):
        # th = c · NL + lane; threads past the end (active false) run on the last index and store
        # nothing, so that every lane takes part in the shuffles
        c, lane = th // NL, th % NL
        h = T.alloc_buffer((SPL,), "float32", scope="local")
        a = T.alloc_buffer((SPL,), "float32", scope="local")
        acc = T.alloc_buffer((1, 1), "float32", scope="local")
        delta = T.alloc_buffer((1,), "float32", scope="local")
        for j in T.unroll(SPL):
            h[j] = ssm_state[0, c, lane * SPL + j]
            a[j] = A[c, lane * SPL + j]
        for i in range(t):
            delta[0] = clip_dt_expr(softplus_expr(dt[i, c] + dt_bias[c], not gpu), s.dt_limit)
            acc[0, 0] = T.float32(0)
            for j in state_loop(SPL):
                h[j] = exp_expr(delta[0] * a[j], not gpu) * h[j] + delta[0] * proj[i, c] * dbc[i, r + lane * SPL + j]
            for j in T.unroll(SPL):
                acc[0, 0] = acc[0, 0] + h[j] * dbc[i, r + n + lane * SPL + j]
            reduce(acc, 0)
            if active:
                if lane == 0:
                    y[i, c] = T.Cast(k.y_dtype, (acc[0, 0] + D[c] * proj[i, c]) * silu_expr(proj[i, e + c], not gpu))
        if active:
            for j in T.unroll(SPL):
                ssm_state[0, c, lane * SPL + j] = h[j]

    @T.prim_func(private=True)
    def scan(proj: T.Buffer((t, 2 * e), "float32"), dbc: T.Buffer((t, r + 2 * n), "float32"),
             dt: T.Buffer((t, e), "float32"), dt_bias: T.Buffer((e,), "float32"), A: T.Buffer((e, n), "float32"),
             D: T.Buffer((e,), "float32"), ssm_state: T.Buffer((1, e, n), "float32", **ROW_VIEW),
             y: T.Buffer((t, e), k.y_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if gpu:
            for bx in T.thread_binding((NT + THREADS - 1) // THREADS, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    channel(proj, dbc, dt, dt_bias, A, D, ssm_state, y, T.min(bx * THREADS + tx, NT - 1),
                            bx * THREADS + tx < NT)
        else:
            for th in T.parallel(NT):
                channel(proj, dbc, dt, dt_bias, A, D, ssm_state, y, th, True)

    return scan


def _scan2(k: ScanSpec, gpu: bool):
    s = k.spec
    t, e, n, H, P, G = _rows(), s.d_inner, s.d_state, s.n_heads, s.head_dim, s.n_groups
    NI, HPG = s.in_proj_dim, H // G
    NL = k.lanes(gpu)
    SPL = n // NL
    NT = e * NL
    XO, BO, CO, DTO = e, 2 * e, 2 * e + G * n, e + s.conv_dim
    reduce = lane_reduce(NL)
    state_loop = T.unroll if gpu else T.vectorized  # CPU: one channel's states in vector registers

    @T.macro
    def channel(proj, dt_bias, A, D, ssm_state, y, th, active):
        c, lane = th // NL, th % NL  # channel c = head · P + p
        hd, g = c // P, c // P // HPG
        h = T.alloc_buffer((SPL,), "float32", scope="local")
        acc = T.alloc_buffer((1, 1), "float32", scope="local")
        delta = T.alloc_buffer((1,), "float32", scope="local")
        for j in T.unroll(SPL):
            h[j] = ssm_state[0, hd, c % P, lane * SPL + j]
        for i in range(t):
            delta[0] = clip_dt_expr(softplus_expr(proj[i, DTO + hd] + dt_bias[hd], not gpu), s.dt_limit)
            acc[0, 0] = T.float32(0)
            for j in state_loop(SPL):
                h[j] = (exp_expr(delta[0] * A[hd], not gpu) * h[j]
                        + delta[0] * proj[i, XO + c] * proj[i, BO + g * n + lane * SPL + j])
            for j in T.unroll(SPL):
                acc[0, 0] = acc[0, 0] + h[j] * proj[i, CO + g * n + lane * SPL + j]
            reduce(acc, 0)
            if active:
                if lane == 0:
                    y[i, c] = T.Cast(k.y_dtype, acc[0, 0] + D[hd] * proj[i, XO + c])
        if active:
            for j in T.unroll(SPL):
                ssm_state[0, hd, c % P, lane * SPL + j] = h[j]

    @T.prim_func(private=True)
    def scan(proj: T.Buffer((t, NI), "float32"), dt_bias: T.Buffer((H,), "float32"), A: T.Buffer((H,), "float32"),
             D: T.Buffer((H,), "float32"), ssm_state: T.Buffer((1, H, P, n), "float32", **ROW_VIEW),
             y: T.Buffer((t, e), k.y_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if gpu:
            for bx in T.thread_binding((NT + THREADS - 1) // THREADS, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    channel(proj, dt_bias, A, D, ssm_state, y, T.min(bx * THREADS + tx, NT - 1),
                            bx * THREADS + tx < NT)
        else:
            for th in T.parallel(NT):
                channel(proj, dt_bias, A, D, ssm_state, y, th, True)

    return scan


# ---------------------------------------------------------------------------------------------
# the GPU prefill: the conv across tokens, the scan in time chunks
# ---------------------------------------------------------------------------------------------
CONV_TOKEN_GROUPS = 32  # GPU conv: a block's threads are 32 channels × this many token groups


@dataclass(frozen=True)
class ConvOutSpec:
    """The causal conv + silu over a chunk, out of place: xc (t, hi - lo) float32 from proj's raw
    columns [lo, hi), which stay as they are (conv_state in place)."""

    conv: ConvChunkSpec
    half: bool = False  # also xc16 (t, C) float16: Mamba-1's x_proj input on tensor cores

    @property
    def params(self) -> list[str]:
        return self.conv.params + ["xc"] + (["xc16"] if self.half else [])

    def name(self) -> str:
        return self.conv.name().replace("conv_chunk_", "conv_out_", 1) + ("_f16" if self.half else "")


def conv_out_reference(s: ConvOutSpec, proj, conv_w, conv_state, conv_b=None):
    """xc (t, C); conv_state (1, C, d_conv-1) updated in place, proj untouched."""
    work = proj.copy()
    conv_chunk_reference(s.conv, work, conv_w, conv_state, conv_b)
    return work[:, s.conv.lo : s.conv.hi]


def conv_out_kernel(s: ConvOutSpec, gpu: bool):
    """Every (token, channel) output at once. GPU: a block of 32 channels × CONV_TOKEN_GROUPS token
    groups walks the chunk with stride CONV_TOKEN_GROUPS; the new state (the last d_conv-1 inputs) is
    read before a barrier and written after it, so no thread reads a state another has replaced.
    CPU: channels in parallel."""
    c0 = s.conv
    t, C, KC, TG = _rows(), c0.hi - c0.lo, c0.d_conv, CONV_TOKEN_GROUPS

    def inp(proj, conv_state, i, c, j):  # the input at token i - (KC-1) + j: proj, or the state before it
        k = i - (KC - 1) + j
        return T.if_then_else(k >= 0, proj[T.max(k, 0), c0.lo + c],
                              conv_state[0, c, T.min(T.max(k + KC - 1, 0), KC - 2)])

    def out(proj, conv_w, conv_b, conv_state, i, c):
        return silu_expr(rsum([conv_w[c, j] * inp(proj, conv_state, i, c, j) for j in range(KC)]
                              + ([conv_b[c]] if c0.conv_bias else [])), not gpu)

    @T.macro
    def store(proj, conv_w, conv_b, conv_state, xc, xc16, i, c):
        xc[i, c] = out(proj, conv_w, conv_b, conv_state, i, c)
        if s.half:
            xc16[i, c] = T.Cast("float16", xc[i, c])

    @T.prim_func(private=True)
    def conv_out(proj: T.Buffer((t, c0.cols), "float32"), conv_w: T.Buffer((C, KC), "float32"),
                 conv_b: T.Buffer((C,), "float32"), conv_state: T.Buffer((1, C, KC - 1), "float32", **ROW_VIEW),
                 xc: T.Buffer((t, C), "float32"), xc16: T.Buffer((t, C), "float16")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if gpu:
            for bx in T.thread_binding((C + 31) // 32, thread="blockIdx.x"):
                for ty in T.thread_binding(TG, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        keep = T.alloc_buffer((KC - 1,), "float32", scope="local")
                        for io in range((t + TG - 1) // TG):
                            if io * TG + ty < t and bx * 32 + tx < C:
                                store(proj, conv_w, conv_b, conv_state, xc, xc16, io * TG + ty, bx * 32 + tx)
                        for j in T.unroll(KC - 1):
                            keep[j] = inp(proj, conv_state, t, T.min(bx * 32 + tx, C - 1), j)
                        T.tvm_storage_sync("shared")
                        if ty == 0 and bx * 32 + tx < C:
                            for j in T.unroll(KC - 1):
                                conv_state[0, bx * 32 + tx, j] = keep[j]
        else:
            for c in T.parallel(C):
                keep = T.alloc_buffer((KC - 1,), "float32", scope="local")
                for i in range(t):
                    store(proj, conv_w, conv_b, conv_state, xc, xc16, i, c)
                for j in range(KC - 1):
                    keep[j] = inp(proj, conv_state, t, c, j)
                for j in range(KC - 1):
                    conv_state[0, c, j] = keep[j]

    return drop_unused_params(conv_out, s.params, s.name())


@dataclass(frozen=True)
class ScanChunkSpec:
    """The selective scan of a chunk of t tokens split in time into at most `max_chunks` pieces of a
    multiple of 16 tokens (`pieces`), two kernels:

        scan_states   every piece at once from a zero state: its end state into hs[k + 1] and its Σ Δ
                      into sdt[k]; the state before the chunk into hs[0] (keep_delta: Δ into dlt)
        scan_pieces   every piece at once from the state carried into it, folded from hs and sdt
                      (state after piece k = exp(A · sdt[k]) · state before it + hs[k + 1]), walked
                      again, writing y; the last piece writes ssm_state

    Inputs: Mamba-1, x from xc (t, d_inner) (the conv's output), z from proj, B and C from dbc, dt
    (t, d_inner) before bias and softplus; Mamba-2, x, B, C from xc (t, conv_dim), dt from proj.
    Defaults (None) by architecture, from A/Bs on an H100 (benchmarks/RESULTS.md, TVM section)."""

    spec: ModelSpec
    y_dtype: str = "float32"
    max_chunks: int = 32
    channels: int | None = None  # channels a thread takes (Mamba-2: of one head; they share Δ, A, B, C); 8
    strided: bool | None = None  # GPU: lane l holds states l, l + NL, … (else l·SPL … l·SPL + SPL-1); Mamba-2
    keep_delta: bool | None = None  # scan_states writes Δ (t, per_head) for scan_pieces to read; Mamba-2

    @property
    def m1(self) -> bool:
        return self.spec.arch == "mamba1"

    @property
    def channels_per_thread(self) -> int:
        want = self.channels if self.channels is not None else (1 if self.m1 else 8)
        return 1 if self.m1 else next(c for c in range(want, 0, -1) if self.spec.head_dim % c == 0)

    @property
    def lanes_strided(self) -> bool:
        return self.strided if self.strided is not None else not self.m1

    @property
    def delta_kept(self) -> bool:
        return self.keep_delta if self.keep_delta is not None else not self.m1

    @property
    def states_params(self) -> list[str]:
        inputs = ["xc", "dbc", "dt", "dt_bias", "A"] if self.m1 else ["xc", "proj", "dt_bias", "A"]
        return inputs + ["ssm_state", "hs", "sdt"] + (["dlt"] if self.delta_kept else [])

    @property
    def pieces_params(self) -> list[str]:
        if self.delta_kept:
            inputs = ["xc", "proj", "dbc", "A", "D"] if self.m1 else ["xc", "A", "D"]
        else:
            inputs = ["xc", "proj", "dbc", "dt", "dt_bias", "A", "D"] if self.m1 else ["xc", "proj", "dt_bias", "A", "D"]
        return inputs + ["ssm_state", "hs", "sdt"] + (["dlt"] if self.delta_kept else []) + ["y"]

    @property
    def per_head(self) -> int:  # Δ, dt_bias, D: per channel (Mamba-1) or per head (Mamba-2)
        return self.spec.d_inner if self.m1 else self.spec.n_heads

    @property
    def hs_shape(self) -> tuple[int, ...]:
        return (self.max_chunks + 1, *self.spec.ssm_state_shape(1)[1:])

    @property
    def sdt_shape(self) -> tuple[int, int]:
        return (self.max_chunks, self.per_head)

    def name(self, part: str) -> str:
        base = ScanSpec(self.spec, self.y_dtype).name().replace("scan_", f"scan_{part}_", 1)
        knobs = (f"c{self.channels_per_thread}" + ("s" if self.lanes_strided else "")
                 + ("d" if self.delta_kept else ""))
        return f"{base}_k{self.max_chunks}{knobs}"

    def pieces(self, t):
        """(piece length, number of pieces) for t tokens (ints or PrimExprs)."""
        mx = max if isinstance(t, int) else tirx.max
        length = (mx((t + self.max_chunks - 1) // self.max_chunks, 16) + 15) // 16 * 16
        return length, (t + length - 1) // length


def scan_chunk_reference(k: ScanChunkSpec, proj, xc, ssm_state, *, dbc=None, dt=None, dt_bias, A, D):
    """What the two kernels compute together, as the sequential scan does: y (t, d_inner); ssm_state in place."""
    s = k.spec
    full = proj.copy()
    lo = 0 if k.m1 else s.d_inner
    full[:, lo : lo + xc.shape[1]] = xc
    return scan_reference(ScanSpec(s, k.y_dtype), full, ssm_state, dbc=dbc, dt=dt, dt_bias=dt_bias, A=A, D=D)


def scan_chunk_kernels(k: ScanChunkSpec, gpu: bool):
    """(scan_states, scan_pieces) PrimFuncs. GPU: blockIdx.y the piece; a thread takes CPT channels
    (`channels_per_thread`) and, of NL lanes splitting d_state, SPL states (strided: lane, lane + NL, …,
    so that a warp's loads of B and C coalesce); a piece's tokens go in groups of 8, unrolled (guards
    only in the last group). CPU: (piece, channel group) in parallel, one lane."""
    s = k.spec
    t, e, n, H, P, G = _rows(), s.d_inner, s.d_state, s.n_heads, s.head_dim, s.n_groups
    m1, keep = k.m1, k.delta_kept
    NL = ScanSpec(s).lanes(gpu)
    CPT = k.channels_per_thread
    SPL, NT = n // NL, e // CPT * NL
    reduce = lane_reduce(NL)
    r = s.dt_rank if m1 else 0
    XW = e if m1 else s.conv_dim  # xc's width
    NI, DTO, BO, CO = s.in_proj_dim, e + s.conv_dim, e, e + G * n  # Mamba-2: dt in proj, B and C in xc
    HPG = (H // G) if not m1 else 1
    PERH = k.per_head
    A_shape = (e, n) if m1 else (H,)
    state_shape = s.ssm_state_shape(1)
    U = 8  # tokens a group
    length, n_pieces = k.pieces(t)

    def head(c):  # Mamba-1: the channel itself
        return c if m1 else c // P

    def st(lane, j):  # the state index of a lane's j-th state
        return j * NL + lane if k.lanes_strided else lane * SPL + j

    def sidx(lead, c, lane, j):  # index into a state-shaped buffer (lead: its first dimension)
        return [lead, c, st(lane, j)] if m1 else [lead, c // P, c % P, st(lane, j)]

    def sat(buf, lead, c, lane, j):
        return buf[tuple(sidx(lead, c, lane, j))]

    def first_of_head(c, lane):  # one thread per channel (Mamba-1) or head (Mamba-2) writes Δ
        return lane == 0 if m1 else tirx.all(lane == 0, c % P == 0)

    def bval(xc, dbc, i, c, lane, j):
        return dbc[i, r + st(lane, j)] if m1 else xc[i, BO + c // P // HPG * n + st(lane, j)]

    def cval(xc, dbc, i, c, lane, j):
        return dbc[i, r + n + st(lane, j)] if m1 else xc[i, CO + c // P // HPG * n + st(lane, j)]

    def delta_expr(proj, dt, dt_bias, i, c):
        raw = dt[i, c] if m1 else proj[i, DTO + c // P]
        return clip_dt_expr(softplus_expr(raw + dt_bias[head(c)], not gpu), s.dt_limit)

    def decay(A, c, lane, j, d):
        return exp_expr(d * (A[c, st(lane, j)] if m1 else A[c // P]), not gpu)

    def step_decay(A, ea, c, lane, j, d):  # Mamba-2: one exp a token (ea), Mamba-1: one a state
        return decay(A, c, lane, j, d) if m1 else ea[0]

    @T.macro
    def step(xc, proj, dbc, dt, dt_bias, A, D, dlt, y, h, acc, dl, ea, sd, i, c0, lane, active, with_y):
        # c0: this thread's first channel; Mamba-2's CPT channels share a head (Δ, A) and a group (B, C)
        if with_y and keep:
            dl[0] = dlt[i, head(c0)]
        else:
            dl[0] = delta_expr(proj, dt, dt_bias, i, c0)
        if keep and not with_y:
            if active:
                if first_of_head(c0, lane):
                    dlt[i, head(c0)] = dl[0]
        sd[0] = sd[0] + dl[0]
        if not m1:
            ea[0] = decay(A, c0, lane, 0, dl[0])
        for u in T.unroll(CPT):
            for j in T.unroll(SPL):
                h[u, j] = (step_decay(A, ea, c0 + u, lane, j, dl[0]) * h[u, j]
                           + dl[0] * xc[i, c0 + u] * bval(xc, dbc, i, c0, lane, j))
        if with_y:
            for u in T.unroll(CPT):
                acc[u, 0] = T.float32(0)
                for j in T.unroll(SPL):
                    acc[u, 0] = acc[u, 0] + h[u, j] * cval(xc, dbc, i, c0, lane, j)
                reduce(acc, u)
            if active:
                if lane == 0:
                    for u in T.unroll(CPT):
                        if m1:
                            y[i, c0 + u] = T.Cast(k.y_dtype, (acc[u, 0] + D[c0 + u] * xc[i, c0 + u])
                                                  * silu_expr(proj[i, e + c0 + u], not gpu))
                        else:
                            y[i, c0 + u] = T.Cast(k.y_dtype, acc[u, 0] + D[head(c0)] * xc[i, c0 + u])

    @T.macro
    def body(xc, proj, dbc, dt, dt_bias, A, D, ssm_state, hs, sdt, dlt, y, kk, th, active, with_y):
        c0, lane = th // NL * CPT, th % NL
        h = T.alloc_buffer((CPT, SPL), "float32", scope="local")
        acc = T.alloc_buffer((CPT, 1), "float32", scope="local")
        dl = T.alloc_buffer((1,), "float32", scope="local")
        ea = T.alloc_buffer((1,), "float32", scope="local")
        sd = T.alloc_buffer((1,), "float32", scope="local")
        for u in T.unroll(CPT):
            for j in T.unroll(SPL):
                if with_y:  # the state carried in: hs[0] through the pieces before this one
                    h[u, j] = sat(hs, 0, c0 + u, lane, j)
                else:
                    h[u, j] = T.float32(0)
        if with_y:
            for q in range(kk):
                for u in T.unroll(CPT):
                    for j in T.unroll(SPL):
                        h[u, j] = (decay(A, c0 + u, lane, j, sdt[q, head(c0 + u)]) * h[u, j]
                                   + sat(hs, q + 1, c0 + u, lane, j))
        sd[0] = T.float32(0)
        for io in range(length // U):
            if kk * length + io * U + U <= t:
                for iu in T.unroll(U):
                    step(xc, proj, dbc, dt, dt_bias, A, D, dlt, y, h, acc, dl, ea, sd, kk * length + io * U + iu, c0,
                         lane, active, with_y)
            else:
                for iu in range(U):
                    if kk * length + io * U + iu < t:
                        step(xc, proj, dbc, dt, dt_bias, A, D, dlt, y, h, acc, dl, ea, sd, kk * length + io * U + iu,
                             c0, lane, active, with_y)
        if active:
            if with_y:
                if kk == n_pieces - 1:
                    for u in T.unroll(CPT):
                        for j in T.unroll(SPL):
                            T.buffer_store(ssm_state, h[u, j], sidx(0, c0 + u, lane, j))
            else:
                for u in T.unroll(CPT):
                    for j in T.unroll(SPL):
                        T.buffer_store(hs, h[u, j], sidx(kk + 1, c0 + u, lane, j))
                        if kk == 0:
                            T.buffer_store(hs, sat(ssm_state, 0, c0 + u, lane, j), sidx(0, c0 + u, lane, j))
                if first_of_head(c0, lane):
                    sdt[kk, head(c0)] = sd[0]

    def kernel(with_y: bool):
        @T.prim_func(private=True)
        def scan(xc: T.Buffer((t, XW), "float32"), proj: T.Buffer((t, NI), "float32"),
                 dbc: T.Buffer((t, r + 2 * n), "float32"), dt: T.Buffer((t, e), "float32"),
                 dt_bias: T.Buffer((PERH,), "float32"), A: T.Buffer(A_shape, "float32"), D: T.Buffer((PERH,), "float32"),
                 ssm_state: T.Buffer(state_shape, "float32", **ROW_VIEW), hs: T.Buffer(k.hs_shape, "float32"),
                 sdt: T.Buffer(k.sdt_shape, "float32"), dlt: T.Buffer((t, PERH), "float32"),
                 y: T.Buffer((t, e), k.y_dtype)):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            if gpu:
                for kk in T.thread_binding(n_pieces, thread="blockIdx.y"):
                    for bx in T.thread_binding((NT + THREADS - 1) // THREADS, thread="blockIdx.x"):
                        for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                            body(xc, proj, dbc, dt, dt_bias, A, D, ssm_state, hs, sdt, dlt, y, kk,
                                 T.min(bx * THREADS + tx, NT - 1), bx * THREADS + tx < NT, with_y)
            else:
                for kt in T.parallel(n_pieces * NT):
                    body(xc, proj, dbc, dt, dt_bias, A, D, ssm_state, hs, sdt, dlt, y, kt // NT, kt % NT, True, with_y)

        return scan

    return (drop_unused_params(kernel(False), k.states_params, k.name("states")),
            drop_unused_params(kernel(True), k.pieces_params, k.name("pieces")))
