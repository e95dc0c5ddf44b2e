"""fp16 / bf16 weights with float32 islands.

The large weights (projections, LM head, embedding) become 16-bit; their MatMuls run in 16 bits
between Casts. Everything else stays float32: norms, the conv, softplus(Δ), exp(Δ·A), the state
update and the residual stream. The recurrent state stays float32 (the graph interface does not
change).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgemamba.passes.base import GraphPass, attr, initializer_array, weight_ref

DTYPES = {"fp16": (ir.DataType.FLOAT16, np.float16), "bf16": (ir.DataType.BFLOAT16, None)}


class Float16Weights(GraphPass):
    def __init__(self, precision: str = "fp16"):
        super().__init__()
        self.ir_dtype, np_dtype = DTYPES[precision]
        if np_dtype is None:
            import ml_dtypes

            np_dtype = ml_dtypes.bfloat16
        self.np_dtype = np_dtype

    def _half(self, graph, name, arr):
        return self.add_initializer(graph, self.shared_tensor(name + f".{self.ir_dtype.name.lower()}",
                                                              lambda: arr.astype(self.np_dtype)))

    def call(self, model):
        graph, modified = model.graph, False
        for node in list(graph):
            w = initializer_array(node.inputs[1]) if len(node.inputs) > 1 else None
            ref = weight_ref(node.inputs[1].name) if w is not None else None
            if ref is None:
                continue
            if node.op_type in ("MatMul", "Gemm") and (node.op_type == "MatMul" or attr(node, "transB", 0) == 1):
                half_w = self._half(graph, node.inputs[1].name, w)
                x16 = ir.Node("", "Cast", [node.inputs[0]], attributes=[ir.AttrInt64("to", self.ir_dtype)])
                mm = ir.Node("", node.op_type, [x16.outputs[0], half_w], attributes=list(node.attributes.values()))
                y32 = ir.Node("", "Cast", [mm.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)])
                self.replace(graph, node, [x16, mm, y32], y32.outputs[0])
                modified = True
        for node in list(graph):
            table = initializer_array(node.inputs[0]) if node.op_type == "Gather" else None
            if table is not None and node.inputs[0].name == "embedding":
                g = ir.Node("", "Gather", [self._half(graph, "embedding", table), node.inputs[1]])
                y32 = ir.Node("", "Cast", [g.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)])
                self.replace(graph, node, [g, y32], y32.outputs[0])
                modified = True
        if modified:
            self.drop_unused_initializers(graph)
        return ir.passes.PassResult(model, modified)

    def ensures(self, model):
        for name, v in model.graph.initializers.items():
            if weight_ref(name) and v.const_value.dtype == ir.DataType.FLOAT:
                raise ir.passes.PostconditionError(f"{name} is still float32")


class Float16State(GraphPass):
    """Keep the SSM state in float16 between tokens (half the state memory). The update itself
    still runs in float32: the state is cast up on entry and down on exit, so the only error is
    the rounding of the stored state, which `edgemamba verify` reports as state error."""

    def call(self, model):
        graph, modified = model.graph, False
        for inp in graph.inputs:
            if inp.name.startswith("past_ssm_state.") and inp.dtype == ir.DataType.FLOAT:
                uses = list(inp.uses())
                inp.type = ir.TensorType(ir.DataType.FLOAT16)
                up = ir.Node("", "Cast", [inp], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)])
                graph.insert_before(uses[0].node if uses else graph.node(0), up)
                for use in uses:
                    use.node.replace_input_with(use.idx, up.outputs[0])
                modified = True
        for i, out in enumerate(list(graph.outputs)):
            if out.name.startswith("present_ssm_state.") and out.dtype == ir.DataType.FLOAT:
                name, shape = out.name, out.shape
                out.name = name + ".f32"
                down = ir.Node("", "Cast", [out], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT16)])
                graph.append(down)
                down.outputs[0].name, down.outputs[0].shape = name, shape
                down.outputs[0].type = ir.TensorType(ir.DataType.FLOAT16)
                graph.outputs[i] = down.outputs[0]
                modified = True
        return ir.passes.PassResult(model, modified)
