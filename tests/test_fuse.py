"""The fused graphs (edgemamba.passes.fuse): what the TensorRT target compiles, checked on any machine.

No runtime here executes the custom ops (ONNX Runtime has no kernels for them, and TensorRT engines
only run on a supported GPU), so the fused graphs run in ONNX's reference evaluator with the
contract's ops implemented by their NumPy references (edgemamba/kernels/reference.py), and their
logits and states are compared with the model oracle (edgemamba.reference). The same graphs, with
the plugins in place of these ops, are what tests/test_tensorrt_build.py builds into engines.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from test_cuda_kernels import random_checkpoint

from edgemamba.export import build_graphs
from edgemamba.kernels import reference as kref
from edgemamba.passes import fuse
from edgemamba.passes.base import count_ops
from edgemamba.passes.pipelines import build_pipeline
from edgemamba.passes.weight_only import dequantize_per_channel, quantize_per_channel
from edgemamba.reference import Reference, State
from edgemamba.spec import ModelSpec


# ---------------------------------------------------------------------------------------------
# the contract's ops for onnx.reference: float32 math, y in x's dtype, state float32
# ---------------------------------------------------------------------------------------------
def _f32(*arrays):
    return [None if a is None else np.asarray(a, np.float32) for a in arrays]


class _SSM(OpRun):
    op_domain = fuse.DOMAIN
    update = None  # the kernel reference

    def _run(self, state, x, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus=1, dt_min=0.0, dt_max=math.inf):
        y, state = type(self).update(*_f32(state, x, dt, A, B, C, D, z, dt_bias), dt_softplus=bool(dt_softplus),
                                     dt_min=dt_min, dt_max=dt_max)
        return y.astype(x.dtype), state.astype(np.float32)


class SelectiveStateUpdate(_SSM):
    update = staticmethod(kref.selective_state_update)


class SelectiveScan(_SSM):
    update = staticmethod(kref.selective_scan)


class CausalConv1dStep(OpRun):
    op_domain = fuse.DOMAIN

    def _run(self, x, conv_state, weight, bias=None, activation="silu"):
        y, conv_state = kref.causal_conv1d_step(*_f32(x, conv_state, weight, bias), activation=activation)
        return y.astype(x.dtype), conv_state


def evaluator(model: ir.Model) -> ReferenceEvaluator:
    proto = ir.serde.serialize_model(model)
    # onnx.reference implements DequantizeLinear from opset 19 only; 18 -> 19 changes nothing these
    # graphs use (Cast's saturate is for float8, Reshape's allowzero stays 0).
    next(o for o in proto.opset_import if o.domain == "").version = 19
    return ReferenceEvaluator(proto, new_ops=[SelectiveStateUpdate, SelectiveScan, CausalConv1dStep])


def run_graph(sess: ReferenceEvaluator, spec: ModelSpec, ids: np.ndarray, state: State):
    """ids (b, t) from `state` -> last logits (b, vocab) and the new State."""
    feeds = {"input_ids": ids.astype(np.int64)}
    for i in range(spec.n_layer):
        feeds[f"past_conv_state.{i}"], feeds[f"past_ssm_state.{i}"] = state.conv[i], state.ssm[i]
    names = ["logits"] + [f"present_{k}_state.{i}" for i in range(spec.n_layer) for k in ("conv", "ssm")]
    out = dict(zip(names, sess.run(names, feeds)))
    return out["logits"], State([out[f"present_conv_state.{i}"] for i in range(spec.n_layer)],
                                [out[f"present_ssm_state.{i}"] for i in range(spec.n_layer)])


SPECS = {  # every branch the export takes: biases, untied head, Falcon's B/C/Δ norms and Δ clamp, groups
    "mamba1-bias-untied": ModelSpec(arch="mamba1", d_model=32, n_layer=2, vocab_size=50, d_inner=64, d_state=8,
                                    d_conv=4, dt_rank=4, use_bias=True, use_conv_bias=False, tie_embeddings=False),
    "falcon-clamped": ModelSpec(arch="mamba1", d_model=32, n_layer=2, vocab_size=50, d_inner=64, d_state=8, d_conv=3,
                                dt_rank=4, bcdt_rms_eps=1e-5, dt_limit=(0.01, 0.05)),
    "mamba2-g2": ModelSpec(arch="mamba2", d_model=32, n_layer=2, vocab_size=50, d_inner=64, d_state=16, d_conv=4,
                           n_heads=8, head_dim=8, n_groups=2),
    "mamba2-g2-norm-before-gate": ModelSpec(arch="mamba2", d_model=32, n_layer=2, vocab_size=50, d_inner=64,
                                            d_state=16, d_conv=4, n_heads=8, head_dim=8, n_groups=2,
                                            norm_before_gate=True, dt_limit=(0.0, 0.2)),
}


def check_against_reference(graphs, ref: Reference, rel: float):
    """From a non-zero state: a prefill chunk (2 sequences, 7 tokens), then two steps. Logits within
    rel × their scale of the reference's, and every state tensor within rel × its scale."""
    spec = ref.spec
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, size=(2, 12))
    _, state = ref.forward(ids[:, :3])
    sessions = {kind: evaluator(m) for kind, m in graphs.items()}
    for kind, chunk in (("prefill", ids[:, 3:10]), ("step", ids[:, 10:11]), ("step", ids[:, 11:12])):
        expected, expected_state = ref.forward(chunk, state)
        logits, got_state = run_graph(sessions[kind], spec, chunk, state)
        scale = np.abs(expected[:, -1]).max()
        assert np.abs(logits - expected[:, -1]).max() <= rel * scale, kind
        for got, want in zip(got_state.conv + got_state.ssm, expected_state.conv + expected_state.ssm):
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.abs(got - want).max() <= rel * np.abs(want).max(), kind
        state = expected_state  # each call starts from the reference's state


@pytest.mark.parametrize("kind", SPECS)
def test_fused_graphs_give_the_reference_logits_and_states(kind):
    ckpt = random_checkpoint(SPECS[kind])
    check_against_reference(build_graphs(ckpt, fuse.KERNEL_OPS), Reference(ckpt), rel=2e-5)


@pytest.mark.parametrize("kind", ["mamba1-bias-untied", "mamba2-g2"])
def test_fused_graphs_hold_one_kernel_op_per_layer_and_the_same_interface(kind):
    spec = SPECS[kind]
    ckpt, n = random_checkpoint(spec), spec.n_layer
    fused, standard = build_graphs(ckpt, fuse.KERNEL_OPS), build_graphs(ckpt)
    step, prefill = fused["step"], fused["prefill"]
    assert count_ops(step, fuse.CONV_STEP, fuse.DOMAIN) == count_ops(step, fuse.SSM_STEP, fuse.DOMAIN) == n
    assert count_ops(prefill, fuse.SSM_SCAN, fuse.DOMAIN) == n
    assert count_ops(prefill, "Conv") == n  # the prefill conv stays a standard Conv (TensorRT runs it natively)
    assert len(fuse.fused_nodes(step)) == 2 * n and len(fuse.fused_nodes(prefill)) == n
    for model in fused.values():  # nothing of the standard update is left: no Scan, no softplus, no exp
        assert all(count_ops(model, op) == 0 for op in ("Scan", "Softplus", "Exp"))
        assert model.graph.opset_imports[fuse.DOMAIN] == fuse.DOMAIN_VERSION
    for kind_ in ("step", "prefill"):  # the runtime binds the same names, shapes and dtypes
        for a, b in zip([*fused[kind_].graph.inputs, *fused[kind_].graph.outputs],
                        [*standard[kind_].graph.inputs, *standard[kind_].graph.outputs], strict=True):
            assert (a.name, a.shape, a.dtype) == (b.name, b.shape, b.dtype)
        assert all(node.domain == "" for node in standard[kind_].graph.all_nodes())
    # the contract's layouts: Mamba-2's A, D and dt_bias per head; no z input (its gate is in the norm)
    node = next(n for n in step.graph if n.op_type == fuse.SSM_STEP)
    per_head = (spec.n_heads,) if spec.arch == "mamba2" else None
    for name in ("A", "D", "dt_bias"):
        shape = tuple(node.inputs[fuse.INPUTS[fuse.SSM_STEP].index(name)].shape)
        assert shape == per_head or spec.arch == "mamba1"
    assert (node.inputs[7] is None) == (spec.arch == "mamba2")


def _rounded(ckpt, round_matrix):
    """The checkpoint with its projection, head and embedding weights (out, in) through round_matrix."""
    import copy

    out = copy.copy(ckpt)
    out.weights = {k: round_matrix(w) if k.split(".")[-1] in ("in_proj", "x_proj", "dt_proj", "out_proj", "lm_head",
                                                               "embedding") else w for k, w in ckpt.weights.items()}
    return out


def _half(w):
    return w.astype(np.float16).astype(np.float32)


def _int8_of_half(w):  # per output channel (a row of (out, in)) from the float16 weight, back to float16
    return _half(dequantize_per_channel(*quantize_per_channel(_half(w), 0), 0))


@pytest.mark.parametrize("precision,round_matrix", [("fp16", _half), ("int8", _int8_of_half)])
@pytest.mark.parametrize("kind", ["falcon-clamped", "mamba2-g2"])
def test_tensorrt_precisions_are_the_rounded_model(kind, precision, round_matrix):
    """fp16: 16-bit weights and GEMMs, the fused ops on float16 activations, state float32; int8:
    the same with weight-only int8 per output channel. Against the reference run with the weights the
    graph holds, so what is left is float16 activation rounding (a layout or scale bug is ~100%)."""
    ckpt = random_checkpoint(SPECS[kind])
    graphs = build_graphs(ckpt, fuse.KERNEL_OPS)
    run, _ = build_pipeline("tensorrt", precision)
    run(graphs)
    for model in graphs.values():
        for node in fuse.fused_nodes(model):
            x = node.inputs[0 if node.op_type == fuse.CONV_STEP else 1]
            assert x.dtype == ir.DataType.FLOAT16 and node.outputs[0].dtype == ir.DataType.FLOAT16
    check_against_reference(graphs, Reference(_rounded(ckpt, round_matrix)), rel=5e-3)


def test_weight_only_int8_quantizes_every_projection_once_per_output_channel():
    spec = SPECS["mamba2-g2"]  # tied: the embedding table is also the LM head, quantized once for both
    ckpt = random_checkpoint(spec)
    graphs = build_graphs(ckpt, fuse.KERNEL_OPS)
    run, _ = build_pipeline("tensorrt", "int8")
    run(graphs)
    for model in graphs.values():
        dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
        assert len(dq) == 2 * spec.n_layer + 1  # in_proj, out_proj per layer; the shared table
        table = next(n for n in dq if n.inputs[0].name == "embedding.int8")
        assert table.attributes["axis"].value == 0 and table.inputs[1].shape == ir.Shape([spec.vocab_size])
        assert {u.node.op_type for u in table.outputs[0].uses()} == {"Cast"}
        readers = {u.node.op_type for c in table.outputs[0].uses() for u in c.node.outputs[0].uses()}
        assert readers == {"Gather", "Gemm"}
        in_proj = next(n for n in dq if n.inputs[0].name == "layers.0.in_proj.T.int8")
        assert in_proj.attributes["axis"].value == 1 and in_proj.inputs[1].shape == ir.Shape([spec.in_proj_dim])
        # symmetric per output channel: scale = absmax / 127 of the float16 weight's row (out, in)
        w16 = ckpt.weights["layers.0.in_proj"].astype(np.float16).astype(np.float32)  # (out, in)
        q, scale = (v.const_value.numpy() for v in in_proj.inputs[:2])
        np.testing.assert_allclose(scale, np.abs(w16).max(axis=1) / 127, rtol=1e-6)
        assert np.abs(q.T * scale[:, None] - w16).max() <= 0.5001 * scale.max() and np.abs(q).max() == 127
        weights = [v for v in model.graph.initializers.values() if v.const_value.size >= spec.d_model * spec.d_inner]
        assert weights and all(v.const_value.dtype == ir.DataType.INT8 for v in weights)


def test_a_target_fuses_step_and_scan_together():
    with pytest.raises(ValueError, match="both or neither"):
        build_graphs(random_checkpoint(SPECS["mamba2-g2"]), frozenset({fuse.SSM_STEP}))
