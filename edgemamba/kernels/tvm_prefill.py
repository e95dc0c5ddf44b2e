"""Prefill kernels as TVM TIR: a chunk of t tokens of one sequence (t symbolic), plus the embedding.

    embed        h = E[ids]                                       (also the decode step's first kernel)
    row_norm     RMSNorm of each row (Mamba-2: the gated, grouped norm) into the matmul input
    matmul       out = [res +] x · Wᵀ [+ bias]                    x (t, K), W (N, K) as in torch
    conv_chunk   causal conv + silu over the chunk, in place on the conv channels, state in place
    bcdt_norm    Falcon-Mamba's weightless RMSNorm of Δ, B and C, in place
    scan         the selective scan over the chunk, sequential in time, state in place
    last_row     the final hidden row, for the lm_head GEMV

GPU: matmul is scheduled by TVM's dlight rule (CUDA cores); the scan runs one thread per
(channel, lane) with lanes splitting d_state; the conv one thread per channel with the window in
registers. CPU: rows or channels in parallel, matmul as register-tiled dot products.
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
