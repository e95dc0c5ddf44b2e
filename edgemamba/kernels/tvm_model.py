"""A model as a TVM Relax module: decode steps and prefill built from a ModelSpec.

Functions (weights are parameters, never constants, so one library serves every checkpoint of the
same shape and stays small; `edgemamba.runtimes.tvm.param_specs` gives their order):

    step_{B}(ids (B,) int32, logits (B, vocab), conv_state.0, ssm_state.0, …, weights…)
        one token for each of B sequences; logits and every state tensor are written in place
    prefill(ids (t,) int32, logits (1, vocab), conv_state.0 (1, …), ssm_state.0 (1, …), …, weights…)
        a chunk of t tokens (t symbolic) of one sequence; last logits and the state in place

Each is a straight sequence of calls to the TIR kernels of `tvm_gemv`, `tvm_ssm` and
`tvm_prefill`; kernels of the same shape are shared across layers. A decode step launches
Mamba-1: 4 kernels a layer (in_proj+conv, x_proj, dt_proj+state update, out_proj+residual),
Mamba-2: 3 (in_proj+conv, state update, gated norm+out_proj+residual), plus embedding and lm_head.
"""

from dataclasses import dataclass, field  # no `from __future__ import annotations`: TVMScript reads the real annotations

import tvm
from tvm import relax, tirx

from edgemamba.kernels.tvm_gemv import GemvSpec, gemv_kernel
from edgemamba.kernels.tvm_prefill import (ConvChunkSpec, MatmulSpec, RowNormSpec, ScanSpec, bcdt_norm_kernel,
                                           conv_chunk_kernel, embed_kernel, last_row_kernel, matmul_kernel,
                                           row_norm_kernel, scan_kernel)
from edgemamba.kernels.tvm_ssm import SsmStepSpec, ssm_step_kernel
from edgemamba.runtimes.tvm import WEIGHT_DTYPES, param_specs, state_specs
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

    def kernel(self, key, make):
        if key not in self.gvars:
            func = make()
            self.gvars[key] = self.bb.add_func(func, func.attrs["global_symbol"])
        return self.gvars[key]

    def call(self, key, make, args, out_shape, out_dtype="float32"):
        return self.bb.emit(relax.call_tir(self.kernel(key, make), args, _ty(out_shape, out_dtype)))

    def call_inplace(self, key, make, args, inplace: list[int], out_shapes, out_dtypes=None):
        """Outputs: one per entry of `inplace` (an argument index it aliases, or -1 for a new tensor)."""
        tys = [_ty(s, dt or "float32") for s, dt in zip(out_shapes, out_dtypes or [None] * len(out_shapes))]
        out = self.bb.emit(relax.call_tir_inplace(self.kernel(key, make), args, inplace, tys if len(tys) > 1 else tys[0]))
        return [self.bb.emit(relax.TupleGetItem(out, i)) for i in range(len(tys))] if len(tys) > 1 else [out]


def build_module(spec: ModelSpec, precision: str, gpu: bool, target: tvm.target.Target,
                 batches=STEP_BATCHES) -> tvm.IRModule:
    wdtype = WEIGHT_DTYPES[precision]
    bb = relax.BlockBuilder()
    kb = _Builder(bb, gpu, target)
    for batch in batches:
        _function(kb, spec, wdtype, f"step_{batch}", batch)
    _function(kb, spec, wdtype, "prefill", None)
    return bb.get()


def _function(kb: _Builder, s: ModelSpec, wdtype: str, name: str, batch: int | None):
    """step_{batch}, or prefill when batch is None."""
    bb, gpu = kb.bb, kb.gpu
    step = batch is not None
    rows = batch if step else tirx.Var("t", "int64")
    srows = batch if step else 1  # state rows
    ids = relax.Var("ids", _ty((rows,), "int32"))
    logits = relax.Var("logits", _ty((srows, s.vocab_size)))
    states = {name_: relax.Var(name_, _ty((srows, *shape))) for name_, shape in state_specs(s)}
    weights = {n: relax.Var(n, _ty(shape, dt)) for n, shape, dt in param_specs(s, wdtype)}
    w = weights.get
    e, n, d = s.d_inner, s.d_state, s.d_model
    NI, C, KC = s.in_proj_dim, s.conv_dim, s.d_conv
    conv_lo = 0 if s.arch == "mamba1" else e  # conv channels among the in_proj rows
    act = "float16" if gpu and wdtype in ("float16", "int8") else "float32"  # prefill matmul inputs

    def opt(*names):  # the optional weights this model has
        return [weights[x] for x in names if x in weights]

    def mat(name):  # a matrix, and its row scales when int8
        return [weights[name], *opt(name + ".scale")]

    with bb.function(name, [ids, logits, *states.values(), *weights.values()]):
        with bb.dataflow():
            h = kb.call(("embed", gpu), lambda: embed_kernel(s.vocab_size, d, wdtype, gpu), [ids, *mat("embedding")],
                        (rows, d))
            for i in range(s.n_layer):
                p = f"layers.{i}."
                conv_state, ssm_state = states[f"conv_state.{i}"], states[f"ssm_state.{i}"]
                if step:
                    # RMSNorm · in_proj, the conv step on the conv channels (conv_state in place)
                    g = GemvSpec(n=NI, k=d, batch=batch, wdtype=wdtype, norm="rms", eps=s.norm_eps, bias=s.use_bias,
                                 epilogue="conv", conv_lo=conv_lo, conv_hi=conv_lo + C, d_conv=KC,
                                 conv_bias=s.use_conv_bias)
                    args = [h, w(p + "norm"), *mat(p + "in_proj"), *opt(p + "in_proj_bias"), w(p + "conv_weight"),
                            *opt(p + "conv_bias"), conv_state]
                    _, proj = kb.call_inplace(g, lambda g=g: gemv_kernel(g, gpu), args, [len(args) - 1, -1],
                                              [conv_state.ty.shape, (batch, NI)])
                    k = SsmStepSpec(s, batch)
                    if s.arch == "mamba1":
                        gx = GemvSpec(n=s.dt_rank + 2 * n, k=e, batch=batch, wdtype=wdtype, x_cols=NI)
                        dbc = kb.call(gx, lambda: gemv_kernel(gx, gpu), [proj, *mat(p + "x_proj")], (batch, gx.n))
                        args = [proj, dbc, w(p + "dt_proj.T"), w(p + "dt_bias"), w(p + "A"), w(p + "D"), ssm_state]
                    else:
                        args = [proj, w(p + "dt_bias"), w(p + "A"), w(p + "D"), ssm_state]
                    _, y = kb.call_inplace(k, lambda: ssm_step_kernel(k, gpu), args, [len(args) - 1, -1],
                                           [ssm_state.ty.shape, (batch, e)])
                    # out_proj (Mamba-2: after the gated RMSNorm), added to the residual in place
                    if s.arch == "mamba1":
                        go = GemvSpec(n=d, k=e, batch=batch, wdtype=wdtype, bias=s.use_bias, epilogue="residual")
                        args = [y, *mat(p + "out_proj"), *opt(p + "out_proj_bias"), h]
                    else:
                        go = GemvSpec(n=d, k=e, batch=batch, wdtype=wdtype, norm="gated", groups=s.n_groups,
                                      norm_on_x=s.norm_before_gate, z_cols=NI, eps=s.norm_eps, bias=s.use_bias,
                                      epilogue="residual")
                        args = [y, proj, w(p + "gate_norm"), *mat(p + "out_proj"), *opt(p + "out_proj_bias"), h]
                    (h,) = kb.call_inplace(go, lambda: gemv_kernel(go, gpu), args, [len(args) - 1], [(batch, d)])
                else:
                    rn = RowNormSpec(d, act, eps=s.norm_eps)
                    hn = kb.call((rn, gpu), lambda: row_norm_kernel(rn, gpu), [h, w(p + "norm")], (rows, d), act)
                    mi = MatmulSpec(NI, d, wdtype, act, bias=s.use_bias)
                    proj = kb.call((mi, gpu), lambda: matmul_kernel(mi, gpu, kb.target),
                                   [hn, *mat(p + "in_proj"), *opt(p + "in_proj_bias")], (rows, NI))
                    cc = ConvChunkSpec(NI, conv_lo, conv_lo + C, KC, s.use_conv_bias)
                    args = [proj, w(p + "conv_weight"), *opt(p + "conv_bias"), conv_state]
                    proj, _ = kb.call_inplace((cc, gpu), lambda: conv_chunk_kernel(cc, gpu), args,
                                              [0, len(args) - 1], [(rows, NI), conv_state.ty.shape])
                    k = ScanSpec(s, act if s.arch == "mamba1" else "float32")  # Mamba-1's y goes to out_proj
                    if s.arch == "mamba1":
                        r = s.dt_rank
                        mx = MatmulSpec(r + 2 * n, e, wdtype, "float32", x_cols=NI)
                        dbc = kb.call((mx, gpu), lambda: matmul_kernel(mx, gpu, kb.target), [proj, *mat(p + "x_proj")],
                                      (rows, r + 2 * n))
                        if s.bcdt_rms_eps is not None:
                            (dbc,) = kb.call_inplace(("bcdt", gpu), lambda: bcdt_norm_kernel(s, gpu), [dbc], [0],
                                                     [(rows, r + 2 * n)])
                        md = MatmulSpec(e, r, "float32", "float32", x_cols=r + 2 * n, w_kn=True)
                        dt = kb.call((md, gpu), lambda: matmul_kernel(md, gpu, kb.target), [dbc, w(p + "dt_proj.T")],
                                     (rows, e))
                        args = [proj, dbc, dt, w(p + "dt_bias"), w(p + "A"), w(p + "D"), ssm_state]
                    else:
                        args = [proj, w(p + "dt_bias"), w(p + "A"), w(p + "D"), ssm_state]
                    _, y = kb.call_inplace((k, gpu), lambda: scan_kernel(k, gpu), args, [len(args) - 1, -1],
                                           [ssm_state.ty.shape, (rows, e)], [None, k.y_dtype])
                    if s.arch == "mamba1":
                        mo = MatmulSpec(d, e, wdtype, act, bias=s.use_bias, residual=True)
                    else:
                        gn = RowNormSpec(e, act, groups=s.n_groups, gated=True, norm_on_x=s.norm_before_gate,
                                         z_cols=NI, eps=s.norm_eps)
                        y = kb.call((gn, gpu), lambda: row_norm_kernel(gn, gpu), [y, proj, w(p + "gate_norm")],
                                    (rows, e), act)
                        mo = MatmulSpec(d, e, wdtype, act, bias=s.use_bias, residual=True)
                    h = kb.call((mo, gpu), lambda: matmul_kernel(mo, gpu, kb.target),
                                [y, *mat(p + "out_proj"), *opt(p + "out_proj_bias"), h], (rows, d))
            if not step:
                h = kb.call(("last_row", d, gpu), lambda: last_row_kernel(d, gpu), [h], (1, d))
            head = mat("lm_head") if "lm_head" in weights else mat("embedding")
            gl = GemvSpec(n=s.vocab_size, k=d, batch=srows, wdtype=wdtype, norm="rms", eps=s.norm_eps)
            args = [h, w("norm_f"), *head, logits]
            (out,) = kb.call_inplace(gl, lambda: gemv_kernel(gl, gpu), args, [len(args) - 1], [(srows, s.vocab_size)])
            out = bb.emit_output(out)
        bb.emit_func_output(out)


def relax_pipeline():
    """Lower the call sequence to VM code: no legalization or fusion (every kernel is scheduled TIR)."""
    t = relax.transform
    return tvm.transform.Sequential([
        t.ToNonDataflow(), t.RemovePurityChecking(), t.CallTIRRewrite(), t.StaticPlanBlockMemory(),
        t.LowerAllocTensor(), t.KillAfterLastUse(), t.LowerRuntimeBuiltin(), t.ComputePrimValue(),
        t.VMShapeLower(), t.AttachGlobalSymbol(),
    ])
