"""Native CPU engine for ort-cpu artifacts: the default way to run them where it supports them.

It reads the artifact's own weights.bin in place (the formats the ONNX graphs store: float32 and
float16 matrices, ONNX Runtime's MatMulNBits int8/int4 blocks) and runs the decode step and
prefill in C++ (`edgemamba/kernels/cpu/emcpu.cc`, built with the package). The ONNX graphs stay the
portable description: the same artifact runs on ONNX Runtime (`engine="ort"`), and the tests hold
the two engines and the NumPy reference to the same logits.

Where it does not apply (w8a8's QDQ graphs, a float16 state, a CPU without AVX2/FMA/F16C, a build
without the library), `engine="auto"` falls back to ONNX Runtime and says why in `fallback_reason`.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
from pathlib import Path

import numpy as np

from edgemamba.artifact import WEIGHTS_FILE, Artifact
from edgemamba.errors import EdgeMambaError

NATIVE_PRECISIONS = ("fp32", "fp16", "int8", "int4")
F32_KN, F16_KN, F32_NK, F16_NK, Q8_NK, Q4_NK = range(1, 7)
_QUANT = re.compile(r"^(?P<base>.+)\.q(?P<bits>[48])b(?P<block>\d+)$")
_DTYPES = {name: np.dtype(name) for name in ("float32", "float16", "uint8")}  # what the ort-cpu graphs store


class NativeUnavailable(Exception):
    """The native engine cannot run this artifact here (the reason is the message)."""


# ---- the C ABI (edgemamba/kernels/cpu/emcpu.h) ---------------------------------------------------
class Weight(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("fmt", ctypes.c_int32),
                ("k", ctypes.c_int32), ("n", ctypes.c_int32), ("block", ctypes.c_int32), ("act_bits", ctypes.c_int32)]


class Config(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in (
        "arch", "d_model", "n_layer", "vocab", "d_inner", "d_state", "d_conv", "dt_rank", "n_heads", "head_dim",
        "n_groups", "norm_before_gate")] + [(name, ctypes.c_float) for name in ("norm_eps", "dt_min", "dt_max", "bcdt_eps")]


class Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "norm", "conv_w", "conv_b", "in_proj_b", "out_proj_b", "dt_bias", "A", "D", "gate_norm")] + [
        (name, Weight) for name in ("in_proj", "x_proj", "dt_proj", "out_proj")]


_lib = None


def library_path() -> Path | None:
    here = Path(__file__).resolve().parent.parent / "kernels" / "cpu"
    override = os.environ.get("EDGEMAMBA_NATIVE_LIB")
    if override:
        return Path(override)
    found = sorted(here.glob("libemcpu*.so"))
    return found[0] if found else None


def load_library() -> ctypes.CDLL:
    """The engine's shared library, checked against this CPU; NativeUnavailable says why not."""
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    if path is None:
        raise NativeUnavailable("the native CPU engine was not built (no C++ compiler at install?)")
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags = _cpu_flags()
        missing = [f for f in ("avx2", "fma", "f16c") if flags is not None and f not in flags]
        if missing:
            raise NativeUnavailable(f"this CPU lacks {', '.join(missing)}, which the native engine's x86 build uses")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {path.name} ({e})") from None
    lib.em_create.restype = ctypes.c_void_p
    lib.em_create.argtypes = [ctypes.POINTER(Config), ctypes.POINTER(Weight), ctypes.POINTER(Weight), ctypes.c_void_p,
                              ctypes.POINTER(Layer), ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.em_destroy.argtypes = [ctypes.c_void_p]
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    lib.em_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ptrs, ptrs, ctypes.c_void_p]
    lib.em_prefill.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ptrs, ptrs, ctypes.c_void_p]
    lib.em_isa.restype = ctypes.c_char_p
    lib.em_model_isa.restype = ctypes.c_char_p
    lib.em_model_isa.argtypes = [ctypes.c_void_p]
    _lib = lib
    return lib


def load_weights(path: Path) -> np.ndarray:
    """weights.bin as bytes the engine reads in place. By default copied into memory that asks for
    2 MiB pages (MADV_HUGEPAGE): a decode step streams every weight, and with 4 KiB pages each one
    costs a TLB miss; a file mapping gets huge pages only where the page cache happens to hold 2 MiB
    folios (measured: 40-50% of a freshly written weights.bin), and the step's speed then moves with
    it. EDGEMAMBA_NATIVE_WEIGHTS=map maps the file instead (no copy: the page cache is shared and
    clean pages can be dropped under memory pressure). Peak RSS is the same either way."""
    import mmap

    try:
        if os.environ.get("EDGEMAMBA_NATIVE_WEIGHTS", "huge") == "map" or not hasattr(mmap, "MADV_HUGEPAGE"):
            return np.memmap(path, dtype=np.uint8, mode="r")
        size = path.stat().st_size
        huge = 2 << 20
        buf = mmap.mmap(-1, size + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = np.frombuffer(buf, dtype=np.uint8)
        start = -whole.ctypes.data % huge  # 2 MiB aligned, so every full 2 MiB of it can be one page
        if size >= huge:  # whole 2 MiB pages only: a last partial one would add to the RSS
            buf.madvise(mmap.MADV_HUGEPAGE, start, size // huge * huge)
        out = whole[start : start + size]
        with open(path, "rb") as f:
            got = f.readinto(memoryview(out))
        if got != size:
            raise ValueError(f"read {got} of {size} bytes")
        return out  # writeable: WeightIndex may transpose projections in place, then the backend locks it
    except (OSError, ValueError) as e:
        raise EdgeMambaError(f"{path}: cannot load the weights ({e})") from None


def _cpu_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None  # unknown: trust the build


# ---- the artifact's weights, by role ---------------------------------------------------------------
def graph_index(step_graph: Path) -> dict:
    """What the native engine needs to know of an ort-cpu step graph, as JSON: where each external
    initializer lives in weights.bin, which tensor each linear layer multiplies by and which one the
    embedding lookup gathers (read from the graph's nodes, not guessed from names), or why the graph
    is not one the engine runs. The compiler stores it in the manifest ("weights_index"), so running
    an artifact needs neither the graphs nor the onnx package."""
    import onnx

    graph = onnx.load(str(step_graph), load_external_data=False).graph
    tensors, linear, gather, unsupported, act_bits = {}, {}, None, None, {}
    for init in graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).name
        tensors[init.name] = {"location": info.get("location"), "offset": int(info.get("offset", -1)),
                              "bytes": int(info.get("length", -1)), "dtype": dtype, "shape": [int(d) for d in init.dims]}
    for node in graph.node:
        if node.domain not in ("", "com.microsoft") or node.op_type in (
                "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulIntegerToFloat"):
            unsupported = f"the graph has {node.domain or 'onnx'}.{node.op_type} nodes (quantized activations)"
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits") and len(node.input) > 1 and node.input[1] in tensors:
            linear[_base(node.input[1])] = node.input[1]
            if node.op_type == "MatMulNBits":  # accuracy_level < 4 asks for float activations: int16 here
                level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
                act_bits[node.input[1]] = 16 if level < 4 else 0
        elif node.op_type == "Gather" and node.input[0] in tensors and _base(node.input[0]) == "embedding":
            gather = node.input[0]
    return {"tensors": tensors, "linear": linear, "gather": gather, "unsupported": unsupported, "act_bits": act_bits}


def projection_rows(k: int, n: int) -> bool:
    """Whether the engine reads a float (k in, n out) projection as (n, k) rows (`WeightIndex`): on x86,
    for all but the narrowest (dt_proj, k = dt_rank), unless EDGEMAMBA_NATIVE_LAYOUT=kn."""
    return (platform.machine().lower() in ("x86_64", "amd64") and min(k, n) >= 64
            and os.environ.get("EDGEMAMBA_NATIVE_LAYOUT", "nk") == "nk")


class WeightIndex:
    """The artifact's weights by name, viewed in place in the mapped weights.bin."""

    def __init__(self, artifact: Artifact, weights: np.ndarray):
        index = artifact.manifest.get("weights_index") or graph_index(artifact.file("step"))  # older artifacts
        where = f"{artifact.path}: weights_index"

        def bad(what: str):
            return EdgeMambaError(f"{where}: {what} (manifest edited or corrupted)")

        # Checked field by field: a damaged manifest must give one clear error, never a crash.
        if not isinstance(index, dict) or not all(isinstance(index.get(k), dict) for k in ("tensors", "linear")):
            raise bad("not a mapping with 'tensors' and 'linear'")
        if index.get("unsupported") is not None:
            if not isinstance(index["unsupported"], str):
                raise bad("'unsupported' is not text")
            raise NativeUnavailable(index["unsupported"])
        self.linear: dict[str, str] = index["linear"]
        self.gather: str | None = index.get("gather")
        self.act_bits: dict[str, int] = index.get("act_bits", {})
        if (not all(isinstance(k, str) and isinstance(v, str) for k, v in self.linear.items())
                or not (self.gather is None or isinstance(self.gather, str))
                or not isinstance(self.act_bits, dict)
                or not all(isinstance(k, str) and v in (0, 8, 16) and isinstance(v, int) for k, v in self.act_bits.items())):
            raise bad("'linear', 'gather' or 'act_bits' hold something other than tensor names and bit counts")
        self.inits = {}
        for name, t in index["tensors"].items():
            try:
                if t["dtype"] not in _DTYPES:
                    raise NativeUnavailable(f"tensor {name!r} is {t['dtype']}")
                dtype, shape, offset, nbytes = _DTYPES[t["dtype"]], tuple(t["shape"]), t["offset"], t["bytes"]
                ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (*shape, offset, nbytes))
            except (KeyError, TypeError):
                raise bad(f"tensor {name!r} is malformed") from None
            if (not ints or t.get("location") != WEIGHTS_FILE or offset < 0 or offset + nbytes > weights.size
                    or any(d < 0 for d in shape) or nbytes != dtype.itemsize * int(np.prod(shape, dtype=object))):
                raise bad(f"tensor {name!r} does not fit {WEIGHTS_FILE}")
            self.inits[name] = (offset, dtype, shape)
        self.weights = weights
        self.path = artifact.path / WEIGHTS_FILE

    def transposed(self, arr: np.ndarray) -> np.ndarray:
        """The (k, n) matrix arr, stored as (n, k) in its own place, read again from the file."""
        k, n = arr.shape
        offset = arr.ctypes.data - self.weights.ctypes.data
        out = np.ndarray((n, k), arr.dtype, buffer=self.weights, offset=offset)
        rows = max(1, (1 << 18) // (n * arr.itemsize))  # 256 KiB blocks: the peak RSS hardly moves
        block = np.empty((rows, n), arr.dtype)
        try:
            with open(self.path, "rb") as f:
                for k0 in range(0, k, rows):
                    r = min(rows, k - k0)
                    f.seek(offset + k0 * n * arr.itemsize)
                    if f.readinto(memoryview(block[:r]).cast("B")) != r * n * arr.itemsize:
                        raise ValueError("short read")
                    out[:, k0 : k0 + r] = block[:r].T
        except (OSError, ValueError) as e:
            raise EdgeMambaError(f"{self.path}: cannot load the weights ({e})") from None
        return out

    def array(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise NativeUnavailable(f"no tensor {name!r} in weights.bin")
        offset, dtype, dims = self.inits[name]
        return self.weights[offset : offset + dtype.itemsize * int(np.prod(dims, dtype=object))].view(dtype).reshape(dims)

    def vector(self, name: str, size: int) -> np.ndarray | None:
        if name not in self.inits:
            return None
        arr = self.array(name)
        if arr.dtype != np.float32 or arr.size != size:
            raise NativeUnavailable(f"{name} is {arr.dtype} {arr.shape}, not {size} float32 values")
        return arr

    def matrix(self, tensor: str, k: int, n: int, table: bool) -> Weight:
        """A linear layer's weight as the engine sees it; `table`: stored (n, k) (embedding, head)."""
        arr = self.array(tensor)
        q = _QUANT.match(tensor)
        if q:
            bits, block = int(q["bits"]), int(q["block"])
            scales = self.array(tensor + ".scales")
            nb = -(-k // block)
            if arr.shape != (n, nb, block * bits // 8) or scales.size != n * nb or arr.dtype != np.uint8:
                raise NativeUnavailable(f"{tensor}: unexpected packed layout {arr.shape}")
            return Weight(arr.ctypes.data, scales.ctypes.data, Q8_NK if bits == 8 else Q4_NK, k, n, block,
                          self.act_bits.get(tensor, 0))
        if arr.dtype not in (np.float32, np.float16):
            raise NativeUnavailable(f"{tensor}: {arr.dtype} weights")
        if arr.shape != ((n, k) if table else (k, n)):
            raise NativeUnavailable(f"{tensor}: shape {arr.shape}, expected {(n, k) if table else (k, n)}")
        half = arr.dtype == np.float16
        # Float projections are stored (K, N) for ONNX's MatMul. On x86 the engine reads them as (N, K)
        # rows (`projection_rows`), one dot product a row: the decode step streams them 11-18% faster
        # (mamba-130m / mamba2-130m fp32 and fp16, 2 threads, A/B), and prefill packs its panels from
        # them with 16x16 register transposes (2-3% slower). They are transposed where the engine owns
        # its copy of the weights (writeable until the backend locks it; not a file mapping), block by
        # block from the file: same peak RSS.
        if not table and self.weights.flags.writeable and projection_rows(k, n):
            return Weight(self.transposed(arr).ctypes.data, None, F16_NK if half else F32_NK, k, n, 0, 0)
        fmt = (F16_NK if half else F32_NK) if table else (F16_KN if half else F32_KN)
        return Weight(arr.ctypes.data, None, fmt, k, n, 0, 0)

    def layer_matrix(self, base: str, k: int, n: int) -> Weight:
        tensor = self.linear.get(base + ".T")
        if tensor is None:
            raise NativeUnavailable(f"no linear layer reads {base}")
        return self.matrix(tensor, k, n, table=False)


def _base(name: str) -> str:
    q = _QUANT.match(name)
    if q:
        return q["base"]
    for suffix in (".float16", ".bfloat16"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---- the backend -------------------------------------------------------------------------------------
class NativeBackend:
    """Same interface as OrtBackend: `state` (views by name), reset, step, prefill. The state is
    updated in place, one buffer per tensor."""

    engine = "native"

    def __init__(self, artifact: Artifact, batch: int, threads: int | None = None, max_rows: int | None = None):
        if artifact.target != "ort-cpu" or artifact.precision not in NATIVE_PRECISIONS:
            raise NativeUnavailable(f"{artifact.target}/{artifact.precision} is not run natively")
        dtypes = {e["dtype"] for e in artifact.manifest["state"]}
        if dtypes != {"float32"}:
            raise NativeUnavailable(f"state dtype {sorted(dtypes)} (the native engine keeps float32 state)")
        self.lib = load_library()
        self.spec = s = artifact.spec
        # Prefill chunk rows: every chunk streams (and packs) all the weights once; the buffers
        # (rows x widths, ~37 KB a row for the 130m shapes) count in the peak RSS. 128 rows: int8/int4
        # prefill 1.1x the speed of 64 (mamba2-130m, 2 threads, A/B in one session).
        max_rows = max_rows or 128
        self.batch = batch
        if WEIGHTS_FILE not in artifact.manifest["files"]:
            raise EdgeMambaError(f"{artifact.path}: the manifest lists no {WEIGHTS_FILE!r}")
        self._weights = load_weights(artifact.path / WEIGHTS_FILE)
        idx = WeightIndex(artifact, self._weights)
        self._desc = self._describe(idx)  # keeps the ctypes structures alive with the model
        self._weights.flags.writeable = False
        cfg, emb, head, norm_f, layers = self._desc
        err = ctypes.create_string_buffer(512)
        from edgemamba.runtimes import physical_cores

        self.threads = threads or physical_cores()
        self._model = self.lib.em_create(ctypes.byref(cfg), ctypes.byref(emb), ctypes.byref(head), norm_f,
                                         layers, self.threads, max(batch, max_rows), err, len(err))
        if not self._model:
            raise NativeUnavailable(f"{artifact.path}: {err.value.decode()}")
        self.isa = self.lib.em_model_isa(self._model).decode()  # its kernels: avx512_vnni, avx512, avx2 or generic
        self.state_keys = [f"{kind}_state.{i}" for i in range(s.n_layer) for kind in ("conv", "ssm")]
        self._state = {}
        for i in range(s.n_layer):
            self._state[f"conv_state.{i}"] = np.zeros(s.conv_state_shape(batch), np.float32)
            self._state[f"ssm_state.{i}"] = np.zeros(s.ssm_state_shape(batch), np.float32)
        self._conv = self._pointers("conv", 0)
        self._ssm = self._pointers("ssm", 0)
        self._logits = np.zeros((batch, s.vocab_size), np.float32)
        self._ids = np.zeros(batch, np.int64)

    def _describe(self, idx: WeightIndex):
        s = self.spec
        if idx.gather is None:
            raise NativeUnavailable("the step graph has no embedding lookup")
        emb = idx.matrix(idx.gather, s.d_model, s.vocab_size, table=True)
        head_base = "embedding" if s.tie_embeddings else "lm_head"
        if head_base not in idx.linear:
            raise NativeUnavailable(f"no LM head reads {head_base}")
        head = idx.matrix(idx.linear[head_base], s.d_model, s.vocab_size, table=True)
        lo, hi = s.dt_limit
        cfg = Config(arch=1 if s.arch == "mamba1" else 2, d_model=s.d_model, n_layer=s.n_layer, vocab=s.vocab_size,
                     d_inner=s.d_inner, d_state=s.d_state, d_conv=s.d_conv, dt_rank=s.dt_rank, n_heads=s.n_heads,
                     head_dim=s.head_dim, n_groups=s.n_groups, norm_before_gate=int(s.norm_before_gate),
                     norm_eps=s.norm_eps, dt_min=lo, dt_max=min(hi, 3.0e38),
                     bcdt_eps=s.bcdt_rms_eps if s.bcdt_rms_eps is not None else 0.0)
        layers = (Layer * s.n_layer)()
        self._keep = []  # arrays made here (per-channel D of Mamba-2) that the engine points into
        e = s.d_inner
        in_dim = s.in_proj_dim
        for i in range(s.n_layer):
            p, L = f"layers.{i}.", layers[i]
            L.norm = _ptr(idx.vector(p + "norm", s.d_model))
            L.conv_w = _ptr(idx.vector(p + "conv_weight", s.conv_dim * s.d_conv))
            L.conv_b = _ptr(idx.vector(p + "conv_bias", s.conv_dim))
            L.in_proj_b = _ptr(idx.vector(p + "in_proj_bias", in_dim))
            L.out_proj_b = _ptr(idx.vector(p + "out_proj_bias", s.d_model))
            if s.arch == "mamba1":
                L.dt_bias = _ptr(idx.vector(p + "dt_bias", e))
                L.A = _ptr(idx.vector(p + "A", e * s.d_state))
                L.D = _ptr(idx.vector(p + "D", e))
                L.x_proj = idx.layer_matrix(p + "x_proj", e, s.dt_rank + 2 * s.d_state)
                L.dt_proj = idx.layer_matrix(p + "dt_proj", s.dt_rank, e)
            else:
                L.dt_bias = _ptr(idx.vector(p + "dt_bias", s.n_heads))
                L.A = _ptr(idx.vector(p + "A", s.n_heads))
                per_head = idx.array(p + "D").size == s.n_heads  # the fused layout, else repeated per channel
                D = idx.vector(p + "D", s.n_heads if per_head else e)
                if per_head:
                    D = np.repeat(D, s.head_dim)
                    self._keep.append(D)
                L.D = _ptr(D)
                L.gate_norm = _ptr(idx.vector(p + "gate_norm", e))
            L.in_proj = idx.layer_matrix(p + "in_proj", s.d_model, in_dim)
            L.out_proj = idx.layer_matrix(p + "out_proj", e, s.d_model)
        norm_f = idx.vector("norm_f", s.d_model)
        return cfg, emb, head, _ptr(norm_f), layers

    def _pointers(self, kind: str, row: int):
        arrs = [self._state[f"{kind}_state.{i}"] for i in range(self.spec.n_layer)]
        return (ctypes.c_void_p * len(arrs))(*[a.ctypes.data + row * a[0].nbytes for a in arrs])

    def __del__(self):
        model = getattr(self, "_model", None)
        if model:
            self.lib.em_destroy(model)
            self._model = None

    # ---- state ----------------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, np.ndarray]:
        return self._state

    def reset(self, rows: slice) -> None:
        for arr in self._state.values():
            arr[rows] = 0.0

    # ---- running --------------------------------------------------------------------------------
    def step(self, ids: np.ndarray) -> np.ndarray:
        self._ids[:] = ids
        self.lib.em_step(self._model, self._ids.ctypes.data, self.batch, self._conv, self._ssm, self._logits.ctypes.data)
        return self._logits

    def prefill(self, ids: np.ndarray, row: int) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        logits = np.empty(self.spec.vocab_size, np.float32)
        conv, ssm = (self._conv, self._ssm) if row == 0 else (self._pointers("conv", row), self._pointers("ssm", row))
        self.lib.em_prefill(self._model, ids.ctypes.data, len(ids), conv, ssm, logits.ctypes.data)
        return logits


def _ptr(arr: np.ndarray | None):
    return None if arr is None else arr.ctypes.data
