"""TensorRT: the fused ops as TensorRT plugins, and engines built from ONNX with them.

Works against whichever TensorRT Python module is installed: `tensorrt` (Jetson's JetPack,
datacenter GPUs) first, else `tensorrt_rtx` (TensorRT for RTX, installable from PyPI; it builds
engines on a machine with no GPU). Only the API subset both share is used.

The plugins are IPluginV3 classes written in Python (IPluginV3OneCore/Build/Runtime, created by
IPluginCreatorV3One) whose names, versions and fields are the fused-op contract (domain
`edgemamba`: SelectiveStateUpdate, SelectiveScan, CausalConv1dStep), so the ONNX parser maps
those nodes to them; `enqueue` launches the CUDA kernels of edgemamba/kernels/cuda. An engine that
holds them deserializes only in a process that has registered them (`register_plugins()`), that
is, engines run from Python, as edgemamba's Session does. Engines free of Python would need
ahead-of-time plugins (`tensorrt.plugin.aot_impl`, TensorRT >= 10.12): tensorrt_rtx 1.7 lacks
them (no IPluginV3QuickAOTBuild in its bindings; its `tensorrt_rtx.plugin` does not import).

Engines are built in a child process (`build_engine`): a TensorRT failure cannot take the caller
down, and the child gets the library link TensorRT-RTX's ONNX parser needs (see `_child_env`).
`compile_engines` builds an artifact's step and prefill engines (`edgemamba compile --target
tensorrt`); `TrtBackend` runs them behind the Session interface, the state on the device.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemamba.errors import EdgeMambaError
from edgemamba.passes.fuse import DOMAIN

MODULES = ("tensorrt", "tensorrt_rtx")  # in order of preference
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""


def import_tensorrt():
    """The TensorRT module present: `tensorrt` first, else `tensorrt_rtx`."""
    errors = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            module.Builder  # noqa: B018  (PyPI's `tensorrt` stubs import, then lack everything)
            return module
        except (ImportError, AttributeError) as e:
            errors.append(f"{name}: {e}")
    raise EdgeMambaError("no TensorRT Python module is importable (" + "; ".join(errors) + "); "
                         "install TensorRT (JetPack on Jetson) or `pip install tensorrt-rtx`")


# ---------------------------------------------------------------------------------------------
# the fused ops, as data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedOp:
    """One op of the contract: its inputs in order (the optional one last or absent), its fields
    with their defaults, and which inputs give each output its shape and dtype."""

    name: str
    inputs: tuple[str, ...]
    optional: str  # the input that may be absent
    fields: tuple[tuple[str, object], ...]  # (name, default); int, float or str
    outputs: tuple[tuple[str, str, str | None], ...]  # (output, shape of input, dtype of input | None: float32)


_SSM_INPUTS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
WEIGHTS = ("A", "D", "dt_bias", "weight", "bias")  # float32, or the activations' dtype
_SSM_FIELDS = (("dt_softplus", 1), ("dt_min", 0.0), ("dt_max", math.inf))
_SSM_OUTPUTS = (("y", "x", "x"), ("state_out", "state", None))

OPS = {
    op.name: op
    for op in (
        FusedOp("SelectiveStateUpdate", _SSM_INPUTS, "z", _SSM_FIELDS, _SSM_OUTPUTS),
        FusedOp("SelectiveScan", _SSM_INPUTS, "z", _SSM_FIELDS, _SSM_OUTPUTS),
        FusedOp("CausalConv1dStep", ("x", "conv_state", "weight", "bias"), "bias", (("activation", "silu"),),
                (("y", "x", "x"), ("conv_state_out", "conv_state", None))),
    )
}


def input_names(op: FusedOp, n_inputs: int) -> tuple[str, ...]:
    """Which contract inputs a node with n_inputs holds. TensorRT's parser cannot pass an empty
    input to a plugin, so an absent optional input is dropped from the node (`drop_empty_inputs`)."""
    if n_inputs == len(op.inputs):
        return op.inputs
    if n_inputs == len(op.inputs) - 1:
        return tuple(n for n in op.inputs if n != op.optional)
    raise EdgeMambaError(f"{op.name} takes {len(op.inputs) - 1} or {len(op.inputs)} inputs, got {n_inputs}")


def drop_empty_inputs(model) -> int:
    """Remove empty-name inputs of edgemamba-domain nodes (onnx.ModelProto, in place); returns how many."""
    dropped = 0
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in OPS and "" in node.input:
            kept = [name for name in node.input if name]
            dropped += len(node.input) - len(kept)
            del node.input[:]
            node.input.extend(kept)
    return dropped


# ---------------------------------------------------------------------------------------------
# plugins
# ---------------------------------------------------------------------------------------------
def _field_value(field) -> object:
    data = np.asarray(field.data)
    if data.dtype.kind in "iu" and data.dtype.itemsize == 1:  # CHAR: bytes, NUL-terminated
        return bytes(data.astype(np.uint8)).split(b"\0")[0].decode()
    return data.reshape(-1)[0].item()


@functools.lru_cache(maxsize=None)
def plugin_classes(trt) -> dict[str, type]:
    """op name -> IPluginCreatorV3One subclass, for one TensorRT module."""
    dtypes = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16}
    field_types = {int: trt.PluginFieldType.INT32, float: trt.PluginFieldType.FLOAT32, str: trt.PluginFieldType.CHAR}

    def to_field(name: str, value) -> object:
        if isinstance(value, str):
            data = np.frombuffer(value.encode() + b"\0", dtype=np.int8)
        else:
            data = np.array([value], dtype=np.int32 if isinstance(value, int) else np.float32)
        return trt.PluginField(name, data, field_types[type(value)])

    class FusedOpPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, op: FusedOp, attrs: dict, kernels):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = op.name, PLUGIN_VERSION, PLUGIN_NAMESPACE
            self.num_outputs = len(op.outputs)
            self.op, self.attrs, self.kernels = op, attrs, kernels

        # ---- core / build ---------------------------------------------------------------------
        def get_capability_interface(self, capability):
            return self

        def clone(self):
            return FusedOpPlugin(self.op, dict(self.attrs), self.kernels)

        def _positions(self, n_inputs: int) -> dict[str, int]:
            return {name: i for i, name in enumerate(input_names(self.op, n_inputs))}

        def get_output_data_types(self, input_types):
            pos = self._positions(len(input_types))
            return [trt.DataType.FLOAT if src is None else input_types[pos[src]] for _, _, src in self.op.outputs]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            pos = self._positions(len(inputs))
            return [trt.DimsExprs(inputs[pos[src]]) for _, src, _ in self.op.outputs]

        def supports_format_combination(self, pos, in_out, num_inputs):
            """Linear layout; x float32 or float16, the other activations and y as x; states float32;
            weights float32 or as x, all alike. Only tensors before `pos` may be looked at."""
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR or desc.type not in dtypes:
                return False
            names = input_names(self.op, num_inputs)
            if pos >= num_inputs:
                state_like = self.op.outputs[pos - num_inputs][2] is None
                name = "state_out"
            else:
                name = names[pos]
                state_like = name in ("state", "conv_state")
            if state_like:
                return desc.type == trt.DataType.FLOAT
            x_pos = names.index("x")  # before every other activation and weight
            if pos == x_pos:
                return True
            x_type = in_out[x_pos].desc.type
            if name in WEIGHTS:
                first = min(names.index(w) for w in WEIGHTS if w in names)
                return desc.type in (trt.DataType.FLOAT, x_type) and (pos == first or desc.type == in_out[first].desc.type)
            return desc.type == x_type

        def configure_plugin(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        # ---- runtime ---------------------------------------------------------------------------
        def on_shape_change(self, inputs, outputs):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([to_field(k, v) for k, v in self.attrs.items()])

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            names = input_names(self.op, len(input_desc))
            dims = {n: tuple(d.dims) for n, d in zip(names, input_desc)}
            ptr = {n: int(p) for n, p in zip(names, inputs)}
            act = dtypes[input_desc[names.index("x")].type]
            lib = self.kernels()
            if self.op.name == "CausalConv1dStep":
                batch, channels = dims["x"]
                lib.causal_conv1d_step(ptr["x"], ptr["conv_state"], int(outputs[1]), ptr["weight"], ptr.get("bias", 0),
                                       int(outputs[0]), batch=batch, channels=channels, width=dims["weight"][1],
                                       silu=self.attrs["activation"] == "silu", act_dtype=act,
                                       weight_dtype=dtypes[input_desc[names.index("weight")].type], stream=stream)
                return
            state = dims["state"]
            mamba1 = len(state) == 3  # (b, d_inner, N); Mamba-2 (b, H, P, N)
            sizes = dict(batch=state[0], n_heads=state[1], head_dim=1 if mamba1 else state[2],
                         n_groups=1 if mamba1 else dims["B"][-2], d_state=state[-1], a_per_state=mamba1,
                         act_dtype=act, weight_dtype=dtypes[input_desc[names.index("A")].type],
                         dt_softplus=bool(self.attrs["dt_softplus"]), dt_min=float(self.attrs["dt_min"]),
                         dt_max=float(self.attrs["dt_max"]), stream=stream)
            args = (ptr["state"], int(outputs[1]), ptr["x"], ptr["dt"], ptr["A"], ptr["B"], ptr["C"], ptr["D"],
                    ptr.get("z", 0), ptr["dt_bias"], int(outputs[0]))
            if self.op.name == "SelectiveScan":
                lib.selective_scan(*args, seqlen=dims["x"][1], **sizes)
            else:
                lib.selective_state_update(*args, **sizes)

    def make_creator(op: FusedOp, kernels) -> type:
        class Creator(trt.IPluginCreatorV3One):
            def __init__(self):
                trt.IPluginCreatorV3One.__init__(self)
                self.name, self.plugin_version, self.plugin_namespace = op.name, PLUGIN_VERSION, PLUGIN_NAMESPACE
                # The parser hands over only the node attributes named here.
                self.field_names = trt.PluginFieldCollection([to_field(k, v) for k, v in op.fields])
                self.created = []  # TensorRT holds raw pointers: keep every plugin alive

            def create_plugin(self, name, fields, phase):
                attrs = dict(op.fields)
                for f in fields:
                    if f.name in attrs:
                        attrs[f.name] = type(attrs[f.name])(_field_value(f))
                plugin = FusedOpPlugin(op, attrs, kernels)
                self.created.append(plugin)
                return plugin

        return Creator

    kernels = _kernel_loader()
    return {name: make_creator(op, kernels) for name, op in OPS.items()}


def _kernel_loader():
    """A callable returning the KernelLibrary, loaded on first use (building an engine needs none).
    EDGEMAMBA_KERNEL_LIBRARY names a prebuilt library; otherwise it is built for this GPU."""

    @functools.lru_cache(maxsize=1)
    def load():
        from edgemamba.kernels.cuda import KernelLibrary, build_library

        path = os.environ.get("EDGEMAMBA_KERNEL_LIBRARY")
        if not path:
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgemamba" / "kernels"
            path = build_library(cache, arch="native")
        return KernelLibrary(Path(path))

    return load


@functools.lru_cache(maxsize=None)
def register_plugins(trt) -> dict[str, object]:
    """Register the fused-op plugin creators with TensorRT's (process-wide) registry, once per module.
    Returns op name -> creator; the cache keeps them alive, as TensorRT requires."""
    registry = trt.get_plugin_registry()
    creators = {}
    for name, creator_cls in plugin_classes(trt).items():
        creator = creator_cls()
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise EdgeMambaError(f"TensorRT refused to register the {name} plugin (another creator of that name?)")
        creators[name] = creator
    return creators


# ---------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[Profile], timeout: float = 900,
                 tf32: bool = True) -> dict:
    """Parse an ONNX graph (custom ops included) and build a serialized engine, in a child process.
    tf32=False keeps float32 GEMMs and convolutions in float32 (TensorRT's default allows TF32).

    Fails (EdgeMambaError) if the parser leaves any node unmapped, or if an edgemamba-domain node
    did not become a plugin layer. Returns the child's report: TensorRT module and version, layer
    counts, plugin layers, engine bytes, and the attributes the plugins were created with."""
    import_tensorrt()  # a clear error here rather than in the child
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        report = Path(tmp) / "report.json"
        request.write_text(json.dumps({"onnx": str(onnx_path), "engine": str(engine_path), "report": str(report),
                                       "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
                                       "tf32": tf32}))
        proc = subprocess.run([sys.executable, "-m", "edgemamba.runtimes.tensorrt", str(request)],
                              capture_output=True, text=True, timeout=timeout, env=_child_env(tmp))
        result = json.loads(report.read_text()) if report.exists() else None
    if proc.returncode != 0 or result is None or result.get("errors"):
        why = "; ".join(result["errors"]) if result and result.get("errors") else ""
        logged = [line for line in (proc.stdout + proc.stderr).splitlines() if "[E]" in line]  # TensorRT's errors
        why = "; ".join(filter(None, [why, *logged[-3:]])) or proc.stderr.strip()[-3000:]
        raise EdgeMambaError(f"TensorRT could not build an engine from {onnx_path}: {' '.join(why.split())}")
    return result


def _child_env(tmp: str) -> dict:
    """TensorRT-RTX's ONNX parser dlopens `libtensorrt_rtx.so` to import plugins, and the PyPI wheel
    ships only `libtensorrt_rtx.so.1` (the process aborts otherwise): put a link on the child's
    library path."""
    env = dict(os.environ)
    try:
        libs = importlib.import_module("tensorrt_rtx_libs")
    except ImportError:
        return env
    libs_dir = Path(libs.__file__).parent
    if not (libs_dir / "libtensorrt_rtx.so").exists() and (libs_dir / "libtensorrt_rtx.so.1").exists():
        (Path(tmp) / "libtensorrt_rtx.so").symlink_to(libs_dir / "libtensorrt_rtx.so.1")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (tmp, env.get("LD_LIBRARY_PATH")) if p)
    return env


def _build_in_this_process(request: dict) -> dict:
    import onnx

    trt = import_tensorrt()
    creators = register_plugins(trt)
    onnx_path = Path(request["onnx"])
    # Weights stay in their file: the parser reads them from beside `onnx_path` (no 2 GiB protobuf
    # limit, no second copy in this process).
    model = onnx.load(str(onnx_path), load_external_data=False)
    drop_empty_inputs(model)
    custom = Counter(n.op_type for n in model.graph.node if n.domain == DOMAIN)
    unknown = set(custom) - set(OPS)
    report = {"module": trt.__name__, "version": trt.__version__, "custom_nodes": dict(custom), "errors": []}
    if unknown:
        report["errors"].append(f"edgemamba-domain ops without a plugin: {sorted(unknown)}")
        return report

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        report["errors"] += [f"parser: {parser.get_error(i).desc()}" for i in range(parser.num_errors)]
        return report
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    report["layers"] = len(layers)
    # The engine's I/O as built: what the runtime will bind (name -> input?, dtype, shape; -1 dynamic).
    tensors = [(network.get_input(i), True) for i in range(network.num_inputs)]
    tensors += [(network.get_output(i), False) for i in range(network.num_outputs)]
    report["io"] = {t.name: {"input": is_input, "dtype": t.dtype.name, "shape": list(t.shape)}
                    for t, is_input in tensors}
    report["plugin_layers"] = sum(layer.type == trt.LayerType.PLUGIN_V3 for layer in layers)
    if report["plugin_layers"] != sum(custom.values()):
        report["errors"].append(f"{sum(custom.values())} edgemamba nodes but {report['plugin_layers']} plugin layers")
        return report

    config = builder.create_builder_config()
    if not request.get("tf32", True):
        config.clear_flag(trt.BuilderFlag.TF32)
    for spec in request["profiles"]:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    report["builder"] = _builder_settings(trt, config)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        report["errors"].append("build_serialized_network returned no engine (see TensorRT's log above)")
        return report
    Path(request["engine"]).write_bytes(bytes(engine))
    report["engine_bytes"] = engine.nbytes
    # The attributes each plugin was created with, as the parser handed them over (one per distinct set).
    seen = {(name, json.dumps(p.attrs, sort_keys=True)) for name, c in creators.items() for p in c.created}
    report["plugin_attrs"] = [{"op": name, **json.loads(attrs)} for name, attrs in sorted(seen)]
    return report


def _builder_settings(trt, config) -> dict:
    """What the builder config held (names, so the manifest reads the same for tensorrt and tensorrt_rtx).
    Engines are strongly typed: the precision is the graph's types, not a builder flag."""
    out = {"strongly_typed": True,
           "flags": sorted(name for name, flag in trt.BuilderFlag.__members__.items() if config.get_flag(flag)),
           "version_compatible": config.get_flag(trt.BuilderFlag.VERSION_COMPATIBLE)}
    if trt.__name__ == "tensorrt_rtx":  # built ahead of time for these GPUs ([]: the builder's default set)
        out["compute_capabilities"] = [config.get_compute_capability(i).name
                                       for i in range(config.num_compute_capabilities)]
    else:  # NONE: the engine runs on the GPU architecture it was built on
        out["hardware_compatibility_level"] = config.hardware_compatibility_level.name
    return out


# ---------------------------------------------------------------------------------------------
# compile: the engines of an artifact
# ---------------------------------------------------------------------------------------------
MAX_BATCH = 8  # step engine: batch 1..MAX_BATCH (optimised for 1: single-stream decode)
MAX_CHUNK = 512  # prefill engine: one sequence, chunk length 1..MAX_CHUNK (optimised for 256, the Session's chunk)
OPT_CHUNK = 256


def check() -> None:
    """Refuse before any work when no TensorRT is importable (one line: what to install)."""
    import_tensorrt()


def engine_profiles(spec) -> dict[str, Profile]:
    """The optimization profile of each engine: input -> (min, opt, max) shapes."""
    from edgemamba.export import state_shapes

    def states(batch: int) -> dict[str, tuple[int, ...]]:
        out = {}
        for key, shape in state_shapes(spec, batch).items():
            kind, i = key.split(".")
            out[f"past_{kind}_state.{i}"] = shape
        return out

    one, most = states(1), states(MAX_BATCH)
    step = {"input_ids": ((1, 1), (1, 1), (MAX_BATCH, 1)), **{k: (v, v, most[k]) for k, v in one.items()}}
    prefill = {"input_ids": ((1, 1), (1, OPT_CHUNK), (1, MAX_CHUNK)), **{k: (v, v, v) for k, v in one.items()}}
    return {"step": step, "prefill": prefill}


def compile_engines(out_dir: Path, spec, precision: str, graphs: dict[str, Path]) -> tuple[dict[str, Path], dict]:
    """Build step.engine and prefill.engine from the saved fused graphs in out_dir.

    Returns the new files and the manifest's `tensorrt` section: module and version, engine files,
    profiles, builder settings, I/O as built, plugins and the kernel library they need."""
    from edgemamba.export import GRAPHS
    from edgemamba.kernels.cuda import ABI_VERSION

    profiles = engine_profiles(spec)
    files, reports = {}, {}
    for kind in GRAPHS:
        files[f"{kind}_engine"] = out_dir / f"{kind}.engine"
        # fp32 means float32 arithmetic: no TF32 GEMMs (the fp16/int8 graphs carry their own types)
        reports[kind] = build_engine(graphs[kind], files[f"{kind}_engine"], [profiles[kind]], tf32=precision != "fp32")
    first = reports[GRAPHS[0]]
    section = {
        "module": first["module"], "version": first["version"],
        "engines": {kind: files[f"{kind}_engine"].name for kind in GRAPHS},
        "profiles": {kind: {name: [list(s) for s in shapes] for name, shapes in profiles[kind].items()}
                     for kind in GRAPHS},
        "max_batch": MAX_BATCH, "max_chunk": MAX_CHUNK,
        "builder": first["builder"],
        "layers": {kind: reports[kind]["layers"] for kind in GRAPHS},
        "plugin_layers": {kind: reports[kind]["plugin_layers"] for kind in GRAPHS},
        "io": {kind: reports[kind]["io"] for kind in GRAPHS},
        "plugins": [{"name": name, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE,
                     "api": "IPluginV3 (Python)"} for name in sorted(OPS)],
        "kernel_library": {
            "abi_version": ABI_VERSION, "source": "edgemamba/kernels/cuda/mamba_kernels.cu",
            "load": "EDGEMAMBA_KERNEL_LIBRARY names a prebuilt libedgemamba_kernels_<arch>.so; otherwise nvcc builds "
                    "it for this GPU at first load (cached in ~/.cache/edgemamba/kernels)",
            "host": "the plugins are Python: engines run in a Python process that imported edgemamba",
        },
    }
    return files, {"tensorrt": section}


# ---------------------------------------------------------------------------------------------
# runtime: the backend
# ---------------------------------------------------------------------------------------------
_NP_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}


@dataclass(frozen=True)
class TensorIO:
    """One I/O tensor of an engine: name, direction, numpy dtype, shape (-1: set per run)."""

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]


def engine_io(engine) -> dict[str, TensorIO]:
    """An engine's I/O tensors (ICudaEngine of tensorrt or tensorrt_rtx, by enum names)."""
    out = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name).name
        if dtype not in _NP_DTYPES:
            raise EdgeMambaError(f"engine tensor {name!r} has type {dtype}, which edgemamba does not bind")
        out[name] = TensorIO(name, engine.get_tensor_mode(name).name == "INPUT", np.dtype(_NP_DTYPES[dtype]),
                             tuple(engine.get_tensor_shape(name)))
    return out


def expected_io(spec, state: list[dict], kind: str) -> dict[str, TensorIO]:
    """What the backend binds for one engine: input_ids, logits and the manifest's state tensors."""
    io = {"input_ids": TensorIO("input_ids", True, np.dtype(np.int64), (-1, 1 if kind == "step" else -1)),
          "logits": TensorIO("logits", False, np.dtype(np.float32), (-1, spec.vocab_size))}
    for e in state:
        shape = (-1, *e["shape"][1:])
        io[e["input"]] = TensorIO(e["input"], True, np.dtype(e["dtype"]), shape)
        io[e["output"]] = TensorIO(e["output"], False, np.dtype(e["dtype"]), shape)
    return io


def check_io(got: dict[str, TensorIO], want: dict[str, TensorIO], where: str) -> None:
    """Refuse an engine whose I/O is not what this model's buffers are (a damaged or swapped engine)."""
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise EdgeMambaError(f"{where}: engine I/O does not match the model "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, w in want.items():
        g = got[name]
        if (g.is_input, g.dtype, g.shape) != (w.is_input, w.dtype, w.shape):  # -1 (set per run) must match too
            raise EdgeMambaError(f"{where}: engine tensor {name!r} is {g.dtype} {g.shape}, the model needs "
                                 f"{w.dtype} {w.shape}")


class _StateView:
    """One state tensor of the live buffer set, read and written through host copies on request
    (get/set/save state); per token the state never leaves the device."""

    def __init__(self, backend: TrtBackend, key: str):
        self._backend, self._key = backend, key

    @property
    def _tensor(self):
        return self._backend._bufs[self._backend.cur][self._key]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._tensor.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._backend.state_dtypes[self._key]

    def __getitem__(self, index) -> np.ndarray:
        with self._backend._on_stream():
            return self._tensor[index].cpu().numpy()

    def __setitem__(self, index, value) -> None:
        torch = self._backend.torch
        with self._backend._on_stream():
            host = torch.from_numpy(np.ascontiguousarray(value, dtype=self.dtype))
            self._tensor[index] = host.to(self._tensor.device)

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)


class TrtBackend:
    """TensorRT engines (step and prefill) with the state on the device.

    Device memory is torch's (`torch.cuda`): what JetPack (NVIDIA's torch wheels) and desktop CUDA
    users have at hand; cupy and cuda-python are not used. The state of `batch` sequences is two
    buffer sets allocated once; a step binds one as past and the other as present and swaps
    (ping-pong), so the state is never copied through the host per token. Each parity has its own
    step execution context, bound once, and, where TensorRT says the context is stream-capturable,
    its step is captured in a CUDA graph and replayed. Per token only the ids go up and the logits
    come back. `.state` reads and writes the live buffers through host copies, on request only.
    """

    def __init__(self, artifact, batch: int, threads: int | None = None):
        del threads  # the GPU does the work
        trt = import_tensorrt()
        section = artifact.manifest.get("tensorrt")
        if not isinstance(section, dict) or not isinstance(section.get("engines"), dict):
            raise EdgeMambaError(f"{artifact.path}: the manifest has no TensorRT engines")
        if (section.get("module"), section.get("version")) != (trt.__name__, trt.__version__):
            raise EdgeMambaError(f"{artifact.path}: engines built with {section.get('module')} "
                                 f"{section.get('version')}, this process has {trt.__name__} {trt.__version__}: "
                                 "recompile the artifact here (edgemamba compile CKPT --target tensorrt)")
        torch = _import_torch_cuda()
        register_plugins(trt)  # before deserializing: the engines hold the plugins by name
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)  # must outlive the engines
        engines = {}
        for kind in ("step", "prefill"):
            name = section["engines"].get(kind)
            if not isinstance(name, str) or name not in artifact.manifest["files"]:  # only checksummed files are read
                raise EdgeMambaError(f"{artifact.path}: the {kind} engine {name!r} is not among the listed files")
            engine = self._runtime.deserialize_cuda_engine((artifact.path / name).read_bytes())
            if engine is None:
                raise EdgeMambaError(f"{artifact.path / name}: TensorRT cannot load this engine on this GPU (see its "
                                     "log above); engines are specific to a TensorRT version and GPU: recompile here")
            engines[kind] = engine
        self._setup(artifact, batch, engines, torch, torch.device("cuda"))

    @classmethod
    def with_engines(cls, artifact, batch: int, engines: dict, torch, device) -> TrtBackend:
        """The backend over given engine objects (tests: stand-in engines on the CPU, no TensorRT)."""
        self = cls.__new__(cls)
        self._setup(artifact, batch, engines, torch, device)
        return self

    def _setup(self, artifact, batch: int, engines: dict, torch, device) -> None:
        spec, entries = artifact.spec, artifact.manifest["state"]
        self.spec, self.batch, self.torch, self.device = spec, batch, torch, device
        self.engines = engines
        for kind, engine in engines.items():
            check_io(engine_io(engine), expected_io(spec, entries, kind), f"{artifact.path} ({kind} engine)")
        self.max_batch = engines["step"].get_tensor_profile_shape("input_ids", 0)[2][0]
        self.max_chunk = engines["prefill"].get_tensor_profile_shape("input_ids", 0)[2][1]
        if not 1 <= batch <= self.max_batch:
            raise EdgeMambaError(f"this artifact's step engine runs batch 1..{self.max_batch}, not {batch}")
        self.state_keys = [e["name"] for e in entries]
        self.state_dtypes = {e["name"]: np.dtype(e["dtype"]) for e in entries}
        self._io_names = {e["name"]: (e["input"], e["output"]) for e in entries}
        cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream() if cuda else None
        self._stream_handle = self._stream.cuda_stream if cuda else 0

        def zeros(shape, dtype, pinned=False):
            return torch.zeros(shape, dtype=getattr(torch, np.dtype(dtype).name), device="cpu" if pinned else device,
                               pin_memory=pinned and cuda)

        # Two state sets, allocated once; `cur` holds the state, the other receives the next one.
        self._bufs = [{k: zeros((batch, *e["shape"][1:]), e["dtype"]) for k, e in zip(self.state_keys, entries)}
                      for _ in range(2)]
        self.cur = 0
        self._ids, self._ids_host = zeros((batch, 1), np.int64), zeros((batch, 1), np.int64, pinned=True)
        self._logits = zeros((batch, spec.vocab_size), np.float32)
        self._logits_host = zeros((batch, spec.vocab_size), np.float32, pinned=True)
        self._chunk_ids = zeros((1, self.max_chunk), np.int64)
        self._chunk_ids_host = zeros((1, self.max_chunk), np.int64, pinned=True)
        self._chunk_logits = zeros((1, spec.vocab_size), np.float32)
        self._chunk_logits_host = zeros((1, spec.vocab_size), np.float32, pinned=True)

        # step: one context per parity, shapes and addresses set once
        self._step = [engines["step"].create_execution_context() for _ in range(2)]
        for parity, ctx in enumerate(self._step):
            ctx.set_input_shape("input_ids", (batch, 1))
            self._bind(ctx, "input_ids", self._ids)
            self._bind(ctx, "logits", self._logits)
            for k, (past, present) in self._io_names.items():
                ctx.set_input_shape(past, tuple(self._bufs[parity][k].shape))
                self._bind(ctx, past, self._bufs[parity][k])
                self._bind(ctx, present, self._bufs[1 - parity][k])
        self._prefill = engines["prefill"].create_execution_context()
        for k, (past, _) in self._io_names.items():
            self._prefill.set_input_shape(past, (1, *self._bufs[0][k].shape[1:]))
        self._bind(self._prefill, "logits", self._chunk_logits)
        self._bind(self._prefill, "input_ids", self._chunk_ids)
        self._graphs = [self._capture(ctx) for ctx in self._step]

    # ---- plumbing ---------------------------------------------------------------------------------
    @staticmethod
    def _bind(ctx, name: str, tensor) -> None:
        if not ctx.set_tensor_address(name, tensor.data_ptr()):
            raise EdgeMambaError(f"TensorRT refused the buffer for {name!r}")

    @contextmanager
    def _on_stream(self):
        """Device work on the backend's stream (ordered with the engines' runs), finished on exit."""
        if self._stream is None:
            yield
            return
        with self.torch.cuda.stream(self._stream):
            yield
        self._stream.synchronize()

    def _execute(self, ctx) -> None:
        if not ctx.execute_async_v3(self._stream_handle):
            raise EdgeMambaError("TensorRT failed to run the engine (see its log above)")

    def _capture(self, ctx):
        """A CUDA graph of one step of this context, or None where TensorRT or the device cannot."""
        capturable = getattr(ctx, "is_stream_capturable", None)
        if self._stream is None or (capturable is not None and not capturable(self._stream_handle)):
            return None
        torch = self.torch
        try:
            with self._on_stream():
                self._execute(ctx)  # a first run outside capture: TensorRT and the plugins finish their setup
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self._execute(ctx)
        except (RuntimeError, EdgeMambaError) as e:
            import warnings

            warnings.warn(f"TensorRT step not captured in a CUDA graph ({str(e).splitlines()[0][:200]}); "
                          "running it uncaptured", stacklevel=3)
            graph = None
        finally:
            with self._on_stream():
                for bufs in self._bufs:  # the warm-up ran a token through the state: back to zeros
                    for t in bufs.values():
                        t.zero_()
        return graph

    @property
    def cuda_graphs(self) -> bool:
        """Whether the step runs as CUDA-graph replays (both parities captured)."""
        return all(g is not None for g in self._graphs)

    # ---- state ------------------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, _StateView]:
        """The live state by name, (batch, ...) each: indexing reads or writes through host copies."""
        return {k: _StateView(self, k) for k in self.state_keys}

    def reset(self, rows: slice) -> None:
        with self._on_stream():
            for t in self._bufs[self.cur].values():
                t[rows] = 0

    # ---- running ----------------------------------------------------------------------------------
    def step(self, ids: np.ndarray) -> np.ndarray:
        """ids (batch,) -> logits (batch, vocab); the returned array is reused by the next call."""
        self._ids_host.numpy()[:, 0] = ids
        with self._on_stream():
            self._ids.copy_(self._ids_host, non_blocking=True)
            graph = self._graphs[self.cur]
            if graph is not None:
                graph.replay()
            else:
                self._execute(self._step[self.cur])
            self._logits_host.copy_(self._logits, non_blocking=True)
        self.cur = 1 - self.cur
        return self._logits_host.numpy()

    def prefill(self, ids: np.ndarray, row: int) -> np.ndarray:
        """Feed tokens (t,) into one sequence's state, in chunks the engine takes; its last logits (vocab,)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        for start in range(0, ids.size, self.max_chunk):
            logits = self._prefill_chunk(ids[start : start + self.max_chunk], row)
        return logits

    def _prefill_chunk(self, ids: np.ndarray, row: int) -> np.ndarray:
        ctx, t = self._prefill, ids.size
        ctx.set_input_shape("input_ids", (1, t))
        self._chunk_ids_host.numpy()[0, :t] = ids
        cur, nxt = self._bufs[self.cur], self._bufs[1 - self.cur]
        for k, (past, present) in self._io_names.items():  # this row of each set: (1, ...) views, contiguous
            self._bind(ctx, past, cur[k][row : row + 1])
            self._bind(ctx, present, nxt[k][row : row + 1])
        with self._on_stream():
            self._chunk_ids.copy_(self._chunk_ids_host, non_blocking=True)
            self._execute(ctx)
            for k in self.state_keys:  # one device copy per chunk (not per token), for this row only
                cur[k][row].copy_(nxt[k][row])
            self._chunk_logits_host.copy_(self._chunk_logits, non_blocking=True)
        return self._chunk_logits_host.numpy()[0].copy()


def _import_torch_cuda():
    try:
        import torch
    except ImportError:
        raise EdgeMambaError("the TensorRT backend keeps its buffers in torch's CUDA memory: install torch with "
                             "CUDA (on Jetson, NVIDIA's JetPack wheel)") from None
    if not torch.cuda.is_available():
        raise EdgeMambaError(f"the TensorRT backend needs a CUDA GPU, and torch {torch.__version__} sees none")
    return torch


def _main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    try:
        report = _build_in_this_process(request)
    except Exception as e:  # noqa: BLE001  (reported to the parent, which raises EdgeMambaError)
        report = {"errors": [f"{type(e).__name__}: {e}"]}
    Path(request["report"]).write_text(json.dumps(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
