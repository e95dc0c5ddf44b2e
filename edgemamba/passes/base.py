"""Pass infrastructure: onnx-ir in-place passes with pre/postconditions, and weight naming.

A pass is an `onnx_ir.passes.InPlacePass`: `call(model) -> PassResult(model, modified)`, with
`requires` / `ensures` as code. The same pass instance runs on the `step` and the `prefill`
graph, and caches the tensors it makes by weight name, so both graphs share the same bytes
(`export.save_graphs` writes each initializer once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

_LAYER_WEIGHT = re.compile(r"^layers\.(\d+)\.(\w+)\.T$")


@dataclass(frozen=True)
class WeightRef:
    """Which model weight an initializer is: kind in_proj/x_proj/dt_proj/out_proj/lm_head/embedding."""

    kind: str
    layer: int | None = None


def weight_ref(name: str) -> WeightRef | None:
    m = _LAYER_WEIGHT.match(name)
    if m:
        return WeightRef(m.group(2), int(m.group(1)))
    if name in ("embedding", "lm_head"):
        return WeightRef(name)
    return None


def initializer_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind a value if it is a graph initializer, else None."""
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


class GraphPass(ir.passes.InPlacePass):
    """Base for edgemamba passes: shared tensor cache and helpers to add initializers."""

    def __init__(self):
        super().__init__()
        self._tensors: dict[str, ir.TensorProtocol] = {}

    def shared_tensor(self, name: str, make) -> ir.TensorProtocol:
        """The tensor `name`, made once per pass instance (so both graphs share it)."""
        if name not in self._tensors:
            self._tensors[name] = ir.tensor(make(), name=name)
        return self._tensors[name]

    @staticmethod
    def add_initializer(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
        if tensor.name in graph.initializers:
            return graph.initializers[tensor.name]
        value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        graph.register_initializer(value)
        return value

    @staticmethod
    def drop_unused_initializers(graph: ir.Graph) -> None:
        for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
            graph.initializers.pop(name)

    @staticmethod
    def replace(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], new_output: ir.Value) -> None:
        """Put new_nodes where `old` was; new_output takes over old's single output (and its name)."""
        ir.convenience.replace_nodes_and_values(graph, old, [old], new_nodes, [old.outputs[0]], [new_output])


def count_ops(model: ir.Model, op_type: str, domain: str = "") -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type == op_type and n.domain == domain)
