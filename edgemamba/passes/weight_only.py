"""Weight-only int8 as standard QDQ: a weight W becomes DequantizeLinear(W_int8, scale, axis) [-> Cast].

Symmetric, one scale per output channel: the columns of a MatMul's (in, out) weight (axis 1), the
rows of the (vocab, d) table that the LM head's Gemm(transB=1) and the embedding's Gather read
(axis 0; a tied table is quantized once for both). Activations are not quantized.

For TensorRT (explicit quantization in a strongly typed network) a DequantizeLinear on a constant
that feeds a MatMul/Gemm is weight-only quantization: the engine stores the int8 weights and the GEMM
runs in the activations' precision. After Float16Weights the weights are float16: the scales stay
float32 (DequantizeLinear of opset 18) and a Cast gives the GEMM its float16 weight, a pattern
TensorRT keeps as int8 in the engine (checked by engine size in tests/test_tensorrt_build.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgemamba.passes.base import GraphPass, attr, weight_ref

_HALF_SUFFIXES = (".float16", ".bfloat16")  # names Float16Weights gives its 16-bit copies


def _base(name: str) -> str:
    return next((name[: -len(s)] for s in _HALF_SUFFIXES if name.endswith(s)), name)


def quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """W (2-D) -> (q int8 of W's shape, scale float32 (W.shape[axis],)), W ≈ q · scale along `axis`."""
    w = np.asarray(w, np.float32)
    absmax = np.abs(w).max(axis=1 - axis)  # (channels,)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    shaped = scale[:, None] if axis == 0 else scale[None, :]
    return np.clip(np.rint(w / shaped), -127, 127).astype(np.int8), scale


def dequantize_per_channel(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    return q.astype(np.float32) * (scale[:, None] if axis == 0 else scale[None, :])


def _channel_axis(value: ir.Value) -> int | None:
    """The output-channel axis of a weight from how the graph reads it, or None if it is read
    another way (or two ways that disagree)."""
    axes = set()
    for use in value.uses():
        node, idx = use.node, use.idx
        if node.op_type == "MatMul" and idx == 1:
            axes.add(1)
        elif node.op_type == "Gemm" and idx == 1 and attr(node, "transB", 0) == 1:
            axes.add(0)
        elif node.op_type == "Gather" and idx == 0 and attr(node, "axis", 0) == 0:
            axes.add(0)
        else:
            return None
    return axes.pop() if len(axes) == 1 else None


class QuantizeWeightsInt8(GraphPass):
    """Every wanted weight (kinds of passes.quantize.QUANTIZABLE, the embedding table) as int8 + scales."""

    def __init__(self, kinds: tuple[str, ...], skip_layers: tuple[int, ...] = (), embedding: bool = True):
        super().__init__()
        self.kinds, self.skip_layers, self.embedding = set(kinds), set(skip_layers), embedding

    def _wants(self, value: ir.Value, kind: str, layer: int | None) -> bool:
        if layer is not None and layer in self.skip_layers:
            return False
        if kind == "embedding":  # a tied table is also the LM head
            read_as_head = any(u.node.op_type == "Gemm" for u in value.uses())
            return self.embedding and (not read_as_head or "lm_head" in self.kinds)
        return kind in self.kinds

    def call(self, model):
        graph, modified = model.graph, False
        for name, value in list(graph.initializers.items()):
            base = _base(name)
            ref = weight_ref(base)
            axis = _channel_axis(value) if ref is not None else None
            if axis is None or value.const_value is None or not self._wants(value, ref.kind, ref.layer):
                continue
            key = f"{base}.int8"
            if key not in self._tensors:  # made once, shared by both graphs
                q, scale = quantize_per_channel(value.const_value.numpy(), axis)
                self._tensors[key] = ir.tensor(q, name=key)
                self._tensors[key + ".scale"] = ir.tensor(scale, name=key + ".scale")
            q, scale = (self.add_initializer(graph, self._tensors[k]) for k in (key, key + ".scale"))
            nodes = [ir.Node("", "DequantizeLinear", [q, scale], attributes=[ir.AttrInt64("axis", axis)])]
            if value.const_value.dtype != ir.DataType.FLOAT:
                nodes.append(ir.Node("", "Cast", [nodes[0].outputs[0]],
                                     attributes=[ir.AttrInt64("to", value.const_value.dtype)]))
            weight = nodes[-1].outputs[0]
            uses = list(value.uses())
            graph.insert_before(graph.node(0), nodes)  # reads initializers only: first is always valid
            for use in uses:
                use.node.replace_input_with(use.idx, weight)
            modified = True
        if modified:
            self.drop_unused_initializers(graph)
        return ir.passes.PassResult(model, modified)

    def ensures(self, model):
        for name, value in model.graph.initializers.items():
            ref = weight_ref(_base(name))
            if (ref and ref.kind in self.kinds and ref.layer not in self.skip_layers
                    and any(u.node.op_type in ("MatMul", "Gemm") for u in value.uses())):
                raise ir.passes.PostconditionError(f"{name} is still read unquantized")
