"""Weight quantization onto ONNX Runtime's MatMulNBits (int8 / int4, block-wise, symmetric).

Layout (ORT's com.microsoft MatMulNBits): for a weight W (K in, N out), B is uint8
(N, n_blocks, block_size·bits/8) holding codes q + 2^(bits-1) (4-bit: two per byte, low nibble
first), scales float32 (N·n_blocks). The default zero point 2^(bits-1) makes it symmetric.
`accuracy_level=4` lets ORT compute in int8 with activations quantized per block (its fast path on
x86 and ARM); `accuracy_level=0` keeps activations in float32 (weight-only), slower for 8 bits.

The embedding is quantized in the same layout and gathered with standard ops (one row per token,
dequantized); a tied LM head and embedding share one packed table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgemamba.passes.base import GraphPass, attr, initializer_array, weight_ref

MS_DOMAIN = "com.microsoft"
QUANTIZABLE = ("in_proj", "x_proj", "dt_proj", "out_proj", "lm_head")


def pack_nbits(w: np.ndarray, bits: int, block_size: int, clip_search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """W (K, N) float -> (B uint8 (N, n_blocks, block_size·bits/8), scales float32 (N, n_blocks)).

    With clip_search, each block's scale is the absmax scale shrunk by the factor (from a small
    grid) that minimises the block's squared rounding error: clipping a rare outlier buys finer
    steps for every other weight. The plain absmax scale is one of the candidates, so the error
    never grows.
    """
    k, n = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_blocks * block_size, n), np.float32)
    padded[:k] = w
    blocks = padded.T.reshape(n, n_blocks, block_size)  # (N, n_blocks, block_size)
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(blocks).max(axis=-1)  # (N, n_blocks)
    absmax[absmax == 0] = 1.0

    def quantize(scales):
        return np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax)

    scales = absmax / qmax
    if clip_search:
        best_err = np.full(absmax.shape, np.inf, np.float32)
        best = scales
        for ratio in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7):
            cand = absmax * ratio / qmax
            err = np.square(quantize(cand) * cand[..., None] - blocks).sum(axis=-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, cand, best)
        scales = best
    q = quantize(scales).astype(np.int16) + 2 ** (bits - 1)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q.astype(np.uint8), scales.astype(np.float32)


def unpack_nbits(b: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of pack_nbits up to rounding: W (K, N) float32. (Used by tests and verify.)"""
    q = b.astype(np.int16)
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:-1], -1)
    w = (q - 2 ** (bits - 1)) * scales[..., None]  # (N, n_blocks, block_size)
    return w.reshape(w.shape[0], -1)[:, :k].T.astype(np.float32)


@dataclass
class QuantOptions:
    bits: int = 8
    block_size: int = 128
    accuracy_level: int = 4
    kinds: tuple[str, ...] = QUANTIZABLE  # which weights to quantize
    skip_layers: tuple[int, ...] = ()
    embedding: bool = True  # int8/int4 embedding table (shared with a tied LM head)
    head_bits: int | None = None  # LM head bits if different (None: same as `bits`)
    keep: tuple[str, ...] = field(default=())  # kinds kept in float32 (recipe: keep the LM head)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two ≥ 16, got {self.block_size}")

    def wants(self, kind: str, layer: int | None) -> bool:
        return kind in self.kinds and kind not in self.keep and (layer is None or layer not in self.skip_layers)

    def bits_for(self, kind: str) -> int:
        return self.head_bits if kind == "lm_head" and self.head_bits else self.bits


class QuantizeMatMulNBits(GraphPass):
    """MatMul(x, W) and the LM head Gemm(h, table, transB=1) -> MatMulNBits."""

    def __init__(self, options: QuantOptions):
        super().__init__()
        self.o = options

    def requires(self, model):
        if not any(n.op_type in ("MatMul", "Gemm") for n in model.graph):
            raise ir.passes.PreconditionError("no MatMul/Gemm to quantize")

    def packed(self, graph, name: str, w_kn, bits: int) -> tuple[ir.Value, ir.Value]:
        """Packed B and scales for weight `name` (made once, shared by both graphs)."""
        key = f"{name}.q{bits}b{self.o.block_size}"
        if key not in self._tensors:
            b, s = pack_nbits(w_kn(), bits, self.o.block_size)
            self._tensors[key] = ir.tensor(b, name=key)
            self._tensors[key + ".scales"] = ir.tensor(s.reshape(-1), name=key + ".scales")
        return self.add_initializer(graph, self._tensors[key]), self.add_initializer(graph, self._tensors[key + ".scales"])

    def call(self, model):
        graph, modified = model.graph, False
        for node in list(graph):
            w = initializer_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if w is None:
                continue
            name = node.inputs[1].name
            ref = weight_ref(name)
            if node.op_type == "Gemm" and attr(node, "transB", 0) == 1 and ref and ref.kind in ("embedding", "lm_head"):
                kind, k, n, w_kn = "lm_head", w.shape[1], w.shape[0], (lambda w=w: w.T)
            elif node.op_type == "MatMul" and ref and ref.layer is not None:
                kind, k, n, w_kn = ref.kind, w.shape[0], w.shape[1], (lambda w=w: w)
            else:
                continue
            if not self.o.wants(kind, ref.layer):
                continue
            bits = self.o.bits_for(kind)
            b, s = self.packed(graph, name, w_kn, bits)
            new = ir.Node(MS_DOMAIN, "MatMulNBits", [node.inputs[0], b, s], attributes=[
                ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
                ir.AttrInt64("block_size", self.o.block_size), ir.AttrInt64("accuracy_level", self.o.accuracy_level)])
            self.replace(graph, node, [new], new.outputs[0])
            modified = True
        if modified:
            graph.opset_imports[MS_DOMAIN] = 1
            model.opset_imports[MS_DOMAIN] = 1
            self.drop_unused_initializers(graph)
        return ir.passes.PassResult(model, modified)

    def ensures(self, model):
        for node in model.graph:
            if node.op_type == "MatMul" and initializer_array(node.inputs[1]) is not None:
                ref = weight_ref(node.inputs[1].name)
                if ref and self.o.wants(ref.kind, ref.layer):
                    raise ir.passes.PostconditionError(f"{node.inputs[1].name} was left unquantized")


class QuantizeEmbedding(GraphPass):
    """Gather(embedding, ids) -> gather packed rows and dequantize them with standard ops.

    Must run after QuantizeMatMulNBits when the head is tied: it reuses the head's packed table."""

    def __init__(self, options: QuantOptions, head_pass: QuantizeMatMulNBits):
        super().__init__()
        self.o, self.head = options, head_pass

    def call(self, model):
        graph, modified = model.graph, False
        for node in list(graph):
            if node.op_type != "Gather" or node.inputs[0] is None or node.inputs[0].name != "embedding":
                continue
            table = initializer_array(node.inputs[0])
            if table is None or not self.o.embedding:
                continue
            bits, bs = self.o.bits_for("lm_head"), self.o.block_size
            b, s = self.head.packed(graph, "embedding", lambda t=table: t.T, bits)  # same key as a tied head
            n_blocks = b.const_value.shape[1]
            out = self._dequant_rows(graph, node, b, s, bits, bs, n_blocks, table.shape[1])
            modified = True
            self.replace(graph, node, out[0], out[1])
        if modified:
            self.drop_unused_initializers(graph)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _dequant_rows(graph, node, b, scales, bits, bs, n_blocks, k):
        """Nodes computing (codes - zero) · scale for the gathered rows, reshaped to (b, t, K)."""
        ids = node.inputs[1]
        nodes: list[ir.Node] = []

        def op(op_type, inputs, **attrs):
            n = ir.Node("", op_type, inputs, attributes=[ir.convenience.convert_attribute(k_, v) for k_, v in attrs.items()])
            nodes.append(n)
            return n.outputs[0]

        def const(v, dtype):
            return op("Constant", [], value=ir.tensor(np.asarray(v, dtype)))

        codes = op("Gather", [b, ids])  # (b, t, n_blocks, bs·bits/8) uint8
        if bits == 4:
            lo = op("BitwiseAnd", [codes, const(0x0F, np.uint8)])
            hi = op("BitShift", [codes, const(4, np.uint8)], direction="RIGHT")
            pairs = op("Concat", [op("Unsqueeze", [lo, const([-1], np.int64)]),
                                  op("Unsqueeze", [hi, const([-1], np.int64)])], axis=-1)
            codes = op("Reshape", [pairs, const([0, 0, n_blocks, bs], np.int64)])
        centered = op("Sub", [op("Cast", [codes], to=ir.DataType.FLOAT), const(2 ** (bits - 1), np.float32)])
        # the head's flat scales viewed per row (a reshape at load, no second copy on disk)
        per_row = op("Reshape", [scales, const([-1, n_blocks, 1], np.int64)])  # (vocab, n_blocks, 1)
        rows = op("Mul", [centered, op("Gather", [per_row, ids])])  # scales (b, t, n_blocks, 1)
        rows = op("Reshape", [rows, const([0, 0, n_blocks * bs], np.int64)])
        if n_blocks * bs != k:
            rows = op("Slice", [rows, const([0], np.int64), const([k], np.int64), const([2], np.int64)])
        return nodes, rows
