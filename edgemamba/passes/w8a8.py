"""W8A8: int8 weights (per output channel) and int8 activations with static scales from calibration.

Following Quamba (ICLR 2025), whose measurements show where Mamba's outliers sit:
- `RotateOutProj`: a block-diagonal Hadamard rotation of the `out_proj` input, folded into the
  weight (y·W = (y·H)(Hᵀ·W), H orthonormal and symmetric), spreads the gated output's outlier
  channels across each block before it is quantized;
- `Calibrate`: runs the (rotated) float prefill graph on calibration tokens and records every
  quantized MatMul's input range; the SSM input (x_proj's input) is clipped at a percentile, the
  others at their maximum;
- `QuantizeQDQ`: standard QuantizeLinear/DequantizeLinear around each MatMul (portable: ONNX
  Runtime fuses it to MatMulIntegerToFloat, TensorRT reads QDQ as int8).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgemamba.passes.base import GraphPass, initializer_array, weight_ref


def hadamard(k: int) -> np.ndarray:
    """Orthonormal, symmetric Sylvester Hadamard matrix of size k (a power of two)."""
    h = np.ones((1, 1))
    while h.shape[0] < k:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(k)).astype(np.float32)


def hadamard_block(d_inner: int, cap: int) -> int:
    k = 1
    while d_inner % (2 * k) == 0 and 2 * k <= cap:
        k *= 2
    return k


class RotateOutProj(GraphPass):
    def __init__(self, block_cap: int = 64):
        super().__init__()
        self.block_cap = block_cap

    def call(self, model):
        graph, modified = model.graph, False
        for node in list(graph):
            ref = weight_ref(node.inputs[1].name) if node.op_type == "MatMul" and len(node.inputs) > 1 else None
            if not ref or ref.kind != "out_proj":
                continue
            w = initializer_array(node.inputs[1])  # (d_inner, d_model)
            e = w.shape[0]
            k = hadamard_block(e, self.block_cap)
            h = self.add_initializer(graph, self.shared_tensor(f"hadamard.{k}", lambda: hadamard(k)))
            name = node.inputs[1].name
            # the rotated weight keeps the weight's name: later passes know it as layers.{i}.out_proj
            rotated = self.shared_tensor(name, lambda: np.einsum(
                "ij,gjd->gid", hadamard(k), w.reshape(e // k, k, -1)).reshape(e, -1))
            consts = [ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(np.array(s, np.int64)))])
                      for s in ([0, 0, e // k, k], [0, 0, e])]
            grouped = ir.Node("", "Reshape", [node.inputs[0], consts[0].outputs[0]])
            mixed = ir.Node("", "MatMul", [grouped.outputs[0], h])
            flat = ir.Node("", "Reshape", [mixed.outputs[0], consts[1].outputs[0]])
            graph.insert_before(node, [*consts, grouped, mixed, flat])
            node.replace_input_with(0, flat.outputs[0])
            graph.initializers.pop(name)  # the unrotated weight (its only use is this MatMul)
            node.replace_input_with(1, self.add_initializer(graph, rotated))
            modified = True
        if modified:
            self.drop_unused_initializers(graph)
        return ir.passes.PassResult(model, modified)


class Calibrate(GraphPass):
    """Record the input range of every weight MatMul/Gemm by running the prefill graph (not a
    rewrite: it fills `self.ranges`, keyed by weight name, for QuantizeQDQ)."""

    def __init__(self, calib_ids: np.ndarray, spec, percentile: float = 99.99, chunk: int = 256):
        super().__init__()
        self.ids, self.spec, self.percentile, self.chunk = calib_ids, spec, percentile, chunk
        self.ranges: dict[str, float] = {}

    def call(self, model):
        if self.ranges or model.graph.name.endswith("_step"):
            return ir.passes.PassResult(model, False)  # calibrate once, on the prefill graph
        import onnxruntime as ort

        probes = {}
        for node in model.graph:
            w = node.inputs[1] if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 else None
            if w is not None and w.is_initializer() and weight_ref(w.name):
                probes[w.name] = node.inputs[0]
        proto = ir.serde.serialize_model(model)
        for i, (name, value) in enumerate(probes.items()):
            out = proto.graph.output.add()
            out.name = value.name or f"probe_{i}"
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        state = {i.name: np.zeros([1 if d == "batch" else d for d in i.shape], np.float32)
                 for i in session.get_inputs() if i.name != "input_ids"}
        samples: dict[str, list[np.ndarray]] = {n: [] for n in probes}
        for start in range(0, self.ids.size, self.chunk):
            result = dict(zip(outputs, session.run(None, {"input_ids": self.ids[None, start:start + self.chunk], **state})))
            state = {k: result[k.replace("past_", "present_")] for k in state}
            for name, value in probes.items():
                samples[name].append(np.abs(result[value.name]).reshape(-1))
        for name, chunks in samples.items():
            a = np.concatenate(chunks)
            ssm_input = weight_ref(name).kind == "x_proj"
            self.ranges[name] = float(np.percentile(a, self.percentile) if ssm_input else a.max())
        return ir.passes.PassResult(model, False)


class QuantizeQDQ(GraphPass):
    def __init__(self, calibration: Calibrate, kinds: tuple[str, ...], skip_layers: tuple[int, ...] = ()):
        super().__init__()
        self.cal, self.kinds, self.skip = calibration, kinds, skip_layers

    def requires(self, model):
        if not self.cal.ranges:
            raise ir.passes.PreconditionError("QuantizeQDQ needs calibration ranges (run Calibrate first)")

    def _weight(self, graph, name, w_kn):
        """int8 weight (K, N) with one scale per output column."""
        def make():
            w = w_kn()
            scale = np.abs(w).max(axis=0) / 127.0
            scale[scale == 0] = 1.0
            return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)

        if name + ".int8" not in self._tensors:
            q, s = make()
            self._tensors[name + ".int8"] = ir.tensor(q, name=name + ".int8")
            self._tensors[name + ".wscale"] = ir.tensor(s, name=name + ".wscale")
            self._tensors[name + ".wzero"] = ir.tensor(np.zeros_like(q[0]), name=name + ".wzero")
        return [self.add_initializer(graph, self._tensors[name + s]) for s in (".int8", ".wscale", ".wzero")]

    def call(self, model):
        graph, modified = model.graph, False
        for node in list(graph):
            if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
                continue
            name = node.inputs[1].name
            w = initializer_array(node.inputs[1])
            ref = weight_ref(name) if w is not None else None
            kind = "lm_head" if ref and ref.kind in ("embedding", "lm_head") else (ref.kind if ref else None)
            if kind not in self.kinds or (ref.layer is not None and ref.layer in self.skip) or name not in self.cal.ranges:
                continue
            w_kn = (lambda w=w: w.T) if node.op_type == "Gemm" else (lambda w=w: w)
            wq, ws, wz = self._weight(graph, name, w_kn)
            xs = self.add_initializer(graph, self.shared_tensor(
                name + ".xscale", lambda: np.array(max(self.cal.ranges[name], 1e-8) / 127.0, np.float32)))
            xz = self.add_initializer(graph, self.shared_tensor("int8.zero", lambda: np.array(0, np.int8)))
            q = ir.Node("", "QuantizeLinear", [node.inputs[0], xs, xz])
            dq = ir.Node("", "DequantizeLinear", [q.outputs[0], xs, xz])
            dw = ir.Node("", "DequantizeLinear", [wq, ws, wz], attributes=[ir.AttrInt64("axis", 1)])
            mm = ir.Node("", "MatMul", [dq.outputs[0], dw.outputs[0]])
            self.replace(graph, node, [q, dq, dw, mm], mm.outputs[0])
            modified = True
        if modified:
            self.drop_unused_initializers(graph)
        return ir.passes.PassResult(model, modified)
