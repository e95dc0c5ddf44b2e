"""The TensorRT target: engines with the fused-op plugins, built ahead of time, and the backend.

- Engines (need `tensorrt` or `tensorrt_rtx`; TensorRT-RTX builds on a machine without a GPU):
  hand-made Mamba-1/Mamba-2 layer graphs with the contract's custom ops (SelectiveStateUpdate,
  SelectiveScan, CausalConv1dStep), and whole models through `edgemamba compile --target tensorrt`,
  with optimization profiles for the batch (step) and the chunk length (prefill). A build fails if
  the parser leaves any node unmapped or an edgemamba node does not become a plugin layer.
- The backend (no TensorRT, no GPU): TrtBackend's binding, ping-pong, per-row prefill and state
  access run on the CPU over stand-in engines whose contexts execute the fused graph (onnx.reference
  with the ops' NumPy references) at the addresses the backend binds, against the model oracle.
Engines are built, never run here: running them needs TensorRT on a GPU it supports (TensorRT-RTX
refuses compute capability 9.0, the GPU machine's), and no machine here has one.
"""

from __future__ import annotations

import ctypes
import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cuda_kernels import gpu_test

from edgemamba.errors import EdgeMambaError

HAVE_TRT = any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="neither tensorrt nor tensorrt_rtx is installed "
                                                    "(pip install tensorrt-rtx==1.7.1.116)")

D_MODEL, D_CONV, MAX_BATCH, MAX_CHUNK = 16, 4, 8, 512
ARCHS = {  # sizes of a small layer
    "mamba1": dict(d_inner=32, d_state=8, dt_rank=2),
    "mamba2": dict(d_inner=32, d_state=8, n_heads=4, head_dim=8, n_groups=2),
}


class _Graph:
    """A tiny graph builder: named nodes, initializers, shape comments kept to the callers."""

    def __init__(self, act: np.dtype, seed: int = 0):
        self.act, self.nodes, self.inits, self.rng = np.dtype(act), [], [], np.random.default_rng(seed)

    def weight(self, name: str, shape, dtype=None) -> str:
        value = (self.rng.standard_normal(shape) / 4).astype(dtype or self.act)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def const(self, name: str, values) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def op(self, op_type: str, inputs, outputs, domain: str = "", **attrs):
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=f"{op_type}_{len(self.nodes)}",
                                           domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def model(self, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", inputs, outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("edgemamba", 1)])


def layer_graph(arch: str, kind: str, act) -> tuple[onnx.ModelProto, list[dict]]:
    """One Mamba layer's mixer with the fused ops, in the shapes the export uses, and its profiles.

    step:    hidden (batch, d_model)       -> CausalConv1dStep, SelectiveStateUpdate
    prefill: hidden (batch, seq, d_model)  -> standard depthwise Conv over the chunk, SelectiveScan"""
    s = ARCHS[arch]
    e, n = s["d_inner"], s["d_state"]
    g = _Graph(act)
    et = TensorProto.FLOAT16 if np.dtype(act) == np.float16 else TensorProto.FLOAT
    step = kind == "step"
    lead = ["batch"] if step else ["batch", "seq"]
    if arch == "mamba1":
        conv_dim, r = e, s["dt_rank"]
        proj = g.op("MatMul", ["hidden", g.weight("W_in", (D_MODEL, 2 * e))], ["xz"])
        x, z = g.op("Split", [proj, g.const("split_xz", [e, e])], ["x", "z"], axis=-1)
    else:
        H, P, G = s["n_heads"], s["head_dim"], s["n_groups"]
        conv_dim = e + 2 * G * n
        proj = g.op("MatMul", ["hidden", g.weight("W_in", (D_MODEL, e + conv_dim + H))], ["zxbcdt"])
        z, x, dt = g.op("Split", [proj, g.const("split_in", [e, conv_dim, H])], ["z", "xbc", "dt"], axis=-1)
    conv_w = g.weight("conv_w", (conv_dim, D_CONV))  # activations' dtype
    conv_b = g.weight("conv_b", (conv_dim,))
    if step:
        xc, _ = g.op("CausalConv1dStep", [x, "past_conv_state", conv_w, conv_b], ["xc", "present_conv_state"],
                     domain="edgemamba", activation="silu")
    else:  # the export's prefill conv: concat the past inputs, depthwise Conv, keep the last K-1 as state
        xt = g.op("Transpose", [x], ["xt"], perm=[0, 2, 1])  # (b, C, T)
        past = g.op("Cast", ["past_conv_state"], ["past_act"], to=et)  # the state is float32
        xin = g.op("Concat", [past, xt], ["xin"], axis=2)  # (b, C, K-1+T)
        last = g.op("Slice", [xin, g.const("s0", [-(D_CONV - 1)]), g.const("s1", [2**62]), g.const("s2", [2])],
                    ["last_inputs"])
        g.op("Cast", [last], ["present_conv_state"], to=TensorProto.FLOAT)
        kernel = g.op("Unsqueeze", [conv_w, g.const("ax1", [1])], ["conv_kernel"])  # (C, 1, K)
        yc = g.op("Conv", [xin, kernel, conv_b], ["yc"], group=conv_dim, kernel_shape=[D_CONV])
        yc = g.op("Transpose", [yc], ["yct"], perm=[0, 2, 1])
        xc = g.op("Mul", [yc, g.op("Sigmoid", [yc], ["yc_sig"])], ["xc"])  # silu
    A, D, dt_bias = (g.weight(name, shape, np.float32) for name, shape in
                     (("A", (e, n) if arch == "mamba1" else (s["n_heads"],)), ("D", (e if arch == "mamba1" else s["n_heads"],)),
                      ("dt_bias", (e if arch == "mamba1" else s["n_heads"],))))
    if arch == "mamba1":
        dbc = g.op("MatMul", [xc, g.weight("W_x", (e, r + 2 * n))], ["dbc"])
        dt_r, B, C = g.op("Split", [dbc, g.const("split_dbc", [r, n, n])], ["dt_r", "B", "C"], axis=-1)
        dt = g.op("MatMul", [dt_r, g.weight("W_dt", (r, e))], ["dt"])
        ssm_inputs = ["past_ssm_state", xc, dt, A, B, C, D, z, dt_bias]
        ssm_shape = [*lead[:1], e, n]
    else:
        x, B, C = g.op("Split", [xc, g.const("split_xbc", [e, G * n, G * n])], ["xs", "Bf", "Cf"], axis=-1)
        x = g.op("Reshape", [x, g.const("shape_x", [0, *([0] if not step else []), H, P])], ["x4"])
        B = g.op("Reshape", [B, g.const("shape_b", [0, *([0] if not step else []), G, n])], ["B"])
        C = g.op("Reshape", [C, g.const("shape_c", [0, *([0] if not step else []), G, n])], ["C"])
        ssm_inputs = ["past_ssm_state", x, dt, A, B, C, D, "", dt_bias]  # Mamba-2: no z, the gate is in the norm
        ssm_shape = [*lead[:1], H, P, n]
    op = "SelectiveStateUpdate" if step else "SelectiveScan"
    y, _ = g.op(op, ssm_inputs, ["y", "present_ssm_state"], domain="edgemamba", dt_softplus=1, dt_min=0.0,
                dt_max=float("inf"))
    if arch == "mamba2":
        y = g.op("Reshape", [y, g.const("shape_y", [0, *([0] if not step else []), e])], ["y2"])
        y = g.op("Mul", [y, g.op("Sigmoid", [z], ["z_sig"])], ["y_gated"])  # stands in for the gated RMSNorm
    g.op("MatMul", [y, g.weight("W_out", (e, D_MODEL))], ["out"])

    conv_shape, info = [*lead[:1], conv_dim, D_CONV - 1], helper.make_tensor_value_info
    model = g.model(
        [info("hidden", et, [*lead, D_MODEL]), info("past_conv_state", TensorProto.FLOAT, conv_shape),
         info("past_ssm_state", TensorProto.FLOAT, ssm_shape)],
        [info("out", et, [*lead, D_MODEL]), info("present_conv_state", TensorProto.FLOAT, conv_shape),
         info("present_ssm_state", TensorProto.FLOAT, ssm_shape)])
    onnx.checker.check_model(model)
    if step:  # one profile over the batch
        dims = lambda b: {"hidden": (b, D_MODEL), "past_conv_state": (b, *conv_shape[1:]),  # noqa: E731
                          "past_ssm_state": (b, *ssm_shape[1:])}
        profiles = [{k: (dims(1)[k], dims(4)[k], dims(MAX_BATCH)[k]) for k in dims(1)}]
    else:  # one sequence (the Session prefills row by row), chunk length 1 .. MAX_CHUNK
        fixed = {"past_conv_state": (1, *conv_shape[1:]), "past_ssm_state": (1, *ssm_shape[1:])}
        profiles = [{"hidden": ((1, 1, D_MODEL), (1, 64, D_MODEL), (1, MAX_CHUNK, D_MODEL)),
                     **{k: (v, v, v) for k, v in fixed.items()}}]
    return model, profiles


@needs_trt
@pytest.mark.parametrize("act", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["step", "prefill"])
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_builds_with_every_node_mapped(tmp_path, arch, kind, act):
    from edgemamba.runtimes.tensorrt import build_engine

    model, profiles = layer_graph(arch, kind, np.float16 if act == "fp16" else np.float32)
    onnx.save(model, tmp_path / "g.onnx")
    report = build_engine(tmp_path / "g.onnx", tmp_path / "g.engine", profiles)
    custom = {n.op_type for n in model.graph.node if n.domain == "edgemamba"}
    assert report["plugin_layers"] == len(custom) == (2 if kind == "step" else 1)
    assert (tmp_path / "g.engine").stat().st_size == report["engine_bytes"] > 0
    # The plugins got the nodes' attributes (json turns inf into Infinity and back).
    expected = [{"op": n.op_type, **{a.name: helper.get_attribute_value(a) for a in n.attribute}}
                for n in model.graph.node if n.domain == "edgemamba"]
    expected = [{k: v.decode() if isinstance(v, bytes) else v for k, v in e.items()} for e in expected]
    assert sorted(report["plugin_attrs"], key=str) == sorted(expected, key=str)


@needs_trt
def test_plugin_attributes_come_from_the_node(tmp_path):
    """Non-default attributes (a clamped Δ, no conv activation) reach the plugins."""
    from edgemamba.runtimes.tensorrt import build_engine

    model, profiles = layer_graph("mamba1", "step", np.float32)
    for node in model.graph.node:
        if node.domain == "edgemamba":
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("activation", "none")] if node.op_type == "CausalConv1dStep"
                                  else [helper.make_attribute("dt_softplus", 0), helper.make_attribute("dt_min", 0.25),
                                        helper.make_attribute("dt_max", 0.5)])
    onnx.save(model, tmp_path / "g.onnx")
    report = build_engine(tmp_path / "g.onnx", tmp_path / "g.engine", profiles)
    assert sorted(report["plugin_attrs"], key=str) == sorted(
        [{"op": "CausalConv1dStep", "activation": "none"},
         {"op": "SelectiveStateUpdate", "dt_softplus": 0, "dt_min": 0.25, "dt_max": 0.5}], key=str)


@needs_trt
def test_unmapped_custom_node_fails_the_build(tmp_path):
    """A node no plugin serves (here a misspelled op) must fail the build, naming it."""
    from edgemamba.runtimes.tensorrt import build_engine

    model, profiles = layer_graph("mamba1", "step", np.float32)
    next(n for n in model.graph.node if n.op_type == "SelectiveStateUpdate").op_type = "SelectiveStateUpdat"
    onnx.save(model, tmp_path / "g.onnx")
    with pytest.raises(EdgeMambaError, match="SelectiveStateUpdat"):
        build_engine(tmp_path / "g.onnx", tmp_path / "g.engine", profiles)


# ---------------------------------------------------------------------------------------------
# whole models: edgemamba compile --target tensorrt
# ---------------------------------------------------------------------------------------------
_TRT_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64}


class FakeEngine:
    """Stands in for an ICudaEngine: the I/O (in the build report's form) and profile TensorRT
    reports. Its execution contexts run `run(feeds) -> {output: array}` on the memory at the
    addresses bound to them, as an engine would."""

    def __init__(self, io: dict, profile: dict, run=None):
        self.io, self.profile, self.run = io, profile, run
        self.num_io_tensors = len(io)

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return SimpleNamespace(name="INPUT" if self.io[name]["input"] else "OUTPUT")

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=self.io[name]["dtype"])

    def get_tensor_shape(self, name):
        return tuple(self.io[name]["shape"])

    def get_tensor_profile_shape(self, name, profile_index):
        return self.profile[name]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        assert all(a <= d <= b for a, d, b in zip(lo, shape, hi)), (name, shape, "outside the profile")
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def _at(self, name, shape) -> np.ndarray:
        dtype = np.dtype(_TRT_DTYPES[self.engine.io[name]["dtype"]])
        memory = (ctypes.c_char * (int(np.prod(shape)) * dtype.itemsize)).from_address(self.addresses[name])
        return np.frombuffer(memory, dtype).reshape(shape)

    def execute_async_v3(self, stream):
        feeds = {n: self._at(n, self.shapes[n]).copy() for n, t in self.engine.io.items() if t["input"]}
        for name, value in self.engine.run(feeds).items():
            self._at(name, value.shape)[...] = value
        return True


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgemamba", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@needs_trt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize("kind", ["mamba", "mamba2-g2-tied"])
def test_compile_builds_step_and_prefill_engines_with_every_node_mapped(kind, precision, hf_dirs, tmp_path):
    from edgemamba.artifact import load_artifact
    from edgemamba.runtimes.tensorrt import check_io, engine_io, expected_io, import_tensorrt

    out = tmp_path / "m.em"
    r = _run_cli("compile", hf_dirs(kind)[1], "--target", "tensorrt", "--precision", precision, "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"for tensorrt/{precision}" in r.stdout and "step.engine" in r.stdout
    art = load_artifact(out)  # every listed file's SHA-256 checked, the engines included
    section, spec, n = art.manifest["tensorrt"], art.spec, art.spec.n_layer
    trt = import_tensorrt()
    assert (section["module"], section["version"]) == (trt.__name__, trt.__version__)
    for graph, fused in (("step", 2 * n), ("prefill", n)):
        engine = section["engines"][graph]
        assert (out / engine).stat().st_size == art.manifest["files"][engine]["bytes"] > 0
        model = onnx.load(str(art.file(graph)), load_external_data=False)
        custom = [node.op_type for node in model.graph.node if node.domain == "edgemamba"]
        assert section["plugin_layers"][graph] == len(custom) == fused  # every fused node is a plugin layer
        # the engine's I/O, as built, is what the backend binds (names, dtypes, shapes)
        built = engine_io(FakeEngine(section["io"][graph], {}))
        check_io(built, expected_io(spec, art.manifest["state"], graph), graph)
        if precision == "int8":
            assert sum(node.op_type == "DequantizeLinear" for node in model.graph.node) >= 2 * n + 1
    assert section["profiles"]["step"]["input_ids"] == [[1, 1], [1, 1], [8, 1]]
    assert section["profiles"]["prefill"]["input_ids"] == [[1, 1], [1, 256], [1, 512]]
    assert section["builder"]["strongly_typed"] and section["builder"]["version_compatible"] is False
    compatibility = "compute_capabilities" if trt.__name__ == "tensorrt_rtx" else "hardware_compatibility_level"
    assert compatibility in section["builder"]
    assert [p["name"] for p in section["plugins"]] == ["CausalConv1dStep", "SelectiveScan", "SelectiveStateUpdate"]
    assert "EDGEMAMBA_KERNEL_LIBRARY" in section["kernel_library"]["load"]


@needs_trt
def test_int8_engines_store_int8_weights(tmp_path):
    """Weight-only int8 must reach the engine as int8 (TensorRT keeps DequantizeLinear on weights
    rather than folding it into 16-bit constants): ~1 byte per parameter less than fp16. (Untied:
    TensorRT copies a quantized table per consumer, so a tied table read by the embedding Gather
    and the head Gemm costs 2 x 1 byte, as in fp16.)"""
    from test_cuda_kernels import random_checkpoint

    from edgemamba.artifact import compile_artifact
    from edgemamba.spec import ModelSpec

    spec = ModelSpec(arch="mamba1", d_model=256, n_layer=2, vocab_size=4096, d_inner=512, d_state=16, d_conv=4,
                     dt_rank=16, tie_embeddings=False)
    ckpt = random_checkpoint(spec)
    paths = {p: compile_artifact(ckpt, tmp_path / p, "tensorrt", p).path for p in ("fp16", "int8")}
    size = {p: {g: (path / f"{g}.engine").stat().st_size for g in ("step", "prefill")} for p, path in paths.items()}
    for graph in ("step", "prefill"):
        assert size["fp16"][graph] - size["int8"][graph] >= 0.8 * spec.n_params, size


def test_compile_without_tensorrt_refuses_in_one_line(tmp_path, monkeypatch):
    from test_cuda_kernels import REF_SPECS, random_checkpoint

    from edgemamba.artifact import compile_artifact
    from edgemamba.runtimes import tensorrt

    monkeypatch.setattr(tensorrt, "MODULES", ("no_such_tensorrt",))
    with pytest.raises(EdgeMambaError, match=r"pip install tensorrt-rtx") as e:
        compile_artifact(random_checkpoint(REF_SPECS["mamba1"]), tmp_path / "x.em", "tensorrt", "fp16")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.em").exists()


# ---------------------------------------------------------------------------------------------
# the backend, on the CPU: TrtBackend over stand-in engines that run the fused graphs
# ---------------------------------------------------------------------------------------------
def _graph_io(model: ir.Model) -> dict:
    """The I/O TensorRT builds from a graph, in the build report's form."""
    names = {ir.DataType.FLOAT: "FLOAT", ir.DataType.FLOAT16: "HALF", ir.DataType.INT64: "INT64"}
    return {v.name: {"input": is_input, "dtype": names[v.dtype], "shape": [d if isinstance(d, int) else -1
                                                                            for d in v.shape]}
            for values, is_input in ((model.graph.inputs, True), (model.graph.outputs, False)) for v in values}


def _fused_model(spec_name: str, tmp_path, max_chunk: int = 4):
    """(artifact, reference, fused graphs, engine profiles) of a small fp32 model, the artifact in
    memory (its manifest's state entries as compile_artifact writes them); the prefill profile takes
    chunks of at most `max_chunk` tokens, so the backend must split longer ones."""
    from test_cuda_kernels import REF_SPECS, random_checkpoint

    from edgemamba.artifact import Artifact
    from edgemamba.export import build_graphs, state_shapes
    from edgemamba.passes.fuse import KERNEL_OPS
    from edgemamba.reference import Reference
    from edgemamba.runtimes.tensorrt import engine_profiles

    spec = REF_SPECS[spec_name]
    ckpt = random_checkpoint(spec)
    state = []
    for key, shape in state_shapes(spec).items():
        kind, i = key.split(".")
        state.append({"name": f"{kind}_state.{i}", "input": f"past_{kind}_state.{i}",
                      "output": f"present_{kind}_state.{i}", "shape": list(shape), "dtype": "float32"})
    art = Artifact(tmp_path, {"target": "tensorrt", "precision": "fp32", "state": state, "files": {}}, spec)
    profiles = engine_profiles(spec)
    profiles["prefill"]["input_ids"] = ((1, 1), (1, max_chunk), (1, max_chunk))
    return art, Reference(ckpt), build_graphs(ckpt, KERNEL_OPS), profiles


def _cpu_backend(spec_name: str, tmp_path):
    """(artifact, reference, factory(artifact, batch, threads)): TrtBackend on the CPU over stand-in
    engines that execute the fused graphs in onnx.reference."""
    torch = pytest.importorskip("torch")
    from test_fuse import evaluator

    from edgemamba.runtimes.tensorrt import TrtBackend

    art, ref, graphs, profiles = _fused_model(spec_name, tmp_path)

    def engine(kind):
        sess, outputs = evaluator(graphs[kind]), [v.name for v in graphs[kind].graph.outputs]
        return FakeEngine(_graph_io(graphs[kind]), profiles[kind],
                          run=lambda feeds: dict(zip(outputs, sess.run(outputs, feeds))))

    engines = {kind: engine(kind) for kind in ("step", "prefill")}
    return art, ref, lambda a, batch, threads: TrtBackend.with_engines(a, batch, engines, torch, torch.device("cpu"))


@pytest.mark.parametrize("spec_name", ["mamba1", "mamba2-g2"])
def test_backend_binds_rows_and_swaps_state_like_the_reference(spec_name, tmp_path, monkeypatch):
    """Two sequences in one Session: each prefilled in chunks into its own row, then stepped
    together; logits and states against the oracle. Then state get/set/save/load and reset."""
    from edgemamba import runtimes
    from edgemamba.session import Session

    art, ref, factory = _cpu_backend(spec_name, tmp_path)
    monkeypatch.setattr(runtimes, "backend_for", lambda artifact, engine="auto": factory)
    session = Session(art, batch=2, prefill_chunk=6)  # the backend splits 6 into 4 + 2
    ids = np.random.default_rng(3).integers(0, art.spec.vocab_size, size=(2, 13))
    lengths = (9, 5)
    ref_states = []
    for row, length in enumerate(lengths):
        logits = session.prefill(ids[row, :length], seq=row)
        expected, st = ref.forward(ids[row : row + 1, :length])
        np.testing.assert_allclose(logits, expected[0, -1], rtol=0, atol=2e-5 * np.abs(expected).max())
        ref_states.append(st)
    for t in range(3):
        tokens = [ids[row, lengths[row] + t] for row in range(2)]
        logits = session.step(tokens).copy()
        for row in range(2):
            expected, ref_states[row] = ref.step(np.array([tokens[row]]), ref_states[row])
            np.testing.assert_allclose(logits[row], expected[0], rtol=0, atol=2e-5 * np.abs(expected).max())
    for row in range(2):
        got = session.get_state(row)
        for i in range(art.spec.n_layer):
            for name, want in ((f"conv_state.{i}", ref_states[row].conv[i][0]),
                               (f"ssm_state.{i}", ref_states[row].ssm[i][0])):
                np.testing.assert_allclose(got[name], want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()))
    # row 1's state saved and loaded into row 0: both rows then give the same logits
    session.save_state(tmp_path / "row1.state", seq=1)
    session.load_state(tmp_path / "row1.state", seq=0)
    same = session.step([7, 7])
    np.testing.assert_array_equal(same[0], same[1])
    session.reset(0)
    assert all(not np.any(v) for v in session.get_state(0).values())
    assert any(np.any(v) for v in session.get_state(1).values())


class _DeviceMemory:
    """Device memory at an address, for torch.as_tensor (the CUDA array interface, no copy)."""

    def __init__(self, address: int, shape, dtype):
        self.__cuda_array_interface__ = {"data": (address, False), "shape": tuple(shape), "typestr": np.dtype(dtype).str,
                                         "strides": None, "version": 3, "stream": None}


class ToyEngine(FakeEngine):
    """On the GPU, a toy model behind a real model's I/O (not Mamba): for a chunk of t ids,
    present = past / 2^t + Σ_j ids[j] / 2^(t-1-j) per state tensor, logits[b, v] = v + Σ_k mean(present_k[b]).
    Its contexts compute with torch on the device memory at the bound addresses, on the current
    stream, so a CUDA-graph capture records them as it would an engine's kernels."""

    def create_execution_context(self):
        return ToyContext(self)


class ToyContext(FakeContext):
    def execute_async_v3(self, stream):
        import torch

        def at(name, shape):
            dtype = _TRT_DTYPES[self.engine.io[name]["dtype"]]
            return torch.as_tensor(_DeviceMemory(self.addresses[name], shape, dtype), device="cuda")

        ids = at("input_ids", self.shapes["input_ids"])  # (b, t)
        b, t = ids.shape
        drive = (ids.float() * 0.5 ** torch.arange(t - 1, -1, -1, device="cuda")).sum(1)  # (b,)
        total = torch.zeros(b, device="cuda")
        for past, info in self.engine.io.items():
            if info["input"] and past != "input_ids":
                shape = self.shapes[past]
                present = at(past.replace("past_", "present_"), shape)
                present.copy_(at(past, shape) * 0.5 ** t + drive.view(b, *[1] * (len(shape) - 1)))
                total += present.reshape(b, -1).mean(1)
        vocab = self.engine.io["logits"]["shape"][1]
        at("logits", (b, vocab)).copy_(torch.arange(vocab, device="cuda") + total[:, None])
        return True


def _toy(state: dict, ids) -> np.ndarray:
    """The toy model on one row's state (name -> array, updated in place): Σ_k mean(present_k)."""
    ids = np.asarray(ids, np.float64)
    drive = float((ids * 0.5 ** np.arange(len(ids) - 1, -1, -1)).sum())
    total = 0.0
    for name in state:
        state[name] = state[name] * 0.5 ** len(ids) + drive
        total += state[name].mean()
    return total


@gpu_test
def test_backend_on_the_gpu_keeps_state_on_the_device_and_replays_cuda_graphs(tmp_path):
    """The CUDA side of TrtBackend without TensorRT (none runs on this GPU): device buffers, pinned
    host staging, its stream, the step captured per parity and replayed, per-row prefill, state
    views. The engines are ToyEngines (above), checked against the same toy model in NumPy."""
    import torch

    from edgemamba.runtimes.tensorrt import TrtBackend

    art, _, graphs, profiles = _fused_model("mamba2-g2", tmp_path)
    engines = {kind: ToyEngine(_graph_io(graphs[kind]), profiles[kind]) for kind in ("step", "prefill")}
    backend = TrtBackend.with_engines(art, 3, engines, torch, torch.device("cuda"))
    assert backend.cuda_graphs and all(t.is_cuda for bufs in backend._bufs for t in bufs.values())
    vocab = art.spec.vocab_size
    rows = [{k: np.zeros(v.shape[1:]) for k, v in backend.state.items()} for _ in range(3)]

    def expect(row, ids):
        return np.arange(vocab) + _toy(rows[row], ids)

    prompt = [5, 1, 4, 2, 3, 9]  # two chunks: 4 + 2
    np.testing.assert_allclose(backend.prefill(np.array(prompt), 1), expect(1, prompt), rtol=1e-5)
    rng = np.random.default_rng(0)
    for _ in range(5):  # replays of both parities' graphs
        ids = rng.integers(0, vocab, 3)
        got = backend.step(ids)
        for row in range(3):
            np.testing.assert_allclose(got[row], expect(row, [ids[row]]), rtol=1e-5)
    for name, view in backend.state.items():
        np.testing.assert_allclose(view[1], rows[1][name], rtol=1e-5)
        view[0] = view[1]  # row 1's state into row 0, through the host
        rows[0][name] = rows[1][name].copy()
    got = backend.step(np.array([3, 3, 3]))
    np.testing.assert_allclose(got[0], got[1], rtol=1e-6)
    backend.reset(slice(1, 2))
    assert not any(np.any(view[1]) for view in backend.state.values())


def test_backend_refuses_engines_that_do_not_fit(tmp_path):
    art, _, factory = _cpu_backend("mamba1", tmp_path)
    with pytest.raises(EdgeMambaError, match=r"batch 1\.\.8, not 9"):
        factory(art, 9, None)
    backend = factory(art, 1, None)
    io = dict(backend.engines["step"].io)
    profile = backend.engines["step"].profile
    broken = {"step": FakeEngine({k: v for k, v in io.items() if k != "present_ssm_state.1"}, profile),
              "prefill": backend.engines["prefill"]}
    from edgemamba.runtimes.tensorrt import TrtBackend

    with pytest.raises(EdgeMambaError, match=r"step engine.*missing \['present_ssm_state.1'\]"):
        TrtBackend.with_engines(art, 1, broken, backend.torch, backend.device)
    io["logits"] = {**io["logits"], "dtype": "HALF"}
    with pytest.raises(EdgeMambaError, match=r"'logits' is float16"):
        TrtBackend.with_engines(art, 1, {**broken, "step": FakeEngine(io, profile)}, backend.torch, backend.device)


class _RecordingKernels:
    """Stands in for the CUDA kernel library: records each launch's arguments."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


@needs_trt
@pytest.mark.parametrize("case", ["mamba1-step", "mamba2-scan-no-z", "conv-no-bias"])
def test_plugin_enqueue_passes_the_kernel_abi(case):
    """What enqueue hands the kernels, from TensorRT's tensor descriptions (runs on no GPU: the
    kernels are replaced by a recorder; running real engines needs TensorRT on a supported GPU)."""
    from types import SimpleNamespace

    from edgemamba.runtimes.tensorrt import import_tensorrt, plugin_classes

    trt = import_tensorrt()
    f32, f16 = trt.DataType.FLOAT, trt.DataType.HALF
    op, shapes, expected = {
        "mamba1-step": ("SelectiveStateUpdate",
                        [((2, 1536, 16), f32), ((2, 1536), f16), ((2, 1536), f16), ((1536, 16), f32), ((2, 16), f16),
                         ((2, 16), f16), ((1536,), f32), ((2, 1536), f16), ((1536,), f32)],
                        ("selective_state_update", (101, 201, 102, 103, 104, 105, 106, 107, 108, 109, 200),
                         dict(batch=2, n_heads=1536, head_dim=1, n_groups=1, d_state=16, a_per_state=True))),
        "mamba2-scan-no-z": ("SelectiveScan",
                             [((1, 24, 64, 128), f32), ((1, 37, 24, 64), f16), ((1, 37, 24), f16), ((24,), f16),
                              ((1, 37, 2, 128), f16), ((1, 37, 2, 128), f16), ((24,), f16), ((24,), f16)],
                             ("selective_scan", (101, 201, 102, 103, 104, 105, 106, 107, 0, 108, 200),
                              dict(seqlen=37, batch=1, n_heads=24, head_dim=64, n_groups=2, d_state=128,
                                   a_per_state=False))),
        "conv-no-bias": ("CausalConv1dStep", [((4, 1792), f16), ((4, 1792, 3), f32), ((1792, 4), f32)],
                         ("causal_conv1d_step", (101, 102, 201, 103, 0, 200),
                          dict(batch=4, channels=1792, width=4, silu=True))),
    }[case]
    creator = plugin_classes(trt)[op]()
    plugin = creator.create_plugin(op, trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD)
    recorder = _RecordingKernels()
    plugin.kernels = lambda: recorder
    descs = [SimpleNamespace(dims=dims, type=dtype) for dims, dtype in shapes]
    plugin.enqueue(descs, [], [101 + i for i in range(len(descs))], [200, 201], 0, 7)
    (name, args, kwargs), = recorder.calls
    assert (name, args) == expected[:2]
    assert {k: kwargs[k] for k in expected[2]} == expected[2]
    assert kwargs["stream"] == 7 and kwargs["act_dtype"] == np.float16
    if op != "CausalConv1dStep":
        assert kwargs["weight_dtype"] == (np.float32 if case == "mamba1-step" else np.float16)
        assert (kwargs["dt_softplus"], kwargs["dt_min"], kwargs["dt_max"]) == (True, 0.0, float("inf"))
