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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemamba.errors import EdgeMambaError

MODULES = ("tensorrt", "tensorrt_rtx")  # in order of preference
DOMAIN = "edgemamba"
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


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[Profile], timeout: float = 900) -> dict:
    """Parse an ONNX graph (custom ops included) and build a serialized engine, in a child process.

    Fails (EdgeMambaError) if the parser leaves any node unmapped, or if an edgemamba-domain node
    did not become a plugin layer. Returns the child's report: TensorRT module and version, layer
    counts, plugin layers, engine bytes, and the attributes the plugins were created with."""
    import_tensorrt()  # a clear error here rather than in the child
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        report = Path(tmp) / "report.json"
        request.write_text(json.dumps({"onnx": str(onnx_path), "engine": str(engine_path), "report": str(report),
                                       "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles]}))
        proc = subprocess.run([sys.executable, "-m", "edgemamba.runtimes.tensorrt", str(request)],
                              capture_output=True, text=True, timeout=timeout, env=_child_env(tmp))
        result = json.loads(report.read_text()) if report.exists() else None
    if proc.returncode != 0 or result is None or result.get("errors"):
        why = "; ".join(result["errors"]) if result and result.get("errors") else proc.stderr.strip()[-3000:]
        raise EdgeMambaError(f"TensorRT could not build an engine from {onnx_path}: {why}")
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
    model = onnx.load(str(onnx_path))  # external weights loaded too
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
    report["plugin_layers"] = sum(layer.type == trt.LayerType.PLUGIN_V3 for layer in layers)
    if report["plugin_layers"] != sum(custom.values()):
        report["errors"].append(f"{sum(custom.values())} edgemamba nodes but {report['plugin_layers']} plugin layers")
        return report

    config = builder.create_builder_config()
    for spec in request["profiles"]:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
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
