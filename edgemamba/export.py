"""Export a checkpoint to two ONNX graphs with explicit state: `step` and `prefill`.

Graph interface (names are stable; users bind them):

    inputs   input_ids                    int64   (batch, seq)       seq = 1 in `step`
             past_conv_state.{i}          float32 (batch, conv_dim, d_conv-1)
             past_ssm_state.{i}           float32 Mamba-1 (batch, d_inner, d_state)
                                                  Mamba-2 (batch, n_heads, head_dim, d_state)
    outputs  logits                       float32 (batch, vocab)     last position only
             present_conv_state.{i}       same shapes as the past_* inputs
             present_ssm_state.{i}

Standard ONNX operators only (opset 18). In `prefill`, every projection, the conv and the gating
run over the whole chunk at once; only the elementwise state recurrence runs as an ONNX `Scan`
over the chunk inside the graph (one graph call per chunk, never one per token). `step` calls the
same update function once, so the two graphs cannot drift apart.

For a target whose backend runs edgemamba's fused ops (`ops`, see edgemamba.passes.fuse), the conv
step and the SSM update are emitted as those ops instead (domain `edgemamba`); the rest is shared.

Both graphs reference one external weights file (`weights.bin`), written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass
from onnx_ir.tape import Tape

from edgemamba.checkpoint import Checkpoint
from edgemamba.passes import fuse
from edgemamba.spec import ModelSpec

from edgemamba.artifact import GRAPHS, WEIGHTS_FILE  # noqa: F401  (the artifact format names its files)

OPSET = 18
_ALIGN = 64  # bytes; keeps every tensor aligned for zero-copy mapping


def state_names(spec: ModelSpec, io: str) -> list[str]:
    """State tensor names in graph order: io is 'past' (inputs) or 'present' (outputs)."""
    return [f"{io}_{kind}_state.{i}" for i in range(spec.n_layer) for kind in ("conv", "ssm")]


def state_shapes(spec: ModelSpec, batch: int | str = "batch") -> dict[str, tuple]:
    out = {}
    for i in range(spec.n_layer):
        out[f"conv.{i}"] = (batch, *spec.conv_state_shape(1)[1:])
        out[f"ssm.{i}"] = (batch, *spec.ssm_state_shape(1)[1:])
    return out


# ---------------------------------------------------------------------------------------------
# weights in export layout
# ---------------------------------------------------------------------------------------------
def export_weights(ckpt: Checkpoint, ops: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Canonical weights rearranged for the graphs: linear weights transposed to (in, out),
    A = -exp(A_log) folded once, Mamba-2's per-head D and A shaped for broadcasting (or kept per
    head, the fused ops' layout, when `ops` fuses the SSM)."""
    s, w = ckpt.spec, ckpt.weights
    out = {"embedding": w["embedding"], "norm_f": w["norm_f"]}
    if not s.tie_embeddings:
        out["lm_head"] = w["lm_head"]
    for i in range(s.n_layer):
        p = f"layers.{i}."
        out[p + "norm"] = w[p + "norm"]
        out[p + "in_proj.T"] = w[p + "in_proj"].T
        out[p + "conv_weight"] = w[p + "conv_weight"]  # (conv_dim, d_conv)
        for opt in ("in_proj_bias", "conv_bias", "out_proj_bias"):
            if p + opt in w:
                out[p + opt] = w[p + opt]
        out[p + "dt_bias"] = w[p + "dt_bias"]
        out[p + "out_proj.T"] = w[p + "out_proj"].T
        A = -np.exp(w[p + "A_log"].astype(np.float64)).astype(np.float32)
        if s.arch == "mamba1":
            out[p + "x_proj.T"] = w[p + "x_proj"].T
            out[p + "dt_proj.T"] = w[p + "dt_proj"].T
            out[p + "A"] = A  # (d_inner, d_state)
            out[p + "D"] = w[p + "D"]  # (d_inner,)
        elif ops & fuse.SSM_OPS:  # the fused ops take them per head
            out[p + "A"], out[p + "D"] = A, w[p + "D"]  # (H,) each
            out[p + "gate_norm"] = w[p + "gate_norm"]
        else:
            hpg = s.n_heads // s.n_groups
            out[p + "A"] = A.reshape(s.n_groups, hpg, 1, 1)  # broadcasts over (b, G, H/G, P, N)
            out[p + "D"] = np.repeat(w[p + "D"], s.head_dim)  # per channel (d_inner,)
            out[p + "gate_norm"] = w[p + "gate_norm"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# graph building
# ---------------------------------------------------------------------------------------------
@dataclass
class _Ctx:
    tape: Tape
    spec: ModelSpec
    w: dict[str, ir.Value]
    ops: frozenset[str] = frozenset()  # fused ops the target's backend runs (edgemamba.passes.fuse)

    def op(self, op_type, *inputs, **attrs):
        return self.tape.op(op_type, list(inputs), attributes=attrs or None)

    def const(self, value, dtype=np.int64) -> ir.Value:
        t = ir.tensor(np.asarray(value, dtype=dtype))
        return self.tape.op("Constant", [], attributes={"value": t})


def _rms_norm(c: _Ctx, x, weight: ir.Value | None, eps: float):
    ms = c.op("ReduceMean", c.op("Mul", x, x), c.const([-1]), keepdims=1)
    y = c.op("Div", x, c.op("Sqrt", c.op("Add", ms, c.const(eps, np.float32))))
    return y if weight is None else c.op("Mul", y, weight)


def _silu(c: _Ctx, x):
    return c.op("Mul", x, c.op("Sigmoid", x))


def _linear(c: _Ctx, x, name: str):
    y = c.op("MatMul", x, c.w[name + ".T"])
    bias = c.w.get(name + "_bias")
    return y if bias is None else c.op("Add", y, bias)


def _causal_conv(c: _Ctx, x, past, p: str, step: bool):
    """x (b, t, C), past (b, C, K-1) -> silu(conv) (b, t, C), present (b, C, K-1)."""
    s = c.spec
    if step and fuse.CONV_STEP in c.ops:
        return fuse.conv_step(c, x, past, p)
    xin = c.op("Concat", past, c.op("Transpose", x, perm=[0, 2, 1]), axis=2)  # (b, C, K-1+t)
    present = c.op("Slice", xin, c.const([-(s.d_conv - 1)]), c.const([np.iinfo(np.int64).max]), c.const([2]))
    weight = c.w[p + "conv_weight"]  # (C, K)
    if step:  # one output position: a dot product of the window with the kernel
        y = c.op("ReduceSum", c.op("Mul", xin, weight), c.const([2]), keepdims=1)  # (b, C, 1)
        if p + "conv_bias" in c.w:
            y = c.op("Add", y, c.op("Unsqueeze", c.w[p + "conv_bias"], c.const([1])))
    else:
        kernel = c.op("Unsqueeze", weight, c.const([1]))  # (C, 1, K)
        inputs = [xin, kernel] + ([c.w[p + "conv_bias"]] if p + "conv_bias" in c.w else [])
        y = c.tape.op("Conv", inputs, attributes={"group": s.conv_dim, "kernel_shape": [s.d_conv]})
    return _silu(c, c.op("Transpose", y, perm=[0, 2, 1])), present


def ssm_update(c: _Ctx, A, dt, dtx, B, C, h):
    """One step of the selective state update, h' = exp(Δ·A)·h + (Δ·x)·B, y = h'·C.

    Shapes broadcast: Mamba-1 A (e, n), dt/dtx (b, e, 1), B (b, 1, n), C (b, n, 1), h (b, e, n);
    Mamba-2 A (G, H/G, 1, 1), dt (b, G, H/G, 1, 1), dtx (b, G, H/G, P, 1), B (b, G, 1, 1, N),
    C (b, G, 1, N, 1), h (b, G, H/G, P, N). Returns (h', y) with y (…, 1) in the last axis.
    """
    h_new = c.op("Add", c.op("Mul", c.op("Exp", c.op("Mul", dt, A)), h), c.op("Mul", dtx, B))
    return h_new, c.op("MatMul", h_new, C)


def _scan(c: _Ctx, A, dt, dtx, B, C, h0):
    """Run ssm_update over the seq axis (1) of dt/dtx/B/C with an ONNX Scan; y stacked on axis 1."""
    body = Tape()
    bc = _Ctx(body, c.spec, c.w)
    h_in = ir.val("h_in", ir.DataType.FLOAT)
    xs = [ir.val(n, ir.DataType.FLOAT) for n in ("dt_t", "dtx_t", "B_t", "C_t")]
    h_out, y = ssm_update(bc, A, *xs, h_in)  # A comes from the outer scope
    h_out.name, y.name = "h_out", "y_t"
    graph = ir.Graph([h_in, *xs], [h_out, y], nodes=body.nodes, name="ssm_scan_body")
    h_last, ys = c.tape.op_multi_out(
        "Scan", [h0, dt, dtx, B, C], attributes={"body": graph, "num_scan_inputs": 4,
                                                  "scan_input_axes": [1] * 4, "scan_output_axes": [1]},
        num_outputs=2,
    )
    return h_last, ys


def _mixer(c: _Ctx, i: int, hn, conv_past, ssm_past, step: bool):
    s, p = c.spec, f"layers.{i}."
    e, n = s.d_inner, s.d_state
    proj = _linear(c, hn, p + "in_proj")  # (b, t, in_proj_dim)
    if s.arch == "mamba1":
        x, z = c.tape.op_multi_out("Split", [proj, c.const([e, e])], attributes={"axis": 2}, num_outputs=2)
    else:
        z, x, dt_raw = c.tape.op_multi_out(
            "Split", [proj, c.const([e, s.conv_dim, s.n_heads])], attributes={"axis": 2}, num_outputs=3)
    x, conv_present = _causal_conv(c, x, conv_past, p, step)  # (b, t, conv_dim)

    if s.arch == "mamba1":
        r = s.dt_rank
        dt_in, B, C = c.tape.op_multi_out(
            "Split", [c.op("MatMul", x, c.w[p + "x_proj.T"]), c.const([r, n, n])],
            attributes={"axis": 2}, num_outputs=3)
        if s.bcdt_rms_eps is not None:  # Falcon-Mamba normalises Δ, B and C (no weights)
            dt_in, B, C = (_rms_norm(c, v, None, s.bcdt_rms_eps) for v in (dt_in, B, C))
        dt_raw = c.op("MatMul", dt_in, c.w[p + "dt_proj.T"])  # (b, t, e), before dt_bias
    else:
        g = s.n_groups
        x, B, C = c.tape.op_multi_out(
            "Split", [x, c.const([e, g * n, g * n])], attributes={"axis": 2}, num_outputs=3)  # x (b, t, e)
    if fuse.SSM_OPS & c.ops:  # the target's kernel: the update, D·x and Mamba-1's z gate in one node
        y, ssm_present = fuse.selective_ssm(c, p, x, dt_raw, B, C, z if s.arch == "mamba1" else None, ssm_past, step)
    else:
        y, ssm_present = _ssm(c, p, x, dt_raw, B, C, ssm_past, step)
        y = c.op("Add", y, c.op("Mul", x, c.w[p + "D"]))
        if s.arch == "mamba1":
            y = c.op("Mul", y, _silu(c, z))
    if s.arch == "mamba2":
        y = _gated_norm(c, y, z, c.w[p + "gate_norm"])
    return _linear(c, y, p + "out_proj"), conv_present, ssm_present


def _ssm(c: _Ctx, p: str, x, dt_raw, B, C, ssm_past, step: bool):
    """The selective state update in standard ops: x (b, t, e), dt_raw before dt_bias, B, C (b, t, G·N)
    -> y = h·C (b, t, e) without the D term, and the new state."""
    s = c.spec
    e, n = s.d_inner, s.d_state
    dt = _clip_dt(c, c.op("Softplus", c.op("Add", dt_raw, c.w[p + "dt_bias"])))  # (b, t, e | H)
    if s.arch == "mamba1":
        xs = [c.op("Unsqueeze", v, c.const([-1])) for v in (dt, c.op("Mul", dt, x))]  # (b, t, e, 1)
        B = c.op("Unsqueeze", B, c.const([2]))  # (b, t, 1, n)
        C = c.op("Unsqueeze", C, c.const([-1]))  # (b, t, n, 1)
        h0, y_shape, from_state = ssm_past, c.const([0, 0, e]), None
    else:
        g, hpg, hd = s.n_groups, s.n_heads // s.n_groups, s.head_dim
        dt6 = c.op("Reshape", dt, c.const([0, 0, g, hpg, 1, 1]))
        x6 = c.op("Reshape", x, c.const([0, 0, g, hpg, hd, 1]))
        xs = [dt6, c.op("Mul", dt6, x6)]
        B = c.op("Reshape", B, c.const([0, 0, g, 1, 1, n]))
        C = c.op("Reshape", C, c.const([0, 0, g, 1, n, 1]))
        from_state = c.const([0, s.n_heads, hd, n])
        h0, y_shape = c.op("Reshape", ssm_past, c.const([0, g, hpg, hd, n])), c.const([0, 0, e])

    A = c.w[p + "A"]
    if step:  # the same update, once, on the squeezed seq axis
        sq = c.const([1])
        h_last, y = ssm_update(c, A, *(c.op("Squeeze", v, sq) for v in (*xs, B, C)), h0)
        y = c.op("Unsqueeze", y, sq)
    else:
        h_last, y = _scan(c, A, *xs, B, C, h0)
    ssm_present = h_last if from_state is None else c.op("Reshape", h_last, from_state)
    return c.op("Reshape", y, y_shape), ssm_present  # (b, t, e)


def _clip_dt(c: _Ctx, dt):
    lo, hi = c.spec.dt_limit
    if lo == 0.0 and np.isinf(hi):
        return dt  # softplus is already ≥ 0: no clamp needed
    return c.op("Clip", dt, c.const(lo, np.float32), c.const(min(hi, 3.0e38), np.float32))


def _gated_norm(c: _Ctx, y, z, weight):
    s = c.spec
    if not s.norm_before_gate:
        y = c.op("Mul", y, _silu(c, z))
    grouped = c.op("Reshape", y, c.const([0, 0, s.n_groups, s.d_inner // s.n_groups]))
    y = c.op("Mul", c.op("Reshape", _rms_norm(c, grouped, None, s.norm_eps), c.const([0, 0, s.d_inner])), weight)
    return c.op("Mul", y, _silu(c, z)) if s.norm_before_gate else y


def build_graph(spec: ModelSpec, weights: dict[str, ir.TensorProtocol], kind: str,
                ops: frozenset[str] = frozenset()) -> ir.Model:
    """The `step` or `prefill` graph for this spec, with the given initializer tensors (laid out by
    `export_weights` for the same `ops`), emitting the fused ops in `ops` (edgemamba.passes.fuse)."""
    assert kind in GRAPHS
    step = kind == "step"
    tape = Tape()
    w = {name: tape.initializer(t, name=name) for name, t in weights.items()}
    c = _Ctx(tape, spec, w, ops)
    ids = ir.val("input_ids", ir.DataType.INT64, ["batch", 1 if step else "seq"])
    shapes = state_shapes(spec)
    past = {k: ir.val(f"past_{k.split('.')[0]}_state.{k.split('.')[1]}", ir.DataType.FLOAT, v) for k, v in shapes.items()}

    h = c.op("Gather", w["embedding"], ids)  # (b, t, d_model)
    presents = {}
    for i in range(spec.n_layer):
        hn = _rms_norm(c, h, w[f"layers.{i}.norm"], spec.norm_eps)
        out, presents[f"conv.{i}"], presents[f"ssm.{i}"] = _mixer(c, i, hn, past[f"conv.{i}"], past[f"ssm.{i}"], step)
        h = c.op("Add", h, out)
    if not step:  # only the last position's logits are needed
        h = c.op("Slice", h, c.const([-1]), c.const([np.iinfo(np.int64).max]), c.const([1]))
    h = c.op("Squeeze", _rms_norm(c, h, w["norm_f"], spec.norm_eps), c.const([1]))  # (b, d_model)
    head = w["embedding"] if spec.tie_embeddings else w["lm_head"]
    logits = c.tape.op("Gemm", [h, head], attributes={"transB": 1})  # (b, vocab); head kept (vocab, d)
    logits.name = "logits"
    logits.type, logits.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", spec.vocab_size])
    outputs = [logits]
    for k, v in presents.items():
        kind_, i = k.split(".")
        v.name = f"present_{kind_}_state.{i}"
        v.type, v.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(list(shapes[k]))
        outputs.append(v)
    inputs = [ids] + [past[k] for k in shapes]
    opsets = {"": OPSET, **({fuse.DOMAIN: fuse.DOMAIN_VERSION} if ops else {})}
    graph = ir.Graph(inputs, outputs, nodes=tape.nodes, initializers=tape.initializers,
                     opset_imports=opsets, name=f"edgemamba_{spec.arch}_{kind}")
    model = ir.Model(graph, ir_version=9, producer_name="edgemamba")
    NameFixPass()(model)  # unique value names across the main graph and the Scan bodies (SSA)
    return model


def build_graphs(ckpt: Checkpoint, ops: frozenset[str] = frozenset()) -> dict[str, ir.Model]:
    """Both graphs, with in-memory initializers shared by name (passes run on these). `ops`: the
    fused ops the target's backend runs (a pipeline's `ops`); none gives standard ONNX only."""
    fuse.check_ops(ops)
    tensors = {name: ir.tensor(arr, name=name) for name, arr in export_weights(ckpt, ops).items()}
    return {kind: build_graph(ckpt.spec, tensors, kind, ops) for kind in GRAPHS}


def save_graphs(models: dict[str, ir.Model], out_dir: Path) -> dict[str, Path]:
    """Write every initializer once into weights.bin (aligned), point both graphs at it, save them.

    Graphs that hold an initializer of the same name must hold the same bytes: passes transform
    both graphs alike, and this is checked rather than assumed.
    """
    unique: dict[str, ir.TensorProtocol] = {}
    for model in models.values():
        for name, value in model.graph.initializers.items():
            t = value.const_value
            if name in unique:
                if unique[name] is not t and unique[name].tobytes() != t.tobytes():
                    raise AssertionError(f"graphs disagree on initializer {name}")
            else:
                unique[name] = t
    index, offset = {}, 0
    with open(out_dir / WEIGHTS_FILE, "wb") as f:
        for name, t in unique.items():
            offset += f.write(b"\0" * (-offset % _ALIGN))
            data = t.tobytes()
            index[name] = (offset, len(data))
            offset += f.write(data)
    files = {"weights": out_dir / WEIGHTS_FILE}
    for kind, model in models.items():
        for name, value in model.graph.initializers.items():
            t = value.const_value
            off, length = index[name]
            value.const_value = ir.ExternalTensor(WEIGHTS_FILE, off, length, t.dtype, shape=t.shape, name=name,
                                                  base_dir=out_dir)
        path = out_dir / f"{kind}.onnx"
        ir.save(model, path)
        files[kind] = path
    return files


def export(ckpt: Checkpoint, out_dir: Path, pipeline=None) -> dict[str, Path]:
    """Write weights.bin, step.onnx and prefill.onnx into out_dir (which must exist), after running
    `pipeline` (a callable on the dict of graphs, see edgemamba.passes) if given."""
    models = build_graphs(ckpt)
    if pipeline is not None:
        pipeline(models)
    return save_graphs(models, out_dir)
