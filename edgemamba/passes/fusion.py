"""Fusions onto ONNX Runtime's own fused operators, where measurement says they are faster.

`FuseRMSNorm`: x / sqrt(mean(x·x) + eps) · w  ->  SimplifiedLayerNormalization(x, w) (ORT's RMSNorm
kernel, float32 accumulation), for the weighted norms (block norms and norm_f).
"""

from __future__ import annotations

import onnx_ir as ir

from edgemamba.passes.base import GraphPass, initializer_array


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _scalar(value: ir.Value) -> float | None:
    node = _producer(value, "Constant")
    if node is not None:
        t = node.attributes["value"].value.numpy()
        return float(t) if t.size == 1 else None
    arr = initializer_array(value)
    return float(arr) if arr is not None and arr.size == 1 else None


def match_rms_norm(div: ir.Node):
    """(x, eps, nodes) if `div` ends x / sqrt(mean(x·x, -1) + eps), else (None, reason)."""
    if div.op_type != "Div":
        return None, "not a Div"
    x, denom = div.inputs
    sqrt = _producer(denom, "Sqrt")
    add = _producer(sqrt.inputs[0], "Add") if sqrt else None
    mean = _producer(add.inputs[0], "ReduceMean") if add else None
    square = _producer(mean.inputs[0], "Mul") if mean else None
    if square is None:
        return None, "no Sqrt(Add(ReduceMean(Mul))) denominator"
    if square.inputs[0] is not x or square.inputs[1] is not x:
        return None, "the mean is not of x·x"
    axes = initializer_array(mean.inputs[1]) if len(mean.inputs) > 1 else None
    if axes is None and len(mean.inputs) > 1:
        axes_node = _producer(mean.inputs[1], "Constant")
        axes = axes_node.attributes["value"].value.numpy() if axes_node else None
    if axes is None or list(axes.reshape(-1)) != [-1]:
        return None, "not a mean over the last axis"
    eps = _scalar(add.inputs[1])
    if eps is None:
        return None, "epsilon is not a constant scalar"
    inner = [square, mean, add, sqrt, div]
    if any(len(n.outputs[0].uses()) != 1 for n in inner[:-1]):
        return None, "an intermediate is used elsewhere"
    return (x, eps, inner), None


class FuseRMSNorm(GraphPass):
    def call(self, model):
        graph, fused = model.graph, 0
        for node in list(graph):
            match, _ = match_rms_norm(node) if node.op_type == "Div" else (None, None)
            if match is None:
                continue
            x, eps, inner = match
            uses = list(node.outputs[0].uses())
            scale = uses[0].node if len(uses) == 1 else None
            weight = None
            if scale is not None and scale.op_type == "Mul":
                weight = scale.inputs[1 - uses[0].idx]
            if weight is None or initializer_array(weight) is None or initializer_array(weight).ndim != 1:
                continue  # weightless norms (Falcon's B/C/Δ, grouped gated norm) stay as they are
            norm = ir.Node("", "SimplifiedLayerNormalization", [x, weight], attributes=[
                ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", eps), ir.AttrInt64("stash_type", 1)])
            ir.convenience.replace_nodes_and_values(graph, scale, [*inner, scale], [norm],
                                                    [scale.outputs[0]], [norm.outputs[0]])
            fused += 1
        return ir.passes.PassResult(model, fused > 0)
