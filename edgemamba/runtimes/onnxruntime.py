"""ONNX Runtime backend (CPU): the embedded default.

The backend owns the state of `batch` sequences as two sets of buffers allocated once. A batched
step binds one set as the past state and the other as the present, runs, and swaps: the state never
travels through new arrays per token. Weights are memory-mapped once from weights.bin and handed to
both graphs' sessions as shared initializers (`add_initializer`, prepacking off, which would copy
them per session), so step and prefill share one copy: peak RSS ≈ weights + workspace.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors

from edgemamba.artifact import GRAPHS, WEIGHTS_FILE, Artifact
from edgemamba.errors import EdgeMambaError
from edgemamba.runtimes import physical_cores


# ONNX Runtime's own exception types (none derives from a common base other than Exception), and
# UnicodeDecodeError: raised instead when ORT's message quotes invalid UTF-8 from a damaged graph.
_ORT_ERRORS = (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf,
               ort_errors.NoSuchFile, ort_errors.NotImplemented, ort_errors.RuntimeException, ort_errors.EPFail,
               UnicodeDecodeError)


_PACKED_OPS = {"MatMulNBits", "QuantizeLinear", "DynamicQuantizeLinear"}


def _load_graph(path: Path, interface: dict[str, tuple[int, tuple]]) -> onnx.ModelProto:
    """Parse a graph (weights not loaded) and check its inputs and outputs against the buffers we
    will bind, so a damaged or swapped graph is refused here, not by a failed bind or run later.
    `interface`: name -> (onnx element type, shape with None for symbolic dims)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise EdgeMambaError(f"{path}: not a readable ONNX graph ({str(e).splitlines()[0][:200]})") from None
    declared = {}
    for v in [*model.graph.input, *model.graph.output]:
        t = v.type.tensor_type
        declared[v.name] = (t.elem_type, tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim))
    for name, (elem, shape) in interface.items():
        got = declared.get(name)
        if got is None:
            raise EdgeMambaError(f"{path}: graph has no {name!r} (not an edgemamba graph for this model)")
        if got[0] != elem or len(got[1]) != len(shape) or any(g is not None and g != s for g, s in zip(got[1], shape)):
            raise EdgeMambaError(f"{path}: {name!r} is declared {got}, this model needs {(elem, shape)}")
    if len(declared) != len(interface):
        extra = sorted(set(declared) - set(interface))[:3]
        raise EdgeMambaError(f"{path}: unexpected graph inputs/outputs {extra}")
    return model


def _shared_weights(graph_path: Path, model: onnx.ModelProto, weights: np.ndarray,
                    cache: dict[str, ort.OrtValue]) -> dict[str, ort.OrtValue]:
    """OrtValues viewing weights.bin for every external initializer of a graph (no copies);
    `cache` makes graphs that share an initializer share one OrtValue."""
    out = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        # Only weights.bin, which the manifest checksums: never a path of the graph's choosing.
        if info.get("location") != WEIGHTS_FILE:
            raise EdgeMambaError(f"{graph_path}: initializer {init.name!r} points outside {WEIGHTS_FILE}")
        if init.name not in cache:
            try:
                offset, length = int(info["offset"]), int(info["length"])
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
            except (KeyError, ValueError, TypeError):
                raise EdgeMambaError(f"{graph_path}: initializer {init.name!r} has a malformed data location") from None
            dims = tuple(init.dims)
            if (offset < 0 or offset + length > weights.size or any(d < 0 for d in dims)
                    or length != dtype.itemsize * int(np.prod(dims, dtype=object))):
                raise EdgeMambaError(f"{graph_path}: initializer {init.name!r} does not fit {WEIGHTS_FILE}")
            arr = weights[offset : offset + length].view(dtype).reshape(dims)
            cache[init.name] = ort.OrtValue.ortvalue_from_numpy(arr)
        out[init.name] = cache[init.name]
    return out


class OrtBackend:
    engine = "ort"
    fallback_reason: str | None = None  # set when the native engine was asked first and declined

    def __init__(self, artifact: Artifact, batch: int, threads: int | None = None):
        self.spec = artifact.spec
        self.batch = batch
        # State dtypes come from the manifest (float32, or float16 SSM state when compiled so).
        self.state_dtypes = {e["name"]: np.dtype(e["dtype"]) for e in artifact.manifest["state"]}  # checked on load
        # Copy-on-write mapping: writable as ORT requires, never written, so the pages stay shared
        # with the page cache (and with other processes running the same artifact).
        files = artifact.manifest["files"]
        for name in (WEIGHTS_FILE, *(artifact.manifest["graphs"].get(k) for k in GRAPHS)):
            if name not in files:  # every file we read must be one the manifest checksums
                raise EdgeMambaError(f"{artifact.path}: the manifest lists no {name or 'graph for ' + ', '.join(GRAPHS)!r}")
        try:
            self._weights = np.memmap(artifact.path / WEIGHTS_FILE, dtype=np.uint8, mode="c")
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise EdgeMambaError(f"{artifact.path / WEIGHTS_FILE}: cannot map the weights ({e})") from None
        self._weight_values: dict[str, ort.OrtValue] = {}  # must outlive the sessions
        self.sessions = {}
        for kind in GRAPHS:
            graph = _load_graph(artifact.file(kind), self._interface(kind))
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads or physical_cores()
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Prepacking copies weights per session (step and prefill would hold two copies), but
            # the integer kernels (MatMulNBits, QDQ MatMulIntegerToFloat) are 15-25x slower without
            # it: share float weights unpacked, let ORT pack quantized ones.
            quantized = any(n.op_type in _PACKED_OPS for n in graph.graph.node)
            so.add_session_config_entry("session.disable_prepacking", "0" if quantized else "1")
            for name, value in _shared_weights(artifact.file(kind), graph, self._weights, self._weight_values).items():
                so.add_initializer(name, value)
            try:
                self.sessions[kind] = ort.InferenceSession(str(artifact.file(kind)), so,
                                                           providers=["CPUExecutionProvider"])
            except _ORT_ERRORS as e:
                raise EdgeMambaError(f"{artifact.file(kind)}: ONNX Runtime cannot load this graph ({_first_line(e)})") from None
            if quantized:
                # ORT now holds packed copies; the mapped originals are read only for the few weights
                # it did not pack (embedding rows), so let their pages go before the next session
                # packs its own: they fault back from the file on demand (a private mapping never
                # written, so nothing is lost). Keeps the peak at one packed copy plus the originals.
                self._weights._mmap.madvise(mmap.MADV_DONTNEED)
        self.state_keys = [f"{kind}_state.{i}" for i in range(self.spec.n_layer) for kind in ("conv", "ssm")]
        shapes = {f"conv_state.{i}": self.spec.conv_state_shape(batch) for i in range(self.spec.n_layer)}
        shapes.update({f"ssm_state.{i}": self.spec.ssm_state_shape(batch) for i in range(self.spec.n_layer)})
        # Two buffer sets, allocated once; `cur` holds the state, the other receives the next one.
        self._bufs = [{k: np.zeros(shapes[k], self.state_dtypes.get(k, np.float32)) for k in self.state_keys}
                      for _ in range(2)]
        self._ov = [{k: ort.OrtValue.ortvalue_from_numpy(b[k]) for k in self.state_keys} for b in self._bufs]
        self._logits = np.zeros((batch, self.spec.vocab_size), np.float32)
        self._logits_ov = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self._ids = np.zeros((batch, 1), np.int64)
        self._ids_ov = ort.OrtValue.ortvalue_from_numpy(self._ids)
        self._step_binding = [self._bind_step(cur) for cur in (0, 1)]
        self.cur = 0


    def _interface(self, kind: str) -> dict[str, tuple[int, tuple]]:
        """What the backend binds: name -> (onnx element type, shape); None marks a free dim."""
        f32, s = onnx.TensorProto.FLOAT, self.spec
        out = {"input_ids": (onnx.TensorProto.INT64, (None, 1 if kind == "step" else None)),
               "logits": (f32, (None, s.vocab_size))}
        def elem(name):
            return onnx.helper.np_dtype_to_tensor_dtype(self.state_dtypes.get(name, np.dtype(np.float32)))

        for i in range(s.n_layer):
            for io in ("past", "present"):
                out[f"{io}_conv_state.{i}"] = (elem(f"conv_state.{i}"), (None, *s.conv_state_shape(1)[1:]))
                out[f"{io}_ssm_state.{i}"] = (elem(f"ssm_state.{i}"), (None, *s.ssm_state_shape(1)[1:]))
        return out

    def _run(self, kind: str, io: ort.IOBinding) -> None:
        try:
            self.sessions[kind].run_with_iobinding(io)
        except _ORT_ERRORS as e:  # a graph that loaded but cannot run (the state is left untouched)
            raise EdgeMambaError(f"the {kind} graph failed in ONNX Runtime ({_first_line(e)})") from None

    # ---- state ----------------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, np.ndarray]:
        """The current state buffers (batch, ...), by name. Views, not copies."""
        return self._bufs[self.cur]

    def reset(self, rows: slice) -> None:
        for arr in self.state.values():
            arr[rows] = 0.0

    # ---- running --------------------------------------------------------------------------------
    def _bind_step(self, cur: int) -> ort.IOBinding:
        io = self.sessions["step"].io_binding()
        io.bind_ortvalue_input("input_ids", self._ids_ov)
        for k in self.state_keys:
            io.bind_ortvalue_input("past_" + k, self._ov[cur][k])
            io.bind_ortvalue_output("present_" + k, self._ov[1 - cur][k])
        io.bind_ortvalue_output("logits", self._logits_ov)
        return io

    def step(self, ids: np.ndarray) -> np.ndarray:
        """ids (batch,) -> logits (batch, vocab); every sequence advances one token. The returned
        array is the backend's logits buffer: valid until the next call."""
        self._ids[:, 0] = ids
        self._run("step", self._step_binding[self.cur])
        self.cur = 1 - self.cur
        return self._logits

    def prefill(self, ids: np.ndarray, row: int) -> np.ndarray:
        """Feed a chunk of tokens (t,) into one sequence's state; returns its last logits (vocab,)."""
        io = self.sessions["prefill"].io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64)[None])
        nxt = self._bufs[1 - self.cur]
        for k in self.state_keys:
            io.bind_ortvalue_input("past_" + k, ort.OrtValue.ortvalue_from_numpy(self.state[k][row : row + 1]))
            io.bind_ortvalue_output("present_" + k, ort.OrtValue.ortvalue_from_numpy(nxt[k][row : row + 1]))
        logits = np.empty((1, self.spec.vocab_size), np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self._run("prefill", io)
        for k in self.state_keys:  # one copy per chunk (not per token), for this row only
            self.state[k][row] = nxt[k][row]
        return logits[0]


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]
