"""The fused ops of edgemamba's kernels, for targets whose backend runs them (TensorRT's plugins).

The contract (shared with edgemamba/kernels/cuda and the TensorRT plugins): ONNX domain `edgemamba`,
version 1, all state float32, activations float32 or float16, weights float32 or the activations' dtype.

    CausalConv1dStep(x (b, C), conv_state (b, C, K-1), weight (C, K), bias (C) | absent)
        -> y (b, C), conv_state' (b, C, K-1)                                   attribute activation
    SelectiveStateUpdate(state, x, dt, A, B, C, D, z | "", dt_bias) -> y, state'   dt_softplus, dt_min, dt_max
        Mamba-1: state (b, d_inner, N); x, dt, z (b, d_inner); A (d_inner, N); B, C (b, N); D, dt_bias (d_inner)
        Mamba-2: state (b, H, P, N); x (b, H, P); dt (b, H); A, D, dt_bias (H); B, C (b, G, N); no z
    SelectiveScan: SelectiveStateUpdate over a chunk, x, dt, z, B, C with a seq axis after batch.

dt is the raw projection: the op adds dt_bias and applies softplus and the clamp itself.

Why the export emits these nodes (`build_graphs(ckpt, ops)`) instead of a rewrite pass matching the
standard graph: the standard form of one SSM update is ~25 nodes (and a Scan body in prefill) that
only our own exporter produces, so a pattern would have to mirror the exporter node for node and
would stop matching, silently, at its next edit; the contract's layouts (raw dt, Mamba-2's A and D
per head) come from the canonical weights, where the exporter has them. A target that declares none
of these ops gets the standard graph, unchanged ("a fused op a backend lacks is never fused").

`FusedOpsFloat16` is a pass: for fp16 targets it runs the fused ops on float16 activations.
"""

from __future__ import annotations

import onnx_ir as ir

from edgemamba.passes.base import GraphPass

DOMAIN = "edgemamba"
DOMAIN_VERSION = 1
CONV_STEP, SSM_STEP, SSM_SCAN = "CausalConv1dStep", "SelectiveStateUpdate", "SelectiveScan"
KERNEL_OPS = frozenset({CONV_STEP, SSM_STEP, SSM_SCAN})  # what edgemamba/kernels/cuda implements
SSM_OPS = frozenset({SSM_STEP, SSM_SCAN})
# Inputs of each op in order ("" where absent), and which of them are activations (not state, not weights).
INPUTS = {CONV_STEP: ("x", "conv_state", "weight", "bias"),
          SSM_STEP: ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")}
INPUTS[SSM_SCAN] = INPUTS[SSM_STEP]
ACTIVATIONS = frozenset({"x", "dt", "B", "C", "z"})


def check_ops(ops: frozenset[str]) -> None:
    """Step and scan share Mamba-2's per-head A and D: a target fuses both or neither."""
    if ops - KERNEL_OPS or len(ops & SSM_OPS) == 1:
        raise ValueError(f"fused ops must be a subset of {sorted(KERNEL_OPS)} with both or neither of "
                         f"{sorted(SSM_OPS)}, got {sorted(ops)}")


def conv_step(c, x, past, p: str):
    """The conv's decode step as one node. x (b, 1, C), past (b, C, K-1) -> silu(conv) (b, 1, C), present.

    `c` is the exporter's graph context (edgemamba.export._Ctx); `p` the layer's weight prefix."""
    one = c.const([1])
    bias = [c.w[p + "conv_bias"]] if p + "conv_bias" in c.w else []  # absent: left out of the node
    y, present = c.tape.op_multi_out(CONV_STEP, [c.op("Squeeze", x, one), past, c.w[p + "conv_weight"], *bias],
                                     attributes={"activation": "silu"}, num_outputs=2, domain=DOMAIN)
    return c.op("Unsqueeze", y, one), present


def selective_ssm(c, p: str, x, dt, B, C, z, state, step: bool):
    """The SSM update of one layer as one node: SelectiveStateUpdate (step) or SelectiveScan (prefill).

    In:  x (b, t, d_inner), dt (b, t, d_inner | H) before dt_bias and softplus, B, C (b, t, G·N),
         z (b, t, d_inner) or None (Mamba-2: its gate is in the norm, outside the op), state.
    Out: y (b, t, d_inner) with D·x (and Mamba-1's z gate) applied, and the new state."""
    s = c.spec
    lead = [0] if step else [0, 0]  # Reshape: keep batch (and seq); the step drops the seq axis of 1
    if s.arch == "mamba1":
        dims = {"x": [s.d_inner], "dt": [s.d_inner], "B": [s.d_state], "C": [s.d_state], "z": [s.d_inner]}
    else:
        dims = {"x": [s.n_heads, s.head_dim], "dt": [s.n_heads], "B": [s.n_groups, s.d_state],
                "C": [s.n_groups, s.d_state]}
    acts = {"x": x, "dt": dt, "B": B, "C": C, "z": z}
    if step or s.arch == "mamba2":
        acts = {k: v if v is None else c.op("Reshape", v, c.const(lead + dims[k])) for k, v in acts.items()}
    lo, hi = s.dt_limit
    inputs = [state, acts["x"], acts["dt"], c.w[p + "A"], acts["B"], acts["C"], c.w[p + "D"], acts["z"],
              c.w[p + "dt_bias"]]
    y, state_out = c.tape.op_multi_out(SSM_STEP if step else SSM_SCAN, inputs, num_outputs=2, domain=DOMAIN,
                                       attributes={"dt_softplus": 1, "dt_min": float(lo), "dt_max": float(hi)})
    if step or s.arch == "mamba2":
        y = c.op("Reshape", y, c.const([0, 1 if step else 0, s.d_inner]))  # (b, t, d_inner)
    return y, state_out


def fused_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph.all_nodes() if n.domain == DOMAIN]


def _is_cast(node: ir.Node | None, to: ir.DataType) -> bool:
    return node is not None and node.op_type == "Cast" and node.domain == "" and node.attributes["to"].value == to


class FusedOpsFloat16(GraphPass):
    """Run the fused ops on float16 activations (the kernels' half path): a Cast to float16 on each
    activation input, and the float16 y cast back to float32 for the float32 islands around (the
    gated norm, the residual). State stays float32; A, D, dt_bias and the conv weights stay float32
    (the contract allows either). A float16 y read through Cast(float32) then Cast(float16) (the
    next fused op, a float16 GEMM of Float16Weights) is read directly: the pair is lossless."""

    def call(self, model):
        graph, modified = model.graph, False
        for node in [n for n in graph if n.domain == DOMAIN]:
            for i, name in enumerate(INPUTS[node.op_type][: len(node.inputs)]):
                v = node.inputs[i]
                if name in ACTIVATIONS and v is not None and v.dtype != ir.DataType.FLOAT16:
                    cast = ir.Node("", "Cast", [v], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT16)])
                    cast.outputs[0].dtype = ir.DataType.FLOAT16
                    graph.insert_before(node, cast)
                    node.replace_input_with(i, cast.outputs[0])
                    modified = True
            y = node.outputs[0]
            if y.dtype != ir.DataType.FLOAT16:
                uses = list(y.uses())
                y.dtype = ir.DataType.FLOAT16
                up = ir.Node("", "Cast", [y], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)])
                up.outputs[0].dtype = ir.DataType.FLOAT
                graph.insert_after(node, up)
                for use in uses:
                    use.node.replace_input_with(use.idx, up.outputs[0])
                modified = True
        for node in list(graph):  # Cast(float16) of Cast(float32) of a float16 y: read y itself
            up = node.inputs[0].producer() if _is_cast(node, ir.DataType.FLOAT16) else None
            if _is_cast(up, ir.DataType.FLOAT) and up.inputs[0].dtype == ir.DataType.FLOAT16:
                ir.convenience.replace_all_uses_with(node.outputs[0], up.inputs[0])
                modified = True
        return ir.passes.PassResult(model, modified)

    def ensures(self, model):
        for node in fused_nodes(model):
            if node.inputs[1 if node.op_type != CONV_STEP else 0].dtype != ir.DataType.FLOAT16:
                raise ir.passes.PostconditionError(f"{node.name}: x is not float16")
