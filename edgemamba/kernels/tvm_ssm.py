"""The selective state update of one decode step as TVM TIR, the state updated in place.

    Δ = clip(softplus(dt + dt_bias))      h' = exp(Δ·A)·h + (Δ·x)·B      y = h'·C + D·x

Mamba-1 (per channel c of d_inner): dt = dt_proj · dt_in, with dt_in, B and C from x_proj's output
`dbc` (Falcon-Mamba first RMS-normalises each of them); y is gated, y·silu(z), here. Mamba-2 (per
head h and channel p of the head): Δ and A are per head, B and C per group, all read from the
in_proj output `proj` (z ‖ xBC ‖ dt); the gate is applied here too (y·silu(z), so that the next
kernel's RMSNorm of y·silu(z) is a plain one), except for models that normalise before the gate
(`norm_before_gate`), whose gated RMSNorm is the next kernel's.

Both read `proj` as the in_proj GEMV leaves it, conv step and silu already applied to the conv
channels (Mamba-1 x; Mamba-2 xBC).

GPU: one thread per (sequence, channel, lane), each of `lanes` lanes holding d_state/lanes states
(`state_index`);
Mamba-1's dt dot product (dt_rank terms) is split across the lanes too; lanes combine dt and y with
warp shuffles. CPU: channels in parallel, one lane holding all the states.
"""

from dataclasses import dataclass  # no `from __future__ import annotations`: TVMScript reads the real annotations

import numpy as np
from tvm.script import tirx as T

from edgemamba.kernels.tvm_common import (ROW_VIEW, clip_dt_expr, cpu_workers, drop_unused_params, exp_expr,
                                          lane_allreduce, lane_reduce, padded, Pdl, rsum, silu_expr, softplus_expr,
                                          with_pdl)
from edgemamba.kernels.tvm_gemv import XACC_REPLICAS, XACC_SCALE
from edgemamba.reference import rms_norm, silu, softplus
from edgemamba.spec import ModelSpec

THREADS = 128  # GPU threads per block


@dataclass(frozen=True)
class SsmStepSpec:
    spec: ModelSpec
    batch: int
    dt_dtype: str = "float32"  # Mamba-1's dt_proj weights (`tvm.dt_proj_dtype`); read into float32
    dbc_fixed: bool = False  # Mamba-1: dbc is in_proj's fused x_proj sums, int64 fixed point (GemvSpec.xproj)

    @property
    def params(self) -> list[str]:
        if self.spec.arch == "mamba1":
            return ["proj", "dbc", "dt_w", "dt_bias", "A", "D", "ssm_state", "y"]
        return ["proj", "dt_bias", "A", "D", "ssm_state", "y"]

    @property
    def gated(self) -> bool:
        """y leaves gated, y·silu(z): always for Mamba-1; Mamba-2 unless it normalises before the gate."""
        return self.spec.arch == "mamba1" or not self.spec.norm_before_gate

    def name(self) -> str:
        s = self.spec
        dims = (f"{s.d_inner}x{s.d_state}r{s.dt_rank}" if s.arch == "mamba1"
                else f"h{s.n_heads}p{s.head_dim}n{s.d_state}g{s.n_groups}")
        falcon = "_bcdt" if s.bcdt_rms_eps is not None else ""
        lim = "" if s.dt_limit == (0.0, np.inf) else f"_lim{s.dt_limit[0]:g}-{s.dt_limit[1]:g}"
        gate = "_gz" if self.gated and s.arch == "mamba2" else ""
        dt16 = "_dt16" if s.arch == "mamba1" and self.dt_dtype == "float16" else ""
        fx = "_fx" if s.arch == "mamba1" and self.dbc_fixed else ""
        return f"ssm_step_{s.arch}_{dims}_b{self.batch}{falcon}{lim}{gate}{dt16}{fx}"

    def lanes(self, gpu: bool) -> int:
        """Lanes sharing one channel's states: 2 to 8 states each on a GPU, all of them on a CPU.
        Mamba-1 at batch 1 takes 2 (its dt dot product split over 8 lanes; mamba-130m -1.6%,
        mamba-1.4b -0.6% on an H100), at larger batches 4 (2 cost batch 8 +1.5% and +7%)."""
        n = self.spec.d_state
        per_lane = (2 if self.batch == 1 else 4) if self.spec.arch == "mamba1" else 8
        return max(1, min(32, n // per_lane)) if gpu and n % per_lane == 0 else 1


# ---------------------------------------------------------------------------------------------
# the contract, in NumPy
# ---------------------------------------------------------------------------------------------
def ssm_step_reference(k: SsmStepSpec, proj, ssm_state, *, dbc=None, dt_w=None, dt_bias, A, D):
    """Returns y (batch, d_inner), gated by silu(z) where `k.gated`; `ssm_state` is updated in place.
    dt_w is dt_proj transposed, (r, e)."""
    s = k.spec
    e, n = s.d_inner, s.d_state
    if k.dbc_fixed:  # (XACC_REPLICAS, batch, r + 2n) int64
        dbc = dbc.sum(axis=0) / XACC_SCALE
    if s.arch == "mamba1":
        r = s.dt_rank
        dt_in, B, C = dbc[:, :r], dbc[:, r : r + n], dbc[:, r + n : r + 2 * n]
        if s.bcdt_rms_eps is not None:
            dt_in, B, C = (rms_norm(v, None, s.bcdt_rms_eps) for v in (dt_in, B, C))
        dt = dt_in @ dt_w  # (b, e)
    else:
        dt = proj[:, e + s.conv_dim :]  # (b, H)
        B = proj[:, 2 * e : 2 * e + s.n_groups * n]
        C = proj[:, 2 * e + s.n_groups * n : 2 * e + 2 * s.n_groups * n]
    y, ssm_state[:] = selective_update(s, ssm_state, proj, dt, B, C, dt_bias=dt_bias, A=A, D=D)
    return y * silu(proj[:, :e]) if s.arch == "mamba2" and k.gated else y


def selective_update(s: ModelSpec, h, proj, dt, B, C, *, dt_bias, A, D):
    """One step for a batch of rows: h (b, ...) the state, proj the in_proj output after the conv,
    dt before bias and softplus (Mamba-1 (b, e), Mamba-2 (b, H)), B and C (b, G·n).
    Returns y (b, d_inner) (Mamba-1 gated by silu(z), Mamba-2 not) and the new state."""
    e, n = s.d_inner, s.d_state
    delta = np.clip(softplus(dt + dt_bias), *s.dt_limit)
    x = proj[:, e : 2 * e] if s.arch == "mamba2" else proj[:, :e]
    if s.arch == "mamba1":
        h = np.exp(delta[:, :, None] * A) * h + (delta * x)[:, :, None] * B[:, None, :]  # (b, e, n)
        return (np.einsum("ben,bn->be", h, C) + D * x) * silu(proj[:, e : 2 * e]), h
    b, H, P, G = len(proj), s.n_heads, s.head_dim, s.n_groups
    x = x.reshape(b, H, P)
    B = np.repeat(B.reshape(b, G, n), H // G, axis=1)  # (b, H, n): head k reads group k // (H/G)
    C = np.repeat(C.reshape(b, G, n), H // G, axis=1)
    h = np.exp(delta * A)[:, :, None, None] * h + (delta[:, :, None] * x)[..., None] * B[:, :, None, :]
    y = np.einsum("bhpn,bhn->bhp", h, C) + D[:, None] * x
    return y.reshape(b, e), h


# ---------------------------------------------------------------------------------------------
# TIR
# ---------------------------------------------------------------------------------------------
def ssm_step_kernel(k: SsmStepSpec, gpu: bool, pdl: Pdl | None = None):
    """pdl (GPU, sm_90+): programmatic dependent launch (`tvm_common.Pdl`); its prefetch brings the
    state (and Mamba-1's parameters) into L2 before the wait for the previous kernel."""
    pdl = pdl if gpu else None
    f = _mamba1(k, gpu, pdl) if k.spec.arch == "mamba1" else _mamba2(k, gpu, pdl)
    return with_pdl(drop_unused_params(f, k.params, k.name()), pdl)


def state_index(k: SsmStepSpec, gpu: bool, NL: int, SPL: int):
    """The index of a lane's i-th state. Batch 1: lane l holds SPL consecutive states (vector loads of
    B and C); larger GPU batches interleave them (lane l: l, l + NL, ...), so that each load and store of
    a warp touches consecutive words: Mamba-2 at batch 8 -19% on an H100, at batch 1 +6%."""
    if gpu and k.batch > 1:
        return lambda lane, i: i * NL + lane
    return lambda lane, i: lane * SPL + i


def _rsqrt_mean_sq(v, b, lo, n, eps):
    from tvm import tirx

    return tirx.rsqrt(rsum([v(b, lo + i) * v(b, lo + i) for i in range(n)]) / np.float32(n) + np.float32(eps))


def _mamba1(k: SsmStepSpec, gpu: bool, pdl: Pdl | None):
    s = k.spec
    Bt, e, n, r = k.batch, s.d_inner, s.d_state, s.dt_rank
    NL = k.lanes(gpu)
    SPL = n // NL  # states per lane
    st = state_index(k, gpu, NL, SPL)
    falcon = s.bcdt_rms_eps is not None
    eps = s.bcdt_rms_eps or 0.0
    NT = Bt * e * NL  # threads: (sequence, channel, lane)
    NB = (NT + THREADS - 1) // THREADS
    reduce, allreduce = lane_reduce(NL), lane_allreduce(NL)
    RPL = (r + NL - 1) // NL  # dt terms per lane
    state_loop = T.unroll if gpu else T.vectorized  # CPU: one channel's states in vector registers
    NW, PER = cpu_workers(NT)
    use_pdl = pdl is not None
    early, late, prefetch = use_pdl and pdl.early, use_pdl and pdl.late, use_pdl and pdl.prefetch
    PL = use_pdl and pdl.preloads("ssm")  # the thread's parameters into registers (cst) before the wait
    CA, CB, CD = RPL, RPL + SPL, RPL + SPL + 1  # cst: dt_w terms, then A, dt_bias, D

    def has_term(jj, lane):  # term jj·NL + lane exists
        return True if r % NL == 0 else jj * NL + lane < r

    def dbcv(dbc, b, i):  # x_proj's output i, float32 (fixed: the block's sums in shared memory, dbs)
        return dbc[i] if k.dbc_fixed else dbc[b, i]

    def scale(dbc, b, lo, width):
        return _rsqrt_mean_sq(lambda bb, i: dbcv(dbc, bb, i), b, lo, width, eps) if falcon else np.float32(1.0)

    R2N = r + 2 * n
    if k.dbc_fixed:
        assert gpu and (e * NL) % THREADS == 0, "fixed-point dbc: GPU blocks of one sequence"
    DBC_SHAPE, DBC_DTYPE = ((XACC_REPLICAS, Bt, R2N), "int64") if k.dbc_fixed else ((Bt, R2N), "float32")

    @T.macro
    def gather(bx, tx, dbc, dbs, isum):
        # the block's sequence's x_proj outputs: the replicas' int64 sums (exact), then float32
        for j in T.unroll(-(-R2N // THREADS)):
            if j * THREADS + tx < R2N:
                isum[0] = T.int64(0)
                for q in T.unroll(XACC_REPLICAS):
                    isum[0] = isum[0] + dbc[q, bx * THREADS // (e * NL), j * THREADS + tx]
                dbs[j * THREADS + tx] = T.Cast("float32", isum[0]) * T.float32(1.0 / XACC_SCALE)
        T.tvm_storage_sync("shared")

    def param(cst, j, buf, *index):  # a parameter, preloaded or read here (float32 either way)
        return cst[0, j] if PL else T.Cast("float32", buf[index])

    @T.macro
    def preload(t, dt_w, dt_bias, A, D, cst):
        b, c, lane = t // NL // e, t // NL % e, t % NL
        for jj in T.unroll(RPL):
            if has_term(jj, lane):
                cst[0, jj] = T.Cast("float32", dt_w[jj * NL + lane, c])
        for i in T.unroll(SPL):
            cst[0, CA + i] = A[c, st(lane, i)]
        cst[0, CB] = dt_bias[c]
        cst[0, CD] = D[c]

    @T.macro
    def body(t, active, proj, dbc, dt_w, dt_bias, A, D, ssm_state, y, dt, acc, h, w, cst):
        # t = (b · e + c) · NL + lane; threads past the end (active false) compute on the last
        # index and store nothing, so that every lane takes part in the shuffles. dt, acc, h:
        # the scratch rows of worker w (a GPU thread's registers: w = 0)
        b, c, lane = t // NL // e, t // NL % e, t % NL
        dt[w, 0] = T.float32(0)
        for jj in T.unroll(RPL):  # term jj·NL + lane; dt_proj stored (r, e): neighbouring channels read neighbouring words
            if has_term(jj, lane):
                dt[w, 0] = dt[w, 0] + dbcv(dbc, b, jj * NL + lane) * param(cst, jj, dt_w, jj * NL + lane, c)
        allreduce(dt, w)  # every lane of the channel holds the whole dot product
        dt[w, 0] = clip_dt_expr(softplus_expr(dt[w, 0] * scale(dbc, b, 0, r) + param(cst, CB, dt_bias, c), not gpu),
                                s.dt_limit)
        acc[w, 0] = T.float32(0)
        for i in state_loop(SPL):
            h[w, i] = (exp_expr(dt[w, 0] * param(cst, CA + i, A, c, st(lane, i)), not gpu)
                       * ssm_state[b, c, st(lane, i)]
                       + dt[w, 0] * proj[b, c] * dbcv(dbc, b, r + st(lane, i)) * scale(dbc, b, r, n))
        for i in T.unroll(SPL):
            acc[w, 0] = acc[w, 0] + h[w, i] * dbcv(dbc, b, r + n + st(lane, i)) * scale(dbc, b, r + n, n)
        reduce(acc, w)
        if active:
            for i in T.unroll(SPL):
                ssm_state[b, c, st(lane, i)] = h[w, i]
            if lane == 0:
                y[b, c] = (acc[w, 0] + param(cst, CD, D, c) * proj[b, c]) * silu_expr(proj[b, e + c], not gpu)

    @T.macro
    def warm(t, dt_w, A, ssm_state):
        # PDL, before the wait: the thread's parameters and state into L2 (a prefetch never makes a
        # later load see stale data: L2 is where the GPU's global memory is coherent)
        b, c, lane = t // NL // e, t // NL % e, t % NL
        T.evaluate(T.ptx.prefetch.global_.L2(T.address_of(ssm_state[b, c, lane * SPL])))
        if not PL:  # preloaded parameters are loaded before the wait anyway
            T.evaluate(T.ptx.prefetch.global_.L2(T.address_of(A[c, lane * SPL])))
            for j in T.unroll((r + NL - 1) // NL):
                if j * NL + lane < r:
                    T.evaluate(T.ptx.prefetch.global_.L2(T.address_of(dt_w[j * NL + lane, c])))

    @T.prim_func(private=True)
    def ssm_step(proj: T.Buffer((Bt, 2 * e), "float32"), dbc: T.Buffer(DBC_SHAPE, DBC_DTYPE),
                 dt_w: T.Buffer((r, e), k.dt_dtype), dt_bias: T.Buffer((e,), "float32"),
                 A: T.Buffer((e, n), "float32"), D: T.Buffer((e,), "float32"),
                 ssm_state: T.Buffer((Bt, e, n), "float32", **ROW_VIEW), y: T.Buffer((Bt, e), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if gpu:
            for bx in T.thread_binding(NB, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    cst = T.alloc_buffer((1, CD + 1), "float32", scope="local")
                    if use_pdl:
                        if early:
                            T.evaluate(T.ptx.griddepcontrol.launch_dependents())
                        if prefetch:
                            warm(T.min(bx * THREADS + tx, NT - 1), dt_w, A, ssm_state)
                        if PL:
                            preload(T.min(bx * THREADS + tx, NT - 1), dt_w, dt_bias, A, D, cst)
                        T.evaluate(T.ptx.griddepcontrol.wait())
                    dt = T.alloc_buffer((1, 1), "float32", scope="local")
                    acc = T.alloc_buffer((1, 1), "float32", scope="local")
                    h = T.alloc_buffer((1, SPL), "float32", scope="local")
                    if k.dbc_fixed:
                        dbs = T.alloc_buffer((R2N,), "float32", scope="shared")
                        isum = T.alloc_buffer((1,), "int64", scope="local")
                        gather(bx, tx, dbc, dbs, isum)
                        body(T.min(bx * THREADS + tx, NT - 1), bx * THREADS + tx < NT,
                             proj, dbs, dt_w, dt_bias, A, D, ssm_state, y, dt, acc, h, 0, cst)
                    else:
                        body(T.min(bx * THREADS + tx, NT - 1), bx * THREADS + tx < NT,
                             proj, dbc, dt_w, dt_bias, A, D, ssm_state, y, dt, acc, h, 0, cst)
                    if late:
                        T.evaluate(T.ptx.griddepcontrol.launch_dependents())
        else:
            dt = T.alloc_buffer((NW, 16), "float32")
            acc = T.alloc_buffer((NW, 16), "float32")
            h = T.alloc_buffer((NW, padded(SPL)), "float32")
            for w in T.parallel(NW):
                for i in range(PER):
                    if w * PER + i < NT:
                        body(w * PER + i, True, proj, dbc, dt_w, dt_bias, A, D, ssm_state, y, dt, acc, h, w, dt)

    return ssm_step


def _mamba2(k: SsmStepSpec, gpu: bool, pdl: Pdl | None):
    s = k.spec
    Bt, e, n, H, P, G = k.batch, s.d_inner, s.d_state, s.n_heads, s.head_dim, s.n_groups
    NI = s.in_proj_dim
    HPG = H // G  # heads per group
    NL = k.lanes(gpu)
    SPL = n // NL
    st = state_index(k, gpu, NL, SPL)
    XO, BO, CO, DTO = e, 2 * e, 2 * e + G * n, e + s.conv_dim  # column offsets in proj
    NT = Bt * e * NL  # threads: (sequence, channel, lane)
    NB = (NT + THREADS - 1) // THREADS
    reduce = lane_reduce(NL)
    state_loop = T.unroll if gpu else T.vectorized  # CPU: one channel's states in vector registers
    NW, PER = cpu_workers(NT)
    use_pdl = pdl is not None
    early, late, prefetch = use_pdl and pdl.early, use_pdl and pdl.late, use_pdl and pdl.prefetch
    PL = use_pdl and pdl.preloads("ssm")  # the thread's head parameters into registers (cst) before the wait
    CD, CB, CA = 0, 1, 2  # cst: D, dt_bias, A

    def param(cst, j, buf, hd):  # a head's parameter, preloaded or read here
        return cst[0, j] if PL else buf[hd]

    @T.macro
    def preload(t, dt_bias, A, D, cst):
        hd = t // NL % e // P
        cst[0, CD] = D[hd]
        cst[0, CB] = dt_bias[hd]
        cst[0, CA] = A[hd]

    @T.macro
    def body(t, active, proj, dt_bias, A, D, ssm_state, y, dt, acc, h, w, cst):
        # t = (b · e + c) · NL + lane, channel c = head · P + p; the head's group g reads B and C
        b, c, lane = t // NL // e, t // NL % e, t % NL
        hd, g = c // P, c // P // HPG
        dt[w, 0] = clip_dt_expr(softplus_expr(proj[b, DTO + hd] + param(cst, CB, dt_bias, hd), not gpu), s.dt_limit)
        acc[w, 0] = T.float32(0)
        for i in state_loop(SPL):
            h[w, i] = (exp_expr(dt[w, 0] * param(cst, CA, A, hd), not gpu) * ssm_state[b, hd, c % P, st(lane, i)]
                       + dt[w, 0] * proj[b, XO + c] * proj[b, BO + g * n + st(lane, i)])
        for i in T.unroll(SPL):
            acc[w, 0] = acc[w, 0] + h[w, i] * proj[b, CO + g * n + st(lane, i)]
        reduce(acc, w)
        if active:
            for i in T.unroll(SPL):
                ssm_state[b, hd, c % P, st(lane, i)] = h[w, i]
            if lane == 0:
                if k.gated:
                    y[b, c] = (acc[w, 0] + param(cst, CD, D, hd) * proj[b, XO + c]) * silu_expr(proj[b, c], not gpu)
                else:
                    y[b, c] = acc[w, 0] + param(cst, CD, D, hd) * proj[b, XO + c]

    @T.macro
    def warm(t, ssm_state):  # PDL, before the wait: the thread's states into L2 (see _mamba1)
        b, c, lane = t // NL // e, t // NL % e, t % NL
        T.evaluate(T.ptx.prefetch.global_.L2(T.address_of(ssm_state[b, c // P, c % P, lane * SPL])))

    @T.prim_func(private=True)
    def ssm_step(proj: T.Buffer((Bt, NI), "float32"), dt_bias: T.Buffer((H,), "float32"),
                 A: T.Buffer((H,), "float32"), D: T.Buffer((H,), "float32"),
                 ssm_state: T.Buffer((Bt, H, P, n), "float32", **ROW_VIEW), y: T.Buffer((Bt, e), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if gpu:
            for bx in T.thread_binding(NB, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    cst = T.alloc_buffer((1, 3), "float32", scope="local")
                    if use_pdl:
                        if early:
                            T.evaluate(T.ptx.griddepcontrol.launch_dependents())
                        if prefetch:
                            warm(T.min(bx * THREADS + tx, NT - 1), ssm_state)
                        if PL:
                            preload(T.min(bx * THREADS + tx, NT - 1), dt_bias, A, D, cst)
                        T.evaluate(T.ptx.griddepcontrol.wait())
                    dt = T.alloc_buffer((1, 1), "float32", scope="local")
                    acc = T.alloc_buffer((1, 1), "float32", scope="local")
                    h = T.alloc_buffer((1, SPL), "float32", scope="local")
                    body(T.min(bx * THREADS + tx, NT - 1), bx * THREADS + tx < NT,
                         proj, dt_bias, A, D, ssm_state, y, dt, acc, h, 0, cst)
                    if late:
                        T.evaluate(T.ptx.griddepcontrol.launch_dependents())
        else:
            dt = T.alloc_buffer((NW, 16), "float32")
            acc = T.alloc_buffer((NW, 16), "float32")
            h = T.alloc_buffer((NW, padded(SPL)), "float32")
            for w in T.parallel(NW):
                for i in range(PER):
                    if w * PER + i < NT:
                        body(w * PER + i, True, proj, dt_bias, A, D, ssm_state, y, dt, acc, h, w, dt)

    return ssm_step
