"""Decode GEMVs as TVM TIR: y = epilogue(W · prologue(x)) for a small static batch.

Every projection of a decode step is one of these, with its neighbours fused in so that a Mamba
layer is three or four kernel launches:

    in_proj    RMSNorm(h) · W_in, then the causal conv step on the conv channels (state in place);
               where fused (`Pdl.fuse_x_proj`), x_proj of the conv outputs too
    x_proj     plain GEMV
    out_proj   Mamba-1: h += W_out · y;  Mamba-2: h += W_out · gated_group_norm(y, z)
    lm_head    RMSNorm(h) · W_head into the logits buffer

RMSNorm costs no separate pass: y_n = Σ_g rstd_g · Σ_{k∈g} (x_k·w_k) W_nk, and the statistics
Σ x_k² are accumulated in the same loop as the dot products, so the norm weight is applied in the
prologue and rstd after the reduction. The batch is static and innermost, so each weight is read
once for every sequence decoded together.

Two lowerings of one contract (`gemv_reference`):
- GPU (`gpu_layout`): each warp computes RW rows (1-2 at batch 1, up to 8 at batch 4 and more, so
  that each x load serves several rows), and KS warps of a block split a small matrix's rows along K
  (partial sums through shared memory); each lane loads 8 or 16 bytes of a row at a time. The lanes
  reduce their RW·batch sums by halving (at each shuffle level a lane keeps half of its values), so
  lane t ends with its own sums and runs their epilogues, whose operands (residual, conv state and
  weights, bias) it loaded before the main loop.
- CPU: the prologue writes the normalised input once into a scratch row, then rows of W are dot
  products in parallel, vectorised along K with one accumulator vector per sequence.

Optional inputs (z, norm weight, bias, conv) are parameters only when used: the kernel is written
with all of them and the unused ones are dropped (`GemvSpec.params` names those that remain).
"""


from dataclasses import dataclass  # no `from __future__ import annotations`: TVMScript reads the real annotations

import numpy as np
from tvm.script import tirx as T

from edgemamba.kernels.tvm_common import (FULL_MASK, ROW_VIEW, Pdl, cpu_workers, drop_unused_params, rsum, silu_expr,
                                          vector_width, with_pdl)
from edgemamba.reference import rms_norm, silu

EPILOGUES = ("store", "residual", "conv")
XACC_SCALE = 2.0**32  # fixed point of the fused x_proj's sums: |values| < 2^31, steps of 2^-32
XACC_REPLICAS = 4  # copies of xacc, block b adding into copy b % 4 (fewer adds to one word; each
# state-update block sums the copies: see tvm_common.DEFAULT_PDL for the measured trade)
NORMS = ("", "rms", "gated")


@dataclass(frozen=True)
class GemvSpec:
    n: int  # output rows of W (N)
    k: int  # reduction length (K)
    batch: int  # sequences decoded together
    wdtype: str = "float32"
    x_cols: int = 0  # width of the input buffer (0: k); x is read at columns [x_off, x_off + k)
    x_off: int = 0
    norm: str = ""  # "" none; "rms": RMSNorm(x)·w; "gated": Mamba-2's RMSNorm(x·silu(z))·w; both per group
    groups: int = 1  # norm groups along K
    norm_on_x: bool = False  # gated only: statistics of x, then gate (norm_before_gate)
    z_cols: int = 0  # gated only: width of the z buffer; z read at columns [z_off, z_off + k)
    z_off: int = 0
    eps: float = 1e-5
    bias: bool = False
    epilogue: str = "store"  # "store": out = y; "residual": out += y; "conv": conv step on rows [conv_lo, conv_hi)
    conv_lo: int = 0
    conv_hi: int = 0
    d_conv: int = 4
    conv_bias: bool = True
    # GPU only, Mamba-1's in_proj: x_proj (xproj rows, `xw` (xproj, n_conv)) applied to the conv
    # channels' outputs here; each block adds its rows' share into `xacc` (XACC_REPLICAS, batch,
    # xproj) int64, in place, in fixed point (XACC_SCALE): integer sums are exact, so the total does
    # not depend on the order the blocks add in (the step stays deterministic). out_proj's `zero_n`
    # makes the next layer's xacc, zeroed.
    xproj: int = 0
    zero_n: int = 0

    def __post_init__(self):
        assert self.epilogue in EPILOGUES and self.norm in NORMS, self
        assert self.k % self.groups == 0 and (self.norm != "" or self.groups == 1), self
        assert self.x_off + self.k <= self.xw, self
        assert not self.xproj or (self.epilogue == "conv" and not self.quantized), self

    @property
    def xw(self) -> int:
        return self.x_cols or self.k

    @property
    def quantized(self) -> bool:
        """int8 weights, one float32 scale per row (weight-only: dequantized in the kernel)."""
        return self.wdtype == "int8"

    @property
    def n_conv(self) -> int:
        return self.conv_hi - self.conv_lo

    @property
    def params(self) -> list[str]:
        """Names of the kernel's parameters, in order; `out` is the last but for out_proj's `xzero`."""
        names = ["x"]
        if self.norm == "gated":
            names.append("z")
        if self.norm:
            names.append("norm_w")
        names.append("W")
        if self.quantized:
            names.append("w_scale")
        if self.bias:
            names.append("bias")
        if self.epilogue == "conv":
            names += ["conv_w", "conv_b"] if self.conv_bias else ["conv_w"]
            names.append("conv_state")
        if self.xproj:
            names += ["xw", "xacc"]
        return names + ["out"] + (["xzero"] if self.zero_n else [])

    def name(self) -> str:
        parts = [f"gemv_{self.n}x{self.k}_b{self.batch}_{self.wdtype}", self.norm, self.epilogue]
        if self.norm == "gated":
            parts.append(f"g{self.groups}{'x' if self.norm_on_x else 'u'}")
        elif self.groups > 1:
            parts.append(f"g{self.groups}")
        if self.x_off or self.x_cols:
            parts.append(f"x{self.x_off}of{self.xw}")
        if self.epilogue == "conv":
            parts.append(f"c{self.conv_lo}-{self.conv_hi}k{self.d_conv}")
        if self.xproj:
            parts.append(f"xp{self.xproj}")
        if self.zero_n:
            parts.append(f"z{self.zero_n}")
        return "_".join(p for p in parts if p) + ("_bias" if self.bias else "")


# ---------------------------------------------------------------------------------------------
# the contract, in NumPy
# ---------------------------------------------------------------------------------------------
def gemv_reference(s: GemvSpec, x, W, *, z=None, norm_w=None, w_scale=None, bias=None, conv_w=None, conv_b=None,
                   conv_state=None, out=None, xw=None, xacc=None):
    """Returns out (batch, n); `conv_state`, `xacc` (xproj: += XACC_SCALE · x_proj of the conv
    outputs, float64 here) and, for "residual", `out` are updated in place."""
    if s.quantized:
        W = W.astype(np.float64) * w_scale[:, None]
    u = x[:, s.x_off : s.x_off + s.k].astype(np.float64)  # (b, k)
    if s.norm == "rms":
        u = rms_norm(u.reshape(len(u), s.groups, -1), None, s.eps).reshape(u.shape) * norm_w
    elif s.norm == "gated":
        gate = silu(z[:, s.z_off : s.z_off + s.k].astype(np.float64))
        grouped = (u if s.norm_on_x else u * gate).reshape(len(u), s.groups, -1)
        u = rms_norm(grouped, None, s.eps).reshape(u.shape) * norm_w
        if s.norm_on_x:
            u = u * gate
    y = u @ W.astype(np.float64).T  # (b, n)
    if s.bias:
        y = y + bias
    if s.epilogue == "residual":
        out += y.astype(out.dtype)
        return out
    out = y.astype(np.float32) if out is None else out
    out[:] = y
    if s.epilogue == "conv":
        lo, hi = s.conv_lo, s.conv_hi
        win = np.concatenate([conv_state, y[:, lo:hi, None]], axis=2)  # (b, C, d_conv)
        acc = np.sum(win * conv_w, axis=2) + (conv_b if s.conv_bias else 0.0)
        out[:, lo:hi] = silu(acc)
        conv_state[:] = win[:, :, 1:]
        if s.xproj:  # (the kernel spreads the sum over XACC_REPLICAS copies; here all of it in the first)
            xacc[0] += (out[:, lo:hi].astype(np.float64) @ xw.astype(np.float64).T) * XACC_SCALE
    return out


# ---------------------------------------------------------------------------------------------
# TIR
# ---------------------------------------------------------------------------------------------
def gemv_kernel(s: GemvSpec, gpu: bool, pdl: Pdl | None = None):
    """The PrimFunc of this GEMV for a GPU or a CPU target; parameters as `s.params`. pdl (GPU, sm_90+):
    programmatic dependent launch (`tvm_common.Pdl`): each warp may have its rows of W brought into
    L2 while the previous kernel still runs, then waits for it."""
    pdl = pdl if gpu else None
    assert gpu or not (s.xproj or s.zero_n), "the fused x_proj is a GPU kernel's"
    f = _gemv_gpu(s, pdl) if gpu else _gemv_cpu(s)
    return with_pdl(drop_unused_params(f, s.params, s.name()), pdl)


def _shapes(s: GemvSpec):
    B, C = s.batch, max(s.n_conv, 1)
    return dict(x=(B, s.xw), z=(B, max(s.z_cols, 1)), nw=(s.k,), W=(s.n, s.k), ws=(s.n,), bias=(s.n,),
                cw=(C, s.d_conv), cb=(C,), cs=(B, C, s.d_conv - 1), out=(B, s.n), xw=(max(s.xproj, 1), C),
                xacc=(XACC_REPLICAS, B, max(s.xproj, 1)), xzero=(XACC_REPLICAS, B, max(s.zero_n, 1)))


def _epilogue(s: GemvSpec, gpu: bool):
    """Macro: the finished dot product `yv` of row n, sequence b, lands in `out`."""
    lo, hi, KC = s.conv_lo, s.conv_hi, s.d_conv

    def _biased(yv, bias, n, w_scale):  # the row's int8 scale, then the bias
        yv = yv * w_scale[n] if s.quantized else yv
        return yv + bias[n] if s.bias else yv

    def _conv_dot(cw, cb, cs, b, c, yv):
        terms = [cw[c, j] * cs[b, c, j] for j in range(KC - 1)] + [cw[c, KC - 1] * yv]
        return rsum(terms + [cb[c]] if s.conv_bias else terms)

    @T.macro
    def epilogue(out, bias, cw, cb, cs, b, n, yv, w_scale):
        if s.epilogue == "residual":
            out[b, n] = out[b, n] + _biased(yv, bias, n, w_scale)
        elif s.epilogue == "conv":
            if lo <= n and n < hi:
                # window = (conv_state[b, c, :], y): the conv output, then the state shifts left
                # by one and y enters last
                out[b, n] = silu_expr(_conv_dot(cw, cb, cs, b, n - lo, _biased(yv, bias, n, w_scale)), not gpu)
                for j in range(KC - 2):
                    cs[b, n - lo, j] = cs[b, n - lo, j + 1]
                cs[b, n - lo, KC - 2] = _biased(yv, bias, n, w_scale)
            else:
                out[b, n] = _biased(yv, bias, n, w_scale)
        else:
            out[b, n] = _biased(yv, bias, n, w_scale)

    return epilogue


def gpu_layout(s: GemvSpec) -> tuple[int, int, int]:
    """(RW, KS, load bytes) of the GPU kernel: each warp computes RW rows (its x loads serve all of
    them), KS warps of a block split one group of rows along K (partial sums through shared memory),
    and each lane loads W that many bytes at a time.

    A decode GEMV is latency-bound at batch 1: small matrices (x_proj: 80 or 160 rows) get more
    warps by splitting K; at batch 4 and more every W element meets `batch` float32 x values, so
    the x loads, not W, fill the load units unless a warp reuses them over several rows."""
    B, N = s.batch, s.n
    RW = 8 if B >= 4 else (4 if B >= 2 else (2 if N >= 2048 else 1))
    if B == 1 and s.epilogue == "residual" and not s.norm and N >= 2048:
        # Mamba-1's out_proj at batch 1, partly in L2 by then (`Pdl.prefetch_budget`): 4 rows a warp
        # (mamba-1.4b on an H100: -0.6% a step; alone, from L2, 3.9-4.0 µs against 4.1-4.3 with 2)
        RW = 4
    while RW > 1 and N // RW < 128:
        RW //= 2
    nbytes = 16 if B <= 2 else 8
    GS = s.k // s.groups
    ko = -(-GS // (32 * vector_width(s.wdtype, GS, nbytes)))  # sweeps of a warp over one group
    # KS: a power of two, at most 2,048 warps a kernel. A GEMV without a norm (whose warps share no
    # statistics, only their partial sums) may take 4,096, and a KS that divides its sweeps evenly
    # where that is larger: mamba-130m's x_proj 6 warps of one sweep each, not 4 of one or two; its
    # out_proj KS 4. Batch 1 on an H100: mamba-130m -2%, mamba-1.4b -0.8%; the same for the normed
    # ones cost mamba2-130m +7%.
    rows, cap = -(-N // RW), 2048 if s.norm else 4096
    fits = [ks for ks in range(1, min(8, ko) + 1) if rows * ks <= cap] or [1]
    KS = max(ks for ks in fits if ks & (ks - 1) == 0)
    if not s.norm:
        KS = max([KS] + [ks for ks in fits if ko % ks == 0])
    return RW, KS, nbytes


def block_rows(s: GemvSpec) -> int:
    """Rows of W one GPU block computes (its row groups times each warp's rows): a fused x_proj's
    share is a block's conv rows, so they must tile the conv channels."""
    RW, KS, _ = gpu_layout(s)
    return max(1, 4 // KS) * RW


def _gemv_gpu(s: GemvSpec, pdl: Pdl | None = None):
    B, N, K, G = s.batch, s.n, s.k, s.groups
    GS = K // G  # channels per norm group
    RW, KS, NBYTES = gpu_layout(s)
    VEC = vector_width(s.wdtype, GS, NBYTES)  # W elements per load
    XV = min(VEC, 8)  # x elements per vector load
    STRIDE = 32 * VEC  # one warp sweeps this many columns per iteration
    KO = (GS + STRIDE - 1) // STRIDE  # sweeps over one group, shared by the KS warps of a row group
    KOW = (KO + KS - 1) // KS  # sweeps of one warp
    FULL = GS % STRIDE == 0 and KO % KS == 0  # no sweep needs a bound check
    RG = max(1, 4 // KS)  # row groups per block
    TY = RG * KS  # warps per block
    BR = block_rows(s)  # RG · RW
    NBLK = (N + BR - 1) // BR
    # after the main loop each lane holds V partial sums, (row r, sequence b) at r·B + b, padded to
    # V2 (a power of two); the reduction halves them across lanes (below), so that lane t ends with
    # VL of them, sums over the warp, at t·VL >> ... (see `base`), and runs their epilogues
    V = RW * B
    V2 = 1 << (V - 1).bit_length()
    L = min(5, V2.bit_length() - 1)  # lane bits that pick the values a lane keeps
    VL = max(1, V2 // 32)
    REP = 1 << (5 - L)  # lanes holding the same sums (one of them stores)
    HALF = [V2 >> (i + 1) for i in range(5)]  # values exchanged at each level (0: plain butterfly)
    lo, hi, KC, C = s.conv_lo, s.conv_hi, s.d_conv, max(s.n_conv, 1)
    OUT, BIAS, WS, CB, CS, CW = 0, 1, 2, 3, 4, 3 + KC  # slots of the epilogue's operands, loaded early
    ROW_BYTES = K * np.dtype(s.wdtype).itemsize  # PDL: one bulk L2 prefetch a row (16-byte multiples)
    use_pdl = pdl is not None
    early, late = use_pdl and pdl.early, use_pdl and pdl.late
    prefetch = use_pdl and pdl.prefetch and ROW_BYTES % 16 == 0
    PFD = -(-(N * ROW_BYTES) // pdl.prefetch_budget) if prefetch else 1  # prefetch every PFD-th row
    # PDL preload: a warp's first PRE sweeps of W (at most 128 bytes a lane) are loaded into
    # registers before the wait, so the previous kernel's tail hides their memory round trip
    PRE = min(KOW, 128 // (G * RW * VEC * np.dtype(s.wdtype).itemsize)) if use_pdl and pdl.preloads("gemv") else 0
    sh = _shapes(s)
    normed, gated = s.norm != "", s.norm == "gated"

    def w_at(W, bx, ty, tx, g, koi, r, v):  # element v of the lane's W load in sweep koi (rows past N re-read N-1)
        return W[T.min((bx * RG + ty // KS) * RW + r, N - 1), g * GS + (koi * KS + ty % KS) * STRIDE + tx * VEC + v]

    def epi_row(bx, ty, tx, i):  # the row of the lane's i-th epilogue (clamped below N)
        return T.min((bx * RG + ty // KS) * RW + ((tx // REP) * VL + i) // B, N - 1)

    def in_group(koi, ks, tx):  # the lane's columns of sweep koi·KS + ks lie in the group
        return True if FULL else (koi * KS + ks) * STRIDE + tx * VEC < GS

    def over_ks(buf, rg, *index):  # Σ over the KS warps of a row group
        return rsum([buf[(rg, k, *index)] for k in range(KS)])

    def combine(acc, ss, r, b):  # y = Σ_g rstd_g · dot_g (ss holds rstd by then)
        return rsum([acc[r, b, g] * ss[b, g] if normed else acc[r, b, g] for g in range(G)])

    @T.macro
    def fetch_const(pre, i, n, bias, w_scale, cw, cb):
        # the epilogue's weights of row n (clamped below N) before the main loop: their round trip
        # overlaps the weights' (with PDL preload, before the wait)
        if s.bias:
            pre[i, BIAS] = bias[n]
        if s.quantized:
            pre[i, WS] = w_scale[n]
        if s.epilogue == "conv":
            if s.conv_bias:
                pre[i, CB] = cb[T.max(T.min(n - lo, C - 1), 0)]
            for j in T.unroll(KC):
                pre[i, CW + j] = cw[T.max(T.min(n - lo, C - 1), 0), j]

    @T.macro
    def fetch_state(pre, i, n, b, out, cs):
        # the epilogue's other operands of row n, sequence b (the residual, the conv state): after the wait
        if s.epilogue == "residual":
            pre[i, OUT] = out[b, n]
        if s.epilogue == "conv":
            for j in T.unroll(KC - 1):
                pre[i, CS + j] = cs[b, T.max(T.min(n - lo, C - 1), 0), j]

    def biased(pre, i, yv):
        yv = yv * pre[i, WS] if s.quantized else yv
        return yv + pre[i, BIAS] if s.bias else yv

    def conv_dot(pre, i, yv):
        terms = [pre[i, CW + j] * pre[i, CS + j] for j in range(KC - 1)] + [pre[i, CW + KC - 1] * yv]
        return rsum(terms + [pre[i, CB]] if s.conv_bias else terms)

    @T.macro
    def finish(out, cs, pre, i, n, b, yv, xs):
        if s.epilogue == "residual":
            out[b, n] = pre[i, OUT] + biased(pre, i, yv)
        elif s.epilogue == "conv":
            if lo <= n and n < hi:
                # window = (conv_state[b, c, :], y): the conv output, then the state shifts left
                # by one and y enters last
                out[b, n] = silu_expr(conv_dot(pre, i, biased(pre, i, yv)))
                if s.xproj > 0:  # the block's conv outputs, for its share of x_proj
                    xs[b, n % BR] = out[b, n]
                for j in T.unroll(KC - 2):
                    cs[b, n - lo, j] = pre[i, CS + j + 1]
                cs[b, n - lo, KC - 2] = biased(pre, i, yv)
            else:
                out[b, n] = biased(pre, i, yv)
        else:
            out[b, n] = biased(pre, i, yv)

    if s.xproj > 0:
        assert lo % BR == 0 and hi % BR == 0, "fused x_proj: blocks of conv rows only"

    JX = -(-max(s.xproj, 1) // (TY * 32))  # x_proj rows a thread sums

    @T.macro
    def xproj_load(bx, ty, tx, xw, xwv):
        # first thing (a weight: before any PDL wait): the thread's x_proj rows at the block's conv
        # channels, in registers; loaded after the GEMV they queued behind its whole stream
        if lo <= bx * BR and bx * BR < hi:
            for j in T.unroll(JX):
                for c in T.vectorized(BR):
                    xwv[j, c] = xw[T.min(j * TY * 32 + ty * 32 + tx, s.xproj - 1), bx * BR - lo + c]

    @T.macro
    def xproj_share(bx, ty, tx, xwv, xacc, xs, xp):
        # a block of conv rows: x_proj's columns of its rows times their conv outputs, each thread
        # some of the xproj sums, added to xacc in fixed point (red.global.add.u64: exact)
        if lo <= bx * BR and bx * BR < hi:
            T.tvm_storage_sync("shared")
            for j in T.unroll(JX):
                if j * TY * 32 + ty * 32 + tx < s.xproj:
                    for b in T.unroll(B):
                        xp[0] = T.float32(0)
                        for c in T.unroll(BR):
                            xp[0] = xp[0] + T.Cast("float32", xwv[j, c]) * xs[b, c]
                        T.evaluate(T.ptx.red.global_.add.u64(
                            T.address_of(xacc[bx % XACC_REPLICAS, b, j * TY * 32 + ty * 32 + tx]),
                            T.Cast("uint64", T.Cast("int64", T.round(xp[0] * T.float32(XACC_SCALE))))))

    @T.macro
    def halve(val, tx, m, half):
        # one level of the reduction over the lanes: lanes whose bit m is set keep the upper half
        # of their values and send the lower one (the partner the reverse); once one value is
        # left, a plain butterfly
        if half == 0:
            val[0] = val[0] + T.tvm_warp_shuffle_xor(FULL_MASK, val[0], m, 32, 32)
        else:
            for i in T.unroll(half):
                val[i] = (T.Select(tx // m % 2 == 1, val[i + half], val[i])
                          + T.tvm_warp_shuffle_xor(FULL_MASK, T.Select(tx // m % 2 == 1, val[i], val[i + half]),
                                                   m, 32, 32))

    @T.prim_func(private=True)
    def gemv(x: T.Buffer(sh["x"], "float32"), z: T.Buffer(sh["z"], "float32"), norm_w: T.Buffer(sh["nw"], "float32"),
             W: T.Buffer(sh["W"], s.wdtype), w_scale: T.Buffer(sh["ws"], "float32"), bias: T.Buffer(sh["bias"], "float32"),
             conv_w: T.Buffer(sh["cw"], "float32"), conv_b: T.Buffer(sh["cb"], "float32"),
             conv_state: T.Buffer(sh["cs"], "float32", **ROW_VIEW), xw: T.Buffer(sh["xw"], s.wdtype),
             xacc: T.Buffer(sh["xacc"], "int64"), out: T.Buffer(sh["out"], "float32", **ROW_VIEW),
             xzero: T.Buffer(sh["xzero"], "int64")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        # every loop over r, b, g, i and v is unrolled: the local arrays stay in registers
        for bx in T.thread_binding(NBLK, thread="blockIdx.x"):
            for ty in T.thread_binding(TY, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.alloc_buffer((RW, B, G), "float32", scope="local")
                    ss = T.alloc_buffer((B, G), "float32", scope="local")  # Σ x² per sequence and group
                    wv = T.alloc_buffer((RW, VEC), s.wdtype, scope="local")
                    u = T.alloc_buffer((B, VEC), "float32", scope="local")
                    nwv = T.alloc_buffer((VEC,), "float32", scope="local")  # the norm weight of the sweep
                    val = T.alloc_buffer((V2,), "float32", scope="local")
                    pre = T.alloc_buffer((VL, CW + KC), "float32", scope="local")
                    wp = T.alloc_buffer((G, max(PRE, 1), RW, VEC), s.wdtype, scope="local")  # preloaded sweeps
                    red = T.alloc_buffer((RG, KS, 32, VL), "float32", scope="shared")  # split K: partial sums
                    xs = T.alloc_buffer((B, BR), "float32", scope="shared")  # xproj: the block's conv outputs
                    xp = T.alloc_buffer((1,), "float32", scope="local")
                    xwv = T.alloc_buffer((JX, BR), s.wdtype, scope="local")
                    if s.xproj > 0:
                        xproj_load(bx, ty, tx, xw, xwv)
                    ssh = T.alloc_buffer((RG, KS, B, G), "float32", scope="shared")
                    if use_pdl:
                        if early:
                            T.evaluate(T.ptx.griddepcontrol.launch_dependents())
                        if prefetch and tx == 0 and ty % KS == 0:  # the rows of W (nothing in a step writes them)
                            for r in T.unroll(RW):
                                if ((bx * RG + ty // KS) * RW + r) < N and ((bx * RG + ty // KS) * RW + r) % PFD == 0:
                                    T.evaluate(T.ptx.cp.async_.bulk.prefetch.L2.global_(
                                        T.address_of(W[(bx * RG + ty // KS) * RW + r, 0]), T.uint32(ROW_BYTES)))
                        if PRE > 0:  # weights only: nothing in a step writes them
                            for g in T.unroll(G):
                                for koi in T.unroll(PRE):
                                    if in_group(koi, ty % KS, tx):
                                        for r in T.unroll(RW):
                                            for v in T.vectorized(VEC):
                                                wp[g, koi, r, v] = w_at(W, bx, ty, tx, g, koi, r, v)
                            for i in T.unroll(VL):
                                fetch_const(pre, i, epi_row(bx, ty, tx, i), bias, w_scale, conv_w, conv_b)
                        T.evaluate(T.ptx.griddepcontrol.wait())
                    for i in T.unroll(VL):
                        if PRE == 0:
                            fetch_const(pre, i, epi_row(bx, ty, tx, i), bias, w_scale, conv_w, conv_b)
                        fetch_state(pre, i, epi_row(bx, ty, tx, i), ((tx // REP) * VL + i) % B, out, conv_state)
                    for r in T.unroll(RW):
                        for b in T.unroll(B):
                            for g in T.unroll(G):
                                acc[r, b, g] = T.float32(0)
                    for b in T.unroll(B):
                        for g in T.unroll(G):
                            ss[b, g] = T.float32(0)
                    for g in T.unroll(G):
                        for koi in T.unroll(KOW):
                            if in_group(koi, ty % KS, tx):
                                for r in T.unroll(RW):
                                    if koi < PRE:
                                        for v in T.vectorized(VEC):
                                            wv[r, v] = wp[g, koi, r, v]
                                    else:
                                        for v in T.vectorized(VEC):
                                            wv[r, v] = w_at(W, bx, ty, tx, g, koi, r, v)
                                if normed:
                                    for v0 in T.unroll(VEC // XV):
                                        for v in T.vectorized(XV):
                                            nwv[v0 * XV + v] = norm_w[g * GS + (koi * KS + ty % KS) * STRIDE
                                                                      + tx * VEC + v0 * XV + v]
                                for b in T.unroll(B):
                                    for v0 in T.unroll(VEC // XV):  # float32 vectors of at most 8 in CUDA
                                        for v in T.vectorized(XV):
                                            u[b, v0 * XV + v] = x[b, s.x_off + g * GS + (koi * KS + ty % KS) * STRIDE
                                                                  + tx * VEC + v0 * XV + v]
                                    for v in T.unroll(VEC):
                                        if gated:
                                            if s.norm_on_x:
                                                ss[b, g] = ss[b, g] + u[b, v] * u[b, v]
                                            u[b, v] = u[b, v] * silu_expr(
                                                z[b, s.z_off + g * GS + (koi * KS + ty % KS) * STRIDE + tx * VEC + v])
                                            if not s.norm_on_x:
                                                ss[b, g] = ss[b, g] + u[b, v] * u[b, v]
                                        elif normed:
                                            ss[b, g] = ss[b, g] + u[b, v] * u[b, v]
                                        if normed:
                                            u[b, v] = u[b, v] * nwv[v]
                                    for r in T.unroll(RW):
                                        for v in T.unroll(VEC):
                                            acc[r, b, g] = acc[r, b, g] + u[b, v] * T.Cast("float32", wv[r, v])
                    if late:  # every load of this thread issued: the next kernel may launch
                        T.evaluate(T.ptx.griddepcontrol.launch_dependents())
                    if normed:  # Σ x² over the warp (every lane), then over the KS warps; then 1/rms
                        for i in T.unroll(5):
                            for b in T.unroll(B):
                                for g in T.unroll(G):
                                    ss[b, g] = ss[b, g] + T.tvm_warp_shuffle_xor(FULL_MASK, ss[b, g], 16 >> i, 32, 32)
                        if KS > 1:
                            if tx == 0:
                                for b in T.unroll(B):
                                    for g in T.unroll(G):
                                        ssh[ty // KS, ty % KS, b, g] = ss[b, g]
                            T.tvm_storage_sync("shared")
                            for b in T.unroll(B):
                                for g in T.unroll(G):
                                    ss[b, g] = over_ks(ssh, ty // KS, b, g)
                        for b in T.unroll(B):
                            for g in T.unroll(G):
                                ss[b, g] = T.rsqrt(ss[b, g] / T.float32(GS) + T.float32(s.eps))
                    for r in T.unroll(RW):  # y = Σ_g rstd_g · dot_g, still partial over the lanes
                        for b in T.unroll(B):
                            val[r * B + b] = combine(acc, ss, r, b)
                    for i in T.unroll(V2 - V):
                        val[V + i] = T.float32(0)
                    halve(val, tx, 16, HALF[0])
                    halve(val, tx, 8, HALF[1])
                    halve(val, tx, 4, HALF[2])
                    halve(val, tx, 2, HALF[3])
                    halve(val, tx, 1, HALF[4])
                    if KS > 1:  # the KS warps of a row group: their sums through shared memory
                        for i in T.unroll(VL):
                            red[ty // KS, ty % KS, tx, i] = val[i]
                        T.tvm_storage_sync("shared")
                        for i in T.unroll(VL):
                            val[i] = over_ks(red, ty // KS, tx, i)
                    if ty % KS == 0 and tx % REP == 0:  # lane t holds (r·B + b) = (t / REP)·VL + i
                        for i in T.unroll(VL):
                            if (tx // REP) * VL + i < V:
                                if (bx * RG + ty // KS) * RW + ((tx // REP) * VL + i) // B < N:
                                    finish(out, conv_state, pre, i,
                                           (bx * RG + ty // KS) * RW + ((tx // REP) * VL + i) // B,
                                           ((tx // REP) * VL + i) % B, val[i], xs)
                    if s.xproj > 0:
                        xproj_share(bx, ty, tx, xwv, xacc, xs, xp)
                    if s.zero_n > 0:
                        if bx == 0:  # (after the wait: the previous layer's state update has read its xacc)
                            for j in T.unroll(-(-(XACC_REPLICAS * B * s.zero_n) // (TY * 32))):
                                if j * TY * 32 + ty * 32 + tx < XACC_REPLICAS * B * s.zero_n:
                                    xzero[(j * TY * 32 + ty * 32 + tx) // (B * s.zero_n),
                                          (j * TY * 32 + ty * 32 + tx) // s.zero_n % B,
                                          (j * TY * 32 + ty * 32 + tx) % s.zero_n] = T.int64(0)

    return gemv


def _gemv_cpu(s: GemvSpec):
    B, N, K, G = s.batch, s.n, s.k, s.groups
    GS = K // G
    VL = 16  # accumulator lanes: one AVX-512 register of float32 (LLVM splits it where narrower)
    KV = K // VL * VL
    NW, PER = cpu_workers(N)  # rows in parallel, PER rows a worker
    sh = _shapes(s)
    epilogue = _epilogue(s, False)
    normed, gated = s.norm != "", s.norm == "gated"

    @T.prim_func(private=True)
    def gemv(x: T.Buffer(sh["x"], "float32"), z: T.Buffer(sh["z"], "float32"), norm_w: T.Buffer(sh["nw"], "float32"),
             W: T.Buffer(sh["W"], s.wdtype), w_scale: T.Buffer(sh["ws"], "float32"), bias: T.Buffer(sh["bias"], "float32"),
             conv_w: T.Buffer(sh["cw"], "float32"), conv_b: T.Buffer(sh["cb"], "float32"),
             conv_state: T.Buffer(sh["cs"], "float32", **ROW_VIEW), out: T.Buffer(sh["out"], "float32", **ROW_VIEW)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        u = T.alloc_buffer((B, K), "float32")  # the normalised input, written once
        ss = T.alloc_buffer((B, G), "float32")
        for b in range(B):
            for g in range(G):
                ss[b, g] = T.float32(0)
                for i in range(GS):
                    u[b, g * GS + i] = x[b, s.x_off + g * GS + i]
                    if gated:
                        if s.norm_on_x:
                            ss[b, g] = ss[b, g] + u[b, g * GS + i] * u[b, g * GS + i]
                        u[b, g * GS + i] = u[b, g * GS + i] * silu_expr(z[b, s.z_off + g * GS + i], True)
                    if normed and not (gated and s.norm_on_x):
                        ss[b, g] = ss[b, g] + u[b, g * GS + i] * u[b, g * GS + i]
                if normed:
                    ss[b, g] = T.rsqrt(ss[b, g] / T.float32(GS) + T.float32(s.eps))
                    for i in range(GS):
                        u[b, g * GS + i] = u[b, g * GS + i] * ss[b, g] * norm_w[g * GS + i]
        acc = T.alloc_buffer((NW, B, VL), "float32")  # each worker's accumulators: 64-byte rows
        for w in T.parallel(NW):
            for i in range(PER):
                if w * PER + i < N:
                    for b in T.unroll(B):
                        for v in T.vectorized(VL):
                            acc[w, b, v] = T.float32(0)
                    for ko in range(K // VL):
                        for b in T.unroll(B):
                            for v in T.vectorized(VL):
                                acc[w, b, v] = acc[w, b, v] + u[b, ko * VL + v] * T.Cast("float32", W[w * PER + i, ko * VL + v])
                    for b in T.unroll(B):
                        for j in range(K - KV):
                            acc[w, b, 0] = acc[w, b, 0] + u[b, KV + j] * T.Cast("float32", W[w * PER + i, KV + j])
                        epilogue(out, bias, conv_w, conv_b, conv_state, b, w * PER + i,
                                 rsum([acc[w, b, v] for v in range(VL)]), w_scale)

    return gemv
