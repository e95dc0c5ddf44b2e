"""A model as a TVM Relax module: decode steps and prefill built from a ModelSpec.

Functions (weights are parameters, never constants, so one library serves every checkpoint of the
same shape and stays small; `edgemamba.runtimes.tvm.param_specs` gives their order):

    step_{B}(ids (B,) int32, logits (B, vocab), conv_state.0, ssm_state.0, …, weights…)
        one token for each of B sequences; logits and every state tensor are written in place
    prefill(ids (t,) int32, logits (1, vocab), conv_state.0 (1, …), ssm_state.0 (1, …), …, weights…)
        a chunk of t tokens (t symbolic) of one sequence; last logits and the state in place
    greedy_{B}(logits (B, vocab), ids (B,) int32)
        each sequence's next token (argmax; -1 for non-finite logits) into ids, for the next step

Each is a straight sequence of calls to the TIR kernels of `tvm_gemv`, `tvm_ssm` and
`tvm_prefill`; kernels of the same shape are shared across layers. A decode step launches
Mamba-1: 4 kernels a layer (in_proj+conv, x_proj, dt_proj+state update, out_proj+residual), 3 from
the second layer on where x_proj is fused into in_proj (`Pdl.fuse_x_proj`, the default on sm_90+),
Mamba-2: 3 (in_proj+conv, state update, gated norm+out_proj+residual), plus embedding and lm_head.
A GPU prefill layer runs the conv across tokens and the scan in time pieces (`_prefill_layer_parallel`):
8 kernels a Mamba-1 layer, 7 a Mamba-2 one; on a CPU, 7 and 6 (conv and scan walk the chunk).
"""

from dataclasses import dataclass, field  # no `from __future__ import annotations`: TVMScript reads the real annotations

import tvm
from tvm import relax, tirx

from edgemamba.kernels.tvm_common import Pdl, pdl_for
from edgemamba.kernels.tvm_gemv import XACC_REPLICAS, GemvSpec, block_rows, gemv_kernel
from edgemamba.kernels.tvm_greedy import greedy_kernel, greedy_parts
from edgemamba.kernels.tvm_prefill import (ConvChunkSpec, ConvOutSpec, MatmulSpec, RowNormSpec, ScanChunkSpec, ScanSpec,
                                           bcdt_norm_kernel, conv_chunk_kernel, conv_out_kernel, embed_kernel,
                                           last_row_kernel, matmul_kernel, row_norm_kernel, scan_chunk_kernels,
                                           scan_kernel)
from edgemamba.kernels.tvm_ssm import THREADS as SSM_THREADS
from edgemamba.kernels.tvm_ssm import SsmStepSpec, ssm_step_kernel
from edgemamba.runtimes.tvm import WEIGHT_DTYPES, dt_proj_dtype, param_specs, state_specs
from edgemamba.spec import ModelSpec

STEP_BATCHES = (1, 2, 4, 8)


def _ty(shape, dtype="float32"):
    return relax.TensorType(list(shape), dtype)


@dataclass
class _Builder:
    """Adds each kernel once (by its spec) and emits calls to it."""

    bb: relax.BlockBuilder
    gpu: bool
    target: tvm.target.Target
    gvars: dict = field(default_factory=dict)
    pdl: Pdl | None = None  # decode-step kernels with programmatic dependent launch (`tvm_common.Pdl`)

    def kernel(self, key, make):
        if key not in self.gvars:
            func = make()
            self.gvars[key] = self.bb.add_func(func, func.attrs["global_symbol"])
        return self.gvars[key]

    def call(self, key, make, args, out_shape, out_dtype="float32"):
        return self.bb.emit(relax.call_tir(self.kernel(key, make), args, _ty(out_shape, out_dtype)))

    def call_many(self, key, make, args, out_shapes):
        """A kernel with several new float32 outputs."""
        out = self.bb.emit(relax.call_tir(self.kernel(key, make), args, [_ty(s) for s in out_shapes]))
        return [self.bb.emit(relax.TupleGetItem(out, i)) for i in range(len(out_shapes))]

    def call_inplace(self, key, make, args, inplace: list[int], out_shapes, out_dtypes=None):
        """Outputs: one per entry of `inplace` (an argument index it aliases, or -1 for a new tensor)."""
        tys = [_ty(s, dt or "float32") for s, dt in zip(out_shapes, out_dtypes or [None] * len(out_shapes))]
        out = self.bb.emit(relax.call_tir_inplace(self.kernel(key, make), args, inplace, tys if len(tys) > 1 else tys[0]))
        return [self.bb.emit(relax.TupleGetItem(out, i)) for i in range(len(tys))] if len(tys) > 1 else [out]


def build_module(spec: ModelSpec, precision: str, gpu: bool, target: tvm.target.Target,
                 batches=STEP_BATCHES, pdl: str | None = None) -> tvm.IRModule:
    """pdl: how the decode step's kernels use programmatic dependent launch, a key of
    `tvm_common.PDL_MODES`; None: the default where the target has it (CUDA sm_90 and newer)."""
    kb = _Builder(relax.BlockBuilder(), gpu, target, pdl=pdl_for(target, pdl) if gpu else None)
    for batch in batches:
        _function(kb, spec, WEIGHT_DTYPES[precision], f"step_{batch}", batch)
        _greedy_function(kb, spec, batch)
    _function(kb, spec, WEIGHT_DTYPES[precision], "prefill", None)
    return kb.bb.get()


def step_launches(mod: tvm.IRModule, batch: int) -> int:
    """Kernels step_{batch} launches (one per call_tir), as the library's manifest records them for
    latency predictions: the count depends on the arch (x_proj fused on sm_90+)."""
    return mod[f"step_{batch}"].script().count("R.call_tir")


def _greedy_function(kb: _Builder, s: ModelSpec, batch: int):
    """greedy_{batch}(logits, ids): each sequence's next token, written into ids (`tvm_greedy`)."""
    logits = relax.Var("logits", _ty((batch, s.vocab_size)))
    ids = relax.Var("ids", _ty((batch,), "int32"))
    with kb.bb.function(f"greedy_{batch}", [logits, ids]):
        with kb.bb.dataflow():
            if kb.gpu:  # chunks of each row, then a warp a row over the chunks' picks
                pdl = None if kb.pdl is None else kb.pdl.for_batch(batch)
                part, final = greedy_kernel(batch, s.vocab_size, True, pdl)
                parts = kb.call(("greedy_part", batch), lambda: part, [logits], (batch, greedy_parts(s.vocab_size), 2),
                                "int32")
                (out,) = kb.call_inplace(("greedy_final", batch), lambda: final, [parts, ids], [1], [(batch,)], ["int32"])
            else:
                (out,) = kb.call_inplace(("greedy", batch), lambda: greedy_kernel(batch, s.vocab_size, False),
                                         [logits, ids], [1], [(batch,)], ["int32"])
            out = kb.bb.emit_output(out)
        kb.bb.emit_func_output(out)


@dataclass
class _Layer:
    """What one layer's calls need: the builder, the spec, its weights and state (Relax vars)."""

    kb: _Builder
    s: ModelSpec
    wdtype: str
    weights: dict
    p: str  # "layers.{i}."
    conv_state: relax.Var
    ssm_state: relax.Var

    def w(self, name):
        return self.weights[self.p + name]

    def opt(self, name):  # an optional weight ([] when the model has none)
        return [self.weights[self.p + name]] if self.p + name in self.weights else []

    def mat(self, name):  # a matrix, and its row scales when int8
        return [self.w(name), *self.opt(name + ".scale")]

    @property
    def conv_lo(self) -> int:  # the conv channels among the in_proj rows: Mamba-1 x, Mamba-2 xBC
        return 0 if self.s.arch == "mamba1" else self.s.d_inner

    @property
    def act(self) -> str:  # dtype of the prefill matmuls' inputs: fp16 for the tensor cores
        return "float16" if self.kb.gpu and self.wdtype in ("float16", "int8") else "float32"


def _function(kb: _Builder, s: ModelSpec, wdtype: str, name: str, batch: int | None):
    """step_{batch}, or prefill (t symbolic) when batch is None."""
    gpu, d = kb.gpu, s.d_model
    # PDL for this step's kernels (prefill: its only step kernels are the embedding and, as in
    # step_1, lm_head, both correct however launched)
    pdl = None if kb.pdl is None else kb.pdl.for_batch(batch or 1)
    rows = batch if batch is not None else tirx.Var("t", "int64")
    srows = batch if batch is not None else 1  # state rows
    ids = relax.Var("ids", _ty((rows,), "int32"))
    logits = relax.Var("logits", _ty((srows, s.vocab_size)))
    states = {n: relax.Var(n, _ty((srows, *shape))) for n, shape in state_specs(s)}
    weights = {n: relax.Var(n, _ty(shape, dt)) for n, shape, dt in param_specs(s, wdtype)}
    top = _Layer(kb, s, wdtype, weights, "", None, None)  # the weights outside the layers

    with kb.bb.function(name, [ids, logits, *states.values(), *weights.values()]):
        with kb.bb.dataflow():
            h = kb.call(("embed",), lambda: embed_kernel(s.vocab_size, d, wdtype, gpu, kb.pdl),
                        [ids, *top.mat("embedding")], (rows, d))  # (rows, d_model) float32: the residual stream
            xacc = None
            for i in range(s.n_layer):
                layer = _Layer(kb, s, wdtype, weights, f"layers.{i}.", states[f"conv_state.{i}"],
                               states[f"ssm_state.{i}"])
                if batch is not None:
                    h, xacc = _step_layer(layer, h, batch, pdl, xacc, last=i == s.n_layer - 1)
                else:
                    h = _prefill_layer(layer, h, rows)
            if batch is None:
                h = kb.call(("last_row",), lambda: last_row_kernel(d, gpu), [h], (1, d))
            gl = GemvSpec(n=s.vocab_size, k=d, batch=srows, wdtype=wdtype, norm="rms", eps=s.norm_eps)
            args = [h, top.w("norm_f"), *(top.mat("lm_head") if "lm_head" in weights else top.mat("embedding")),
                    logits]
            (out,) = kb.call_inplace(gl, lambda: gemv_kernel(gl, gpu, pdl), args, [len(args) - 1],
                                     [(srows, s.vocab_size)])
            out = kb.bb.emit_output(out)
        kb.bb.emit_func_output(out)


def _kind(pdl: Pdl | None, kind: str) -> Pdl | None:
    return None if pdl is None else pdl.kernel(kind)


def fuses_x_proj(s: ModelSpec, wdtype: str, pdl: Pdl | None, batch: int) -> bool:
    """Whether a GPU step's Mamba-1 layers after the first compute x_proj in in_proj's kernel: where
    the mode says so, for float weights, and where in_proj's blocks and the state update's blocks
    tile the channels evenly (true of every published shape)."""
    if not (s.arch == "mamba1" and pdl is not None and pdl.fuse_x_proj and wdtype != "int8"):
        return False
    rows = block_rows(GemvSpec(n=s.in_proj_dim, k=s.d_model, batch=batch, wdtype=wdtype, norm="rms"))
    lanes = SsmStepSpec(s, batch).lanes(True)
    return s.d_inner % rows == 0 and (s.d_inner * lanes) % SSM_THREADS == 0


def _step_layer(L: _Layer, h, batch: int, pdl: Pdl | None = None, xacc=None, last: bool = False):
    """One token of `batch` sequences through a layer: 4 kernels (Mamba-1) or 3 (Mamba-2); the
    residual h (batch, d_model) is updated in place. pdl: how they use programmatic dependent launch.
    xacc (`fuses_x_proj`): this layer's zeroed x_proj accumulator, made by the previous layer's
    out_proj (None: the first layer, whose x_proj is its own kernel). Returns h and the next
    layer's xacc (None where there is none)."""
    kb, s, gpu = L.kb, L.s, L.kb.gpu
    e, d, NI, C = s.d_inner, s.d_model, s.in_proj_dim, s.conv_dim
    XP = s.dt_rank + 2 * s.d_state  # x_proj's rows (Mamba-1)
    fused = xacc is not None
    # RMSNorm · in_proj, then the conv step on the conv channels (conv_state in place)
    g = GemvSpec(n=NI, k=d, batch=batch, wdtype=L.wdtype, norm="rms", eps=s.norm_eps, bias=s.use_bias,
                 epilogue="conv", conv_lo=L.conv_lo, conv_hi=L.conv_lo + C, d_conv=s.d_conv, conv_bias=s.use_conv_bias,
                 xproj=XP if fused else 0)
    args = [h, L.w("norm"), *L.mat("in_proj"), *L.opt("in_proj_bias"), L.w("conv_weight"), *L.opt("conv_bias"),
            L.conv_state]
    if fused:  # ... and x_proj of the conv outputs, added into xacc
        args += [L.w("x_proj"), xacc]
        _, dbc, proj = kb.call_inplace(g, lambda: gemv_kernel(g, gpu, _kind(pdl, "in_proj")), args,
                                       [len(args) - 3, len(args) - 1, -1],
                                       [s.conv_state_shape(batch), (XACC_REPLICAS, batch, XP), (batch, NI)],
                                       [None, "int64", None])
    else:
        _, proj = kb.call_inplace(g, lambda: gemv_kernel(g, gpu, _kind(pdl, "in_proj")), args, [len(args) - 1, -1],
                                  [s.conv_state_shape(batch), (batch, NI)])  # proj (batch, in_proj_dim)
    # the state update (ssm_state in place); Mamba-1 first needs x_proj's Δ_in, B, C
    k = SsmStepSpec(s, batch, dt_proj_dtype(L.wdtype), dbc_fixed=fused)
    if s.arch == "mamba1":
        if not fused:
            gx = GemvSpec(n=XP, k=e, batch=batch, wdtype=L.wdtype, x_cols=NI)
            dbc = kb.call(gx, lambda: gemv_kernel(gx, gpu, _kind(pdl, "x_proj")), [proj, *L.mat("x_proj")], (batch, XP))
        args = [proj, dbc, L.w("dt_proj.T"), L.w("dt_bias"), L.w("A"), L.w("D"), L.ssm_state]
    else:
        args = [proj, L.w("dt_bias"), L.w("A"), L.w("D"), L.ssm_state]
    _, y = kb.call_inplace(k, lambda: ssm_step_kernel(k, gpu, _kind(pdl, "ssm")), args, [len(args) - 1, -1],
                           [s.ssm_state_shape(batch), (batch, e)])  # y (batch, d_inner)
    # out_proj (Mamba-2: after the RMSNorm of y, gated by the state update, or the gated RMSNorm
    # when the model normalises before the gate), added to the residual in place
    make_xacc = gpu and fuses_x_proj(s, L.wdtype, pdl, batch) and not last  # the next layer's, zeroed
    if s.arch == "mamba1":
        go = GemvSpec(n=d, k=e, batch=batch, wdtype=L.wdtype, bias=s.use_bias, epilogue="residual",
                      zero_n=XP if make_xacc else 0)
        args = [y, *L.mat("out_proj"), *L.opt("out_proj_bias"), h]
    elif k.gated:
        go = GemvSpec(n=d, k=e, batch=batch, wdtype=L.wdtype, norm="rms", groups=s.n_groups, eps=s.norm_eps,
                      bias=s.use_bias, epilogue="residual")
        args = [y, L.w("gate_norm"), *L.mat("out_proj"), *L.opt("out_proj_bias"), h]
    else:
        go = GemvSpec(n=d, k=e, batch=batch, wdtype=L.wdtype, norm="gated", groups=s.n_groups,
                      norm_on_x=s.norm_before_gate, z_cols=NI, eps=s.norm_eps, bias=s.use_bias, epilogue="residual")
        args = [y, proj, L.w("gate_norm"), *L.mat("out_proj"), *L.opt("out_proj_bias"), h]
    if make_xacc:
        return kb.call_inplace(go, lambda: gemv_kernel(go, gpu, _kind(pdl, "out_proj")), args, [len(args) - 1, -1],
                               [(batch, d), (XACC_REPLICAS, batch, XP)], [None, "int64"])
    (h,) = kb.call_inplace(go, lambda: gemv_kernel(go, gpu, _kind(pdl, "out_proj")), args, [len(args) - 1], [(batch, d)])
    return h, None


def _prefill_layer(L: _Layer, h, rows):
    """A chunk of `rows` tokens of one sequence through a layer; returns the new residual (rows, d_model)."""
    kb, s, gpu, act = L.kb, L.s, L.kb.gpu, L.act
    e, d, n, NI, C = s.d_inner, s.d_model, s.d_state, s.in_proj_dim, s.conv_dim
    rn = RowNormSpec(d, act, eps=s.norm_eps)
    hn = kb.call(rn, lambda: row_norm_kernel(rn, gpu), [h, L.w("norm")], (rows, d), act)
    mi = MatmulSpec(NI, d, L.wdtype, act, bias=s.use_bias)
    proj = kb.call(mi, lambda: matmul_kernel(mi, gpu, kb.target), [hn, *L.mat("in_proj"), *L.opt("in_proj_bias")],
                   (rows, NI))  # (rows, in_proj_dim)
    if gpu:
        return _prefill_layer_parallel(L, h, rows, proj)
    cc = ConvChunkSpec(NI, L.conv_lo, L.conv_lo + C, s.d_conv, s.use_conv_bias)
    args = [proj, L.w("conv_weight"), *L.opt("conv_bias"), L.conv_state]
    proj, _ = kb.call_inplace(cc, lambda: conv_chunk_kernel(cc, gpu), args, [0, len(args) - 1],
                              [(rows, NI), s.conv_state_shape(1)])  # conv channels now conv'd, in place
    k = ScanSpec(s, act if s.arch == "mamba1" else "float32")  # Mamba-1's y goes straight to out_proj
    if s.arch == "mamba1":
        r = s.dt_rank
        mx = MatmulSpec(r + 2 * n, e, L.wdtype, "float32", x_cols=NI)
        dbc = kb.call(mx, lambda: matmul_kernel(mx, gpu, kb.target), [proj, *L.mat("x_proj")], (rows, r + 2 * n))
        dbc, dt = _prefill_dt(L, dbc, rows)
        args = [proj, dbc, dt, L.w("dt_bias"), L.w("A"), L.w("D"), L.ssm_state]
    else:
        args = [proj, L.w("dt_bias"), L.w("A"), L.w("D"), L.ssm_state]
    _, y = kb.call_inplace(k, lambda: scan_kernel(k, gpu), args, [len(args) - 1, -1],
                           [s.ssm_state_shape(1), (rows, e)], [None, k.y_dtype])  # y (rows, d_inner)
    return _prefill_out(L, y, proj, h, rows)


def _prefill_dt(L: _Layer, dbc, rows):
    """Mamba-1 prefill: Falcon-Mamba's norm of dt, B and C (in place), then dt_proj: (dbc, dt (rows, d_inner))."""
    kb, s, gpu = L.kb, L.s, L.kb.gpu
    e, n, r = s.d_inner, s.d_state, s.dt_rank
    if s.bcdt_rms_eps is not None:
        (dbc,) = kb.call_inplace(("bcdt",), lambda: bcdt_norm_kernel(s, gpu), [dbc], [0], [(rows, r + 2 * n)])
    md = MatmulSpec(e, r, dt_proj_dtype(L.wdtype), "float32", x_cols=r + 2 * n, w_kn=True)
    return dbc, kb.call(md, lambda: matmul_kernel(md, gpu, kb.target), [dbc, L.w("dt_proj.T")], (rows, e))


def _prefill_out(L: _Layer, y, proj, h, rows):
    """A prefill layer's end: Mamba-2's gated norm of y (z from proj), out_proj with the residual h."""
    kb, s, gpu, act = L.kb, L.s, L.kb.gpu, L.act
    e, d, NI = s.d_inner, s.d_model, s.in_proj_dim
    if s.arch == "mamba2":
        gn = RowNormSpec(e, act, groups=s.n_groups, gated=True, norm_on_x=s.norm_before_gate, z_cols=NI,
                         eps=s.norm_eps)
        y = kb.call(gn, lambda: row_norm_kernel(gn, gpu), [y, proj, L.w("gate_norm")], (rows, e), act)
    mo = MatmulSpec(d, e, L.wdtype, act, bias=s.use_bias, residual=True)
    return kb.call(mo, lambda: matmul_kernel(mo, gpu, kb.target), [y, *L.mat("out_proj"), *L.opt("out_proj_bias"), h],
                   (rows, d))


def _prefill_layer_parallel(L: _Layer, h, rows, proj):
    """The rest of a GPU prefill layer after in_proj: the conv out of place across tokens (xc), the scan
    in time pieces (`ScanChunkSpec`: states, then pieces), out_proj; proj keeps the raw in_proj output."""
    kb, s, gpu, act = L.kb, L.s, L.kb.gpu, L.act
    e, n, NI, C = s.d_inner, s.d_state, s.in_proj_dim, s.conv_dim
    half = s.arch == "mamba1" and act == "float16"  # x_proj on tensor cores takes an fp16 copy of xc
    co = ConvOutSpec(ConvChunkSpec(NI, L.conv_lo, L.conv_lo + C, s.d_conv, s.use_conv_bias), half)
    args = [proj, L.w("conv_weight"), *L.opt("conv_bias"), L.conv_state]
    _, xc, *xc16 = kb.call_inplace(co, lambda: conv_out_kernel(co, gpu), args, [len(args) - 1, -1] + [-1] * half,
                                   [s.conv_state_shape(1), (rows, C)] + [(rows, C)] * half,
                                   [None, None] + ["float16"] * half)  # xc (rows, conv_dim), float32 (and float16)
    k = ScanChunkSpec(s, act if s.arch == "mamba1" else "float32")  # Mamba-1's y goes straight to out_proj
    kernels = {}

    def part(i):
        def make():
            if not kernels:
                kernels["both"] = scan_chunk_kernels(k, gpu)
            return kernels["both"][i]
        return make

    if s.arch == "mamba1":
        r = s.dt_rank
        mx = MatmulSpec(r + 2 * n, e, L.wdtype, act)
        dbc = kb.call(mx, lambda: matmul_kernel(mx, gpu, kb.target), [xc16[0] if half else xc, *L.mat("x_proj")],
                      (rows, r + 2 * n))
        dbc, dt = _prefill_dt(L, dbc, rows)
        named = {"xc": xc, "proj": proj, "dbc": dbc, "dt": dt}
    else:
        named = {"xc": xc, "proj": proj}
    named |= {"dt_bias": L.w("dt_bias"), "A": L.w("A"), "D": L.w("D"), "ssm_state": L.ssm_state}
    outs = [k.hs_shape, k.sdt_shape] + [(rows, k.per_head)] * k.delta_kept
    named |= dict(zip(["hs", "sdt", "dlt"], kb.call_many((k, "states"), part(0),
                                                         [named[p] for p in k.states_params[: -len(outs)]], outs)))
    args = [named[p] for p in k.pieces_params[:-1]]
    _, y = kb.call_inplace((k, "pieces"), part(1), args, [k.pieces_params.index("ssm_state"), -1],
                           [s.ssm_state_shape(1), (rows, e)], [None, k.y_dtype])  # y (rows, d_inner)
    return _prefill_out(L, y, proj, h, rows)


def relax_pipeline():
    """Lower the call sequence to VM code: no legalization or fusion (every kernel is scheduled TIR)."""
    t = relax.transform
    return tvm.transform.Sequential([
        t.ToNonDataflow(), t.RemovePurityChecking(), t.CallTIRRewrite(), t.StaticPlanBlockMemory(),
        t.LowerAllocTensor(), t.KillAfterLastUse(), t.LowerRuntimeBuiltin(), t.ComputePrimValue(),
        t.VMShapeLower(), t.AttachGlobalSymbol(),
    ])
