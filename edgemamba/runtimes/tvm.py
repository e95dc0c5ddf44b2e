"""TVM backend: a compiled library run with TVM's runtime libraries alone (no compiler).

The artifact holds `model.so` (the Relax VM executable and its kernels, built by
`edgemamba.kernels.tvm_build`), the weights packed separately (`weights.bin`, aligned raw tensors
indexed in the manifest; fp32, fp16 or int8 with per-row scales), and for CUDA the kernels' cubin
compiled at build time. Loading needs `apache-tvm-ffi` (NumPy-only Python otherwise) and the
runtime library of the `apache-tvm` wheel, `libtvm_runtime.so` (+ `libtvm_runtime_cuda.so` for
CUDA, about 3.8 MB together), found in `$EDGEMAMBA_TVM_RUNTIME` or in an installed `tvm` package,
whose compiler (`libtvm_compiler.so`, 259 MB) is never loaded. `tvm_host.cc` beside this file does
the same from C++ for CPU targets.

The state of `batch` sequences is allocated once (rows padded up to a compiled step batch) and
updated in place by the kernels; on the CPU `.state` views those arrays directly, on a GPU it is a
window that copies rows on access. On CUDA each compiled step is captured once in a CUDA graph and
replayed per token.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from edgemamba.errors import EdgeMambaError
from edgemamba.spec import ModelSpec

WEIGHT_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
LIBRARY = "model.so"
WEIGHTS = "weights.bin"
ALIGN = 64  # bytes: TVM's kernels assume buffers start on this boundary


# ---------------------------------------------------------------------------------------------
# the library's interface: parameter and state layout (shared with the compiler side)
# ---------------------------------------------------------------------------------------------
def state_specs(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """State tensors in the order the library takes them, with their shapes less the batch axis."""
    out = []
    for i in range(spec.n_layer):
        out.append((f"conv_state.{i}", spec.conv_state_shape(1)[1:]))
        out.append((f"ssm_state.{i}", spec.ssm_state_shape(1)[1:]))
    return out


def dt_proj_dtype(wdtype: str) -> str:
    """Mamba-1's dt_proj in fp16 libraries is fp16 like every other projection (as in the ONNX fp16
    pass and the checkpoint's own half model; its dot products still sum in float32), float32 else."""
    return "float16" if wdtype == "float16" else "float32"


def param_specs(spec: ModelSpec, wdtype: str, dt_dtype: str | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """The library's weight parameters in order: (name, shape, dtype). The matrices (MATRICES) are
    stored (out, in) as in torch, in `wdtype`; int8 ones are followed by "<name>.scale", one float32
    per row (weight-only quantization, symmetric per output channel). dt_proj is stored transposed
    (".T"), in dt_dtype (None: `dt_proj_dtype`); norms, conv, biases, Δ and SSM parameters stay
    float32, with A = -exp(A_log) folded."""
    d, e, n, f32 = spec.d_model, spec.d_inner, spec.d_state, "float32"

    def matrix(name, shape):
        return [(name, shape, wdtype)] + ([(name + ".scale", shape[:1], f32)] if wdtype == "int8" else [])

    out = matrix("embedding", (spec.vocab_size, d))
    for i in range(spec.n_layer):
        p = f"layers.{i}."
        out += [(p + "norm", (d,), f32), *matrix(p + "in_proj", (spec.in_proj_dim, d))]
        if spec.use_bias:
            out.append((p + "in_proj_bias", (spec.in_proj_dim,), f32))
        out.append((p + "conv_weight", (spec.conv_dim, spec.d_conv), f32))
        if spec.use_conv_bias:
            out.append((p + "conv_bias", (spec.conv_dim,), f32))
        if spec.arch == "mamba1":
            r = spec.dt_rank
            out += [*matrix(p + "x_proj", (r + 2 * n, e)), (p + "dt_proj.T", (r, e), dt_dtype or dt_proj_dtype(wdtype)),
                    (p + "dt_bias", (e,), f32), (p + "A", (e, n), f32), (p + "D", (e,), f32)]
        else:
            h = spec.n_heads
            out += [(p + "dt_bias", (h,), f32), (p + "A", (h,), f32), (p + "D", (h,), f32), (p + "gate_norm", (e,), f32)]
        out += matrix(p + "out_proj", (d, e))
        if spec.use_bias:
            out.append((p + "out_proj_bias", (d,), f32))
    out.append(("norm_f", (d,), f32))
    if not spec.tie_embeddings:
        out += matrix("lm_head", (spec.vocab_size, d))
    return out


def pack_weights(spec: ModelSpec, weights: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    """Canonical checkpoint weights (`Checkpoint.weights`) in the library's layout. NumPy only, so
    weights can be packed on a device that has no compiler."""
    out = {}
    for name, shape, dtype in param_specs(spec, WEIGHT_DTYPES[precision]):
        if name.endswith(".scale"):
            continue  # written with its matrix
        if name.endswith(".A"):
            src = -np.exp(weights[name[:-1] + "A_log"].astype(np.float64))
        elif name.endswith(".T"):
            src = weights[name[:-2]].T
        else:
            src = weights[name]
        src = np.asarray(src).reshape(shape)
        if dtype == "int8":
            out[name], out[name + ".scale"] = quantize_rows(src)
        else:
            out[name] = np.ascontiguousarray(src, dtype=dtype)
    return out


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: w ≈ q · scale[:, None], q in [-127, 127]."""
    w = w.astype(np.float64)
    scale = np.abs(w).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q), scale.astype(np.float32)


def write_packed(packed: dict[str, np.ndarray], path: Path) -> list[dict]:
    """weights.bin (raw tensors, each starting on an ALIGN-byte boundary) and its index for the manifest."""
    index, offset = [], 0
    with open(path, "wb") as f:
        for name, arr in packed.items():
            offset += f.write(b"\0" * (-offset % ALIGN))
            index.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape), "offset": offset})
            offset += f.write(arr.tobytes())
    return index


def read_packed(path: Path, index: list[dict]) -> dict[str, np.ndarray]:
    """Views of weights.bin, memory-mapped copy-on-write: DLPack exports only writable arrays, and
    nothing writes them, so the pages stay shared with the page cache."""
    raw = np.memmap(path, dtype=np.uint8, mode="c")
    out = {}
    for entry in index:
        dtype, shape, off = np.dtype(entry["dtype"]), tuple(entry["shape"]), int(entry["offset"])
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if off % ALIGN or off + nbytes > raw.size:
            raise EdgeMambaError(f"{path}: tensor {entry['name']} lies outside the file or is misaligned")
        out[entry["name"]] = raw[off : off + nbytes].view(dtype).reshape(shape)
    return out


# ---------------------------------------------------------------------------------------------
# the runtime libraries
# ---------------------------------------------------------------------------------------------
def runtime_dir() -> Path:
    """Where TVM's runtime libraries are: $EDGEMAMBA_TVM_RUNTIME, or the installed `tvm` package's
    lib folder (found without importing the package, which would load the compiler)."""
    env = os.environ.get("EDGEMAMBA_TVM_RUNTIME")
    if env:
        return Path(env)
    found = importlib.util.find_spec("tvm")
    if found is not None and found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0]) / "lib"
    raise EdgeMambaError("TVM's runtime libraries were not found: install apache-tvm, or set "
                         "EDGEMAMBA_TVM_RUNTIME to a folder holding libtvm_runtime.so")


def load_runtime(device: str) -> None:
    """Load libtvm_runtime.so (and for CUDA libtvm_runtime_cuda.so) into this process, once."""
    try:
        import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime links against)
    except ImportError:
        raise EdgeMambaError("the TVM backend needs the apache-tvm-ffi package (pip install apache-tvm-ffi)") from None
    names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if device == "cuda" else [])
    if device == "cuda":
        _preload_cudart()
    folder = runtime_dir()
    for name in names:
        path = folder / name
        if not path.exists():
            raise EdgeMambaError(f"{path}: TVM runtime library not found")
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # loading twice returns the same handle
        except OSError as e:
            raise EdgeMambaError(f"{path}: cannot load ({e})") from None


def _preload_cudart() -> None:
    """libtvm_runtime_cuda.so links libcudart.so.13: load it from where CUDA installs put it when
    the dynamic loader's path lacks it (a CUDA toolkit, or the nvidia-cuda-runtime wheel)."""
    try:
        ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    folders = [Path(r) / sub for r in roots if r for sub in ("lib64", "lib", "targets/x86_64-linux/lib",
                                                             "targets/sbsa-linux/lib", "targets/aarch64-linux/lib")]
    for spec_name in ("nvidia.cu13", "nvidia.cuda_runtime"):
        try:
            found = importlib.util.find_spec(spec_name)
        except ModuleNotFoundError:
            found = None
        if found is not None and found.submodule_search_locations:
            folders.append(Path(list(found.submodule_search_locations)[0]) / "lib")
    for folder in folders:
        for path in sorted(folder.glob("libcudart.so.13*")) if folder.is_dir() else []:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            return


class _Cubins:
    """Kernels compiled to cubin at build time, served to the CUDA runtime by source hash.

    A library keeps its CUDA kernels as source; TVM's CUDA runtime calls the global function
    `tvm_callback_cuda_compile(source)` when it loads them. Answering with the cubin nvcc built at
    compile time means nothing is compiled on the device (and it needs no NVRTC). One table per
    process, since the callback is process-wide."""

    _table: dict[str, bytes] | None = None

    @classmethod
    def add(cls, source_sha256: str, cubin: bytes) -> None:
        if cls._table is None:
            import tvm_ffi

            table: dict[str, bytes] = {}

            def serve(source, *_):
                key = hashlib.sha256(str(source).encode()).hexdigest()
                if key not in table:
                    raise RuntimeError("no prebuilt cubin for these CUDA kernels (library and cubin from different builds)")
                return table[key]

            tvm_ffi.register_global_func("tvm_callback_cuda_compile", serve, override=True)
            cls._table = table
        cls._table[source_sha256] = cubin


# ---------------------------------------------------------------------------------------------
# devices: empty(shape, dtype) -> (host, tensor); rows(host, slice) -> tensor view of those rows
# ---------------------------------------------------------------------------------------------
def aligned_zeros(shape, dtype) -> np.ndarray:
    """A zeroed array whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class _Cpu:
    """Host arrays are the tensors (shared through DLPack)."""

    kind, dl_type = "cpu", 1

    def __init__(self):
        import tvm_ffi

        self.ffi = tvm_ffi

    def empty(self, shape, dtype):
        arr = aligned_zeros(shape, dtype)
        return arr, self.ffi.from_dlpack(arr)

    def upload(self, arr: np.ndarray):
        if arr.ctypes.data % ALIGN or not arr.flags.c_contiguous:
            copy = aligned_zeros(arr.shape, arr.dtype)
            copy[...] = arr
            arr = copy
        return self.ffi.from_dlpack(arr)

    def rows(self, host: np.ndarray, rows: slice):
        return self.ffi.from_dlpack(host[rows])

    def read(self, host, _tensor=None) -> np.ndarray:
        return host


class _Cuda:
    """Tensors in GPU memory, allocated and copied through TVM's runtime (no torch needed)."""

    kind, dl_type = "cuda", 2

    def __init__(self, index: int = 0):
        import tvm_ffi

        self.ffi = tvm_ffi
        self.device = tvm_ffi.device("cuda", index)

    def _fn(self, name):
        return self.ffi.get_global_func(name)

    def empty(self, shape, dtype):
        host = _DeviceArray(self, self.upload(np.zeros(shape, dtype)))
        return host, host.tensor

    def upload(self, arr: np.ndarray):
        arr = np.ascontiguousarray(arr)
        t = self._fn("runtime.TVMTensorAllocWithScope")(self.ffi.Shape(arr.shape), self.ffi.dtype(str(arr.dtype)),
                                                          self.device, None)
        self.write(t, arr)
        return t

    def write(self, tensor, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        self._fn("runtime.TVMTensorCopyFromBytes")(tensor, ctypes.c_void_p(arr.ctypes.data), arr.nbytes)

    def read(self, host: "_DeviceArray", _tensor=None) -> np.ndarray:
        out = np.empty(host.shape, host.dtype)
        self._fn("runtime.TVMTensorCopyToBytes")(host.tensor, ctypes.c_void_p(out.ctypes.data), out.nbytes)
        return out

    def rows(self, host: "_DeviceArray", rows: slice):
        row_bytes = int(np.prod(host.shape[1:])) * host.dtype.itemsize
        shape = (rows.stop - rows.start, *host.shape[1:])
        return self._fn("runtime.TVMTensorCreateView")(host.tensor, self.ffi.Shape(shape),
                                                      self.ffi.dtype(str(host.dtype)), rows.start * row_bytes)


class _DeviceArray:
    """A GPU tensor as Session sees state arrays: `.shape`, and indexing that copies rows between
    host and device (snapshots and resets only; decoding never goes through here)."""

    def __init__(self, dev: _Cuda, tensor):
        self.dev, self.tensor = dev, tensor
        self.shape, self.dtype = tuple(tensor.shape), np.dtype(str(tensor.dtype))

    def __getitem__(self, index):
        return self.dev.read(self)[index]

    def __setitem__(self, index, value):
        host = self.dev.read(self)
        host[index] = value
        self.dev.write(self.tensor, host)


class _CudaGraphs:
    """Each bound step captured once into a CUDA graph (through the CUDA runtime's C API) and
    replayed per token: one launch instead of one per kernel. The first call of each runs
    uncaptured (it fills the VM's memory pool, so nothing is allocated while capturing) and is
    then captured without being replayed: capture records, it does not execute. Falls back to
    plain calls if capture fails."""

    def __init__(self, dev: _Cuda):
        self.dev, self.cudart = dev, _cudart()
        self.stream = ctypes.c_void_p()
        self._check(self.cudart.cudaStreamCreateWithFlags(ctypes.byref(self.stream), 0), "stream")  # blocking:
        # ordered with the legacy default stream that TVM's copies use
        self.execs: dict = {}

    def _check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"CUDA graph {what}: error {err}")

    def run(self, key, fn) -> None:
        if key not in self.execs:
            fn()
            self.execs[key] = self._capture(fn)
            return
        exe = self.execs[key]
        if exe is None:
            fn()
        else:
            self._check(self.cudart.cudaGraphLaunch(exe, self.stream), "launch")

    def _capture(self, fn):
        rt = self.cudart
        self._check(rt.cudaStreamSynchronize(self.stream), "sync")
        graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(rt.cudaStreamBeginCapture(self.stream, 0), "begin")  # global mode
        try:
            with self.dev.ffi.use_raw_stream(self.dev.device, self.stream.value):
                fn()
        finally:
            err = rt.cudaStreamEndCapture(self.stream, ctypes.byref(graph))
        if err or rt.cudaGraphInstantiate(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)):
            rt.cudaGetLastError()
            return None
        return exe


def _cudart():
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaGraphLaunch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaStreamBeginCapture.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.cudaStreamEndCapture.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaGraphInstantiate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return lib
    raise EdgeMambaError("the CUDA runtime library (libcudart) was not found")


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
def load_library(artifact):
    """The artifact's compiled library as a module (TVM's runtime loaded, its CUDA kernels served from
    the prebuilt cubins): the VM executable, and through its imports every kernel by name."""
    info = artifact.manifest["tvm"]
    load_runtime("cuda" if info["device"] == "cuda" else "cpu")
    import tvm_ffi

    for name, source_sha256 in info.get("cubins", {}).items():
        _Cubins.add(source_sha256, (artifact.path / name).read_bytes())
    return tvm_ffi.load_module(str((artifact.path / info["library"]).resolve()))


class TvmBackend:
    """The Session backend for tvm-* artifacts. `weights` (name -> array in the library's layout,
    see `pack_weights`) replaces the artifact's weights.bin, e.g. to run weights packed on the device."""

    def __init__(self, artifact, batch: int, threads: int | None = None, *, weights=None, cuda_graph: bool = True):
        info = artifact.manifest["tvm"]
        self.spec, self.batch = artifact.spec, batch
        self.dev = _Cuda() if info["device"] == "cuda" else _Cpu()
        lib = load_library(artifact)
        import tvm_ffi

        if threads and self.dev.kind == "cpu":
            tvm_ffi.get_global_func("runtime.config_threadpool")(1, int(threads))
        self.vm = lib["vm_load_executable"]()
        self.vm["vm_initialization"](self.dev.dl_type, 0, 2, 1, 0, 2)  # device 0, pooled allocator; CPU host
        if weights is None:
            if info["params"] is None:
                raise EdgeMambaError(f"{artifact.path}: this artifact has no weights; pack them with "
                                     "edgemamba.runtimes.tvm.pack_weights and pass weights=")
            weights = read_packed(artifact.path / WEIGHTS, info["params"])
        # libraries before dt_proj_dtype (no "dt_proj_dtype" in the manifest) take float32 dt_proj
        specs = param_specs(self.spec, WEIGHT_DTYPES[artifact.precision], info.get("dt_proj_dtype", "float32"))
        missing = [n for n, _, _ in specs if n not in weights]
        if missing:
            raise EdgeMambaError(f"{artifact.path}: packed weights lack {', '.join(missing[:3])}")
        self._weights = [self.dev.upload(np.asarray(weights[n], dtype=dt).reshape(shape)) for n, shape, dt in specs]

        # Steps run in chunks of compiled batch sizes; the rows are padded up to the last chunk's end.
        chunks = _chunking(batch, info["step_batches"])
        rows = chunks[-1][0] + chunks[-1][1]
        self._states = {name: self.dev.empty((rows, *shape), np.float32) for name, shape in state_specs(self.spec)}
        self._ids, _ = self.dev.empty((rows,), np.int32)
        self._logits, _ = self.dev.empty((rows, self.spec.vocab_size), np.float32)
        self._steps = [self._bind_step(start, size) for start, size in chunks]
        # greedy decoding on the device (`step_greedy`), where the library has it
        self._greedy = [self._bind_greedy(start, size) for start, size in chunks] if info.get("greedy") else None
        self._graphs = _CudaGraphs(self.dev) if self.dev.kind == "cuda" and cuda_graph else None

    # ---- state ----------------------------------------------------------------------------------
    @property
    def state(self) -> dict:
        """The live state by name, (batch, ...) views on a CPU; on a GPU (padded rows, ...) arrays
        that copy on indexing."""
        if self.dev.kind == "cpu":
            return {k: host[: self.batch] for k, (host, _) in self._states.items()}
        return {k: host for k, (host, _) in self._states.items()}

    def reset(self, rows: slice) -> None:
        for host, _ in self._states.values():
            host[rows] = 0.0

    # ---- running --------------------------------------------------------------------------------
    def _bind_step(self, start: int, size: int):
        """step_{size} with this chunk's rows of ids, logits and state bound once (VM closure)."""
        rows = slice(start, start + size)
        bufs = [self._ids, self._logits, *(host for host, _ in self._states.values())]
        name = f"step_{size}@{start}"
        self.vm["save_function"](f"step_{size}", name, 0, *(self.dev.rows(b, rows) for b in bufs), *self._weights)
        return self.vm[name]

    def _bind_greedy(self, start: int, size: int):
        """greedy_{size} on this chunk's rows of logits and ids."""
        rows = slice(start, start + size)
        name = f"greedy_{size}@{start}"
        self.vm["save_function"](f"greedy_{size}", name, 0, self.dev.rows(self._logits, rows),
                                 self.dev.rows(self._ids, rows))
        return self.vm[name]

    @property
    def can_step_greedy(self) -> bool:
        return self._greedy is not None

    def _run(self, ids: np.ndarray, greedy: bool) -> None:
        ids = np.asarray(ids, dtype=np.int32)
        if self.dev.kind == "cpu":
            self._ids[: self.batch] = ids
        else:
            staged = np.zeros(self._ids.shape, np.int32)
            staged[: self.batch] = ids
            self.dev.write(self._ids.tensor, staged)
        for i, fn in enumerate(self._steps):
            if greedy:  # the step, then its argmax into ids: one CUDA graph
                fn = (lambda step, pick: lambda: (step(), pick()))(fn, self._greedy[i])
            if self._graphs is None:
                fn()
            else:
                self._graphs.run((i, greedy), fn)

    def step(self, ids: np.ndarray) -> np.ndarray:
        """ids (batch,) -> logits (batch, vocab); the array is reused by the next call (CPU)."""
        self._run(ids, greedy=False)
        return self.dev.read(self._logits)[: self.batch]

    def step_greedy(self, ids: np.ndarray) -> np.ndarray:
        """ids (batch,) -> each sequence's next token (batch,) int32, the argmax of its logits
        computed on the device (-1 where the logits held a NaN or an infinity); only the ids come
        back, the logits stay on the device (`logits()` reads them)."""
        self._run(ids, greedy=True)
        return np.array(self.dev.read(self._ids)[: self.batch])

    def logits(self) -> np.ndarray:
        """The last step's logits (batch, vocab)."""
        return self.dev.read(self._logits)[: self.batch]

    def prefill(self, ids: np.ndarray, row: int) -> np.ndarray:
        """A chunk of tokens (t,) into one sequence's state; returns its last logits (vocab,)."""
        logits, logits_t = self.dev.empty((1, self.spec.vocab_size), np.float32)
        states = [self.dev.rows(host, slice(row, row + 1)) for host, _ in self._states.values()]
        ids_t = self.dev.upload(np.ascontiguousarray(ids, dtype=np.int32))
        self.vm["prefill"](ids_t, logits_t, *states, *self._weights)
        return np.array(self.dev.read(logits)[0])


def _chunking(batch: int, compiled: list[int]) -> list[tuple[int, int]]:
    """(start, size) chunks of compiled step batches covering `batch` rows: the smallest compiled
    size that holds them all, or repeated largest ones."""
    compiled = sorted(compiled)
    chunks, start = [], 0
    while start < batch:
        left = batch - start
        size = next((b for b in compiled if b >= left), compiled[-1])
        chunks.append((start, size))
        start += size
    return chunks
