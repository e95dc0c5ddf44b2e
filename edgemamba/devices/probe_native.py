"""The native CPU engine's own costs on this machine: what ort-cpu's default engine adds to the roofline.

Every figure comes from a synthetic model: a ModelSpec chosen to isolate one cost, built in memory
with random weights in the engine's own formats and run through its C API (em_create, em_step,
em_prefill), never an artifact or a model that predictions are checked against. Each measurement
inverts the prediction formula (predict.py) on its synthetic workload, with the figures measured
before it (the scan and GEMM figures, which need each other, by a few rounds of substitution):

    launch_s, call_s            decode steps of a tiny model (d_model 16) of 1 and 33 layers: per layer,
                                its thread-pool jobs (6 in a small Mamba-1 layer) and ~1k flops; call_s is
                                what a 1-layer step costs beyond its jobs (ctypes, embedding row, final norm)
    state_element_s[.mamba2]    one-chunk prefills (128 tokens) of models with mamba-130m's scan (Mamba-1:
                                d_inner 1536, d_state 16; Mamba-2: 24 heads of 64, d_state 128) and small
                                matrices (d_model 16): per token and layer beyond the GEMMs, per state element
                                (conv and gates included); decode steps use the same figure
    gemm_efficiency[.FMT]       one-chunk prefills (128 tokens, the engine's chunk in every format) of one layer
                                of d_model 640, 1024 and 1536 (d_inner twice that) stored in FMT: the harmonic
                                mean of their ops / time, against the processor's fp32 rate. The time is the
                                engine's whole GEMM as it runs it: weights packed into panels once a chunk,
                                activations rounded per block for 8- and 4-bit weights, then float32 panels or,
                                with AVX-512 VNNI, integer dot products (so q8/q4 may exceed 1)
    weight_read_efficiency[.FMT]  decode steps of models whose layer matrices in FMT are `nbytes` in all (past
                                the last-level cache), tiny head: bytes / time against the read bandwidth
    head_read_efficiency[.FMT]  decode steps of a model that is nearly all head (vocab x 1024 in FMT)

Each time is the lower quartile of its runs (`_seconds`): on a shared machine another process
slows some of them down, the thread pool's joins most. Every figure's source names the kernels the
engine chose on this CPU (em_model_isa: avx512_vnni, avx512, avx2 or generic; EDGEMAMBA_NATIVE_ISA=avx2
keeps AVX2), which the GEMM and read rates depend on.

FMT: f16, q8, q4 (MatMulNBits blocks, as the int8 and int4 precisions store them); float32
is the field itself. int4 artifacts keep an 8-bit head, so no q4 head is measured.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import time

import numpy as np

from edgemamba.devices.fit import STORAGE
from edgemamba.devices.profiles import TARGET_COSTS, Figure
from edgemamba.spec import ModelSpec

LAYER_FORMATS = ("f32", "f16", "q8", "q4")
HEAD_FORMATS = ("f32", "f16", "q8")
PRECISION_OF = {"f32": "fp32", "f16": "fp16", "q8": "int8", "q4": "int4"}  # a precision storing layers so
BLOCK = {"q8": STORAGE["int8"].group, "q4": STORAGE["int4"].group}  # MatMulNBits blocks, as the compiler writes
CHUNK = TARGET_COSTS["ort-cpu"].engine_chunk_rows  # format -> rows of one engine prefill chunk

TINY = dict(d_model=16, vocab_size=16, d_inner=32, d_state=4, d_conv=4, dt_rank=2)
SCAN = {"mamba1": ModelSpec("mamba1", 16, 4, 16, 1536, 16, 4, dt_rank=1),
        "mamba2": ModelSpec("mamba2", 16, 4, 16, 1536, 128, 4, n_heads=24, head_dim=64)}
WIDE = dict(d_model=1024, vocab_size=16, d_inner=2048, d_state=16, d_conv=4, dt_rank=64)  # layer-sized matrices
# GEMM layers: the engine's rate moves with the layer width (panel shapes, the column blocks' split over
# threads, the per-chunk packing and activation rounding against the rows' work). A rate for models of
# any width: the harmonic mean over three.
GEMM_WIDTHS = (640, 1024, 1536)


class SyntheticModel:
    """A ModelSpec built in memory for the native engine: layer matrices stored in `layer_format`, the
    tied embedding / head in `head_format`, random values (the engine's time does not depend on them:
    no data-dependent branches, denormals flushed)."""

    def __init__(self, spec: ModelSpec, layer_format: str, head_format: str, threads: int, seed: int = 0):
        self.rows = CHUNK[layer_format]  # the engine's prefill chunk, as NativeBackend sets it
        from edgemamba.runtimes.native import Config, Layer, load_library

        self.lib = load_library()
        self.spec = s = spec
        self._rng = np.random.default_rng(seed)
        self._keep: list[np.ndarray] = []  # every array the engine points into
        self.layer_bytes = 0  # the layer weights as stored: matrices and per-channel vectors
        e, n, d = s.d_inner, s.d_state, s.d_model
        table = self._matrix(d, s.vocab_size, head_format, table=True)
        self.head_bytes = self.layer_bytes
        self.layer_bytes = 0
        layers = (Layer * s.n_layer)()
        for L in layers:
            L.norm = self._vector(d, 1.0)
            L.conv_w = self._vector(s.conv_dim * s.d_conv, 0.1, random=True)
            L.conv_b = self._vector(s.conv_dim, 0.0)
            L.in_proj = self._matrix(d, s.in_proj_dim, layer_format)
            L.out_proj = self._matrix(e, d, layer_format)
            L.D = self._vector(e, 1.0)
            if s.arch == "mamba1":
                L.dt_bias = self._vector(e, -4.0)
                L.A = self._array(-np.tile(np.arange(1, n + 1, dtype=np.float32), e))
                L.x_proj = self._matrix(e, s.dt_rank + 2 * n, layer_format)
                L.dt_proj = self._matrix(s.dt_rank, e, layer_format)
            else:
                L.dt_bias = self._vector(s.n_heads, -4.0)
                L.A = self._array(-np.arange(1, s.n_heads + 1, dtype=np.float32))
                L.gate_norm = self._vector(e, 1.0)
        norm_f = self._vector(d, 1.0)
        cfg = Config(arch=1 if s.arch == "mamba1" else 2, d_model=d, n_layer=s.n_layer, vocab=s.vocab_size,
                     d_inner=e, d_state=n, d_conv=s.d_conv, dt_rank=s.dt_rank, n_heads=s.n_heads,
                     head_dim=s.head_dim, n_groups=s.n_groups, norm_before_gate=0, norm_eps=s.norm_eps,
                     dt_min=0.0, dt_max=3.0e38, bcdt_eps=0.0)
        err = ctypes.create_string_buffer(512)
        self._desc = (cfg, table, layers)
        self.model = self.lib.em_create(ctypes.byref(cfg), ctypes.byref(table), ctypes.byref(table), norm_f, layers,
                                        threads, self.rows, err, len(err))
        if not self.model:
            raise RuntimeError(f"synthetic model refused by the engine: {err.value.decode()}")
        self.isa = self.lib.em_model_isa(self.model).decode()  # the kernels it runs: avx512_vnni, avx512, avx2, ...
        self._conv = [np.zeros(s.conv_state_shape(1), np.float32) for _ in range(s.n_layer)]
        self._ssm = [np.zeros(s.ssm_state_shape(1), np.float32) for _ in range(s.n_layer)]
        self.state_bytes = sum(a.nbytes for a in self._conv + self._ssm)
        ptrs = ctypes.c_void_p * s.n_layer
        self._conv_p = ptrs(*[a.ctypes.data for a in self._conv])
        self._ssm_p = ptrs(*[a.ctypes.data for a in self._ssm])
        self._logits = np.zeros(s.vocab_size, np.float32)
        self._ids = (np.arange(self.rows) * 7 % s.vocab_size).astype(np.int64)

    # ---- weights ----------------------------------------------------------------------------------
    def _array(self, arr: np.ndarray) -> int:
        arr = in_huge_pages(np.ascontiguousarray(arr))
        self._keep.append(arr)
        self.layer_bytes += arr.nbytes
        return arr.ctypes.data

    def _vector(self, size: int, value: float, random: bool = False) -> int:
        if random:
            return self._array((self._rng.standard_normal(size) * value).astype(np.float32))
        return self._array(np.full(size, value, np.float32))

    def _fill(self, shape, dtype, scale: float = 1.0) -> np.ndarray:
        """Random values, a short random sequence repeated (a large matrix in well under a second)."""
        if np.dtype(dtype) == np.uint8:
            base = self._rng.integers(0, 256, 4099, dtype=np.uint8)
        else:
            base = (self._rng.standard_normal(4099) * scale).astype(dtype)
        return np.resize(base, shape)

    def _matrix(self, k: int, n: int, fmt: str, table: bool = False):
        """A (k in, n out) linear layer as the engine reads it; `table`: stored (n, k) (embedding, head)."""
        from edgemamba.runtimes.native import F16_KN, F16_NK, F32_KN, F32_NK, Q4_NK, Q8_NK, Weight, projection_rows

        if fmt in ("f32", "f16"):
            dtype = np.float32 if fmt == "f32" else np.float16
            table = table or projection_rows(k, n)  # stored as the engine would hold an artifact's
            arr = self._fill((n, k) if table else (k, n), dtype, 0.02)
            code = {("f32", True): F32_NK, ("f16", True): F16_NK, ("f32", False): F32_KN, ("f16", False): F16_KN}
            return Weight(self._array(arr), None, code[fmt, table], k, n, 0, 0)
        bits, block = (8, BLOCK["q8"]) if fmt == "q8" else (4, BLOCK["q4"])
        nb = -(-k // block)
        codes = self._fill((n, nb, block * bits // 8), np.uint8)
        scales = np.full((n, nb), 1e-3, np.float32)
        return Weight(self._array(codes), self._array(scales), Q8_NK if bits == 8 else Q4_NK, k, n, block, 0)

    # ---- running ----------------------------------------------------------------------------------
    def step(self) -> None:
        self.lib.em_step(self.model, self._ids.ctypes.data, 1, self._conv_p, self._ssm_p, self._logits.ctypes.data)

    def prefill(self) -> None:
        """One engine chunk."""
        self.lib.em_prefill(self.model, self._ids.ctypes.data, self.rows, self._conv_p, self._ssm_p,
                            self._logits.ctypes.data)

    def close(self) -> None:
        if self.model:
            self.lib.em_destroy(self.model)
            self.model = None
        self._keep.clear()

    def __del__(self):
        if getattr(self, "model", None):
            self.close()


def in_huge_pages(arr: np.ndarray) -> np.ndarray:
    """`arr` (2 MiB or more) copied into memory that asks for 2 MiB pages, as NativeBackend loads
    weights.bin by default (runtimes.native.load_weights: a decode step streams every weight, and with
    4 KiB pages each costs a TLB miss), whatever NumPy's own allocator asks for."""
    huge = 2 << 20
    if arr.nbytes < huge or not hasattr(mmap, "MADV_HUGEPAGE"):
        return arr
    buf = mmap.mmap(-1, arr.nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(buf, dtype=np.uint8)  # keeps `buf` alive
    start = -whole.ctypes.data % huge
    buf.madvise(mmap.MADV_HUGEPAGE, start, arr.nbytes // huge * huge)  # before the pages are touched
    out = whole[start:start + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    return out


def matrix_bytes(k: int, n: int, fmt: str) -> int:
    """Bytes of a (k in, n out) matrix stored in `fmt` (MatMulNBits: codes and float32 scales per block)."""
    if fmt in ("f32", "f16"):
        return k * n * (4 if fmt == "f32" else 2)
    bits, block = (8, BLOCK["q8"]) if fmt == "q8" else (4, BLOCK["q4"])
    return n * -(-k // block) * (block * bits // 8 + 4)


def _layer_matrix_bytes(spec: ModelSpec, fmt: str) -> int:
    e, d = spec.d_inner, spec.d_model
    shapes = [(d, spec.in_proj_dim), (e, d)] + ([(e, spec.dt_rank + 2 * spec.d_state), (spec.dt_rank, e)]
                                                if spec.arch == "mamba1" else [])
    return sum(matrix_bytes(k, n, fmt) for k, n in shapes)


def _seconds(fn, repeats: int = 6, budget_s: float = 0.3) -> float:
    """Wall time of one call after a warm-up call: the lower quartile of at least `repeats` calls over
    about `budget_s`. On a shared machine other processes slow some calls down, the thread pool's most
    (a worker that loses its core holds every join up): the quartile is the machine's own speed."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < repeats or (time.perf_counter() < end and len(times) < 400):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 25))


def _timed(spec: ModelSpec, layer_format: str, head_format: str, threads: int, run: str):
    """(seconds of one decode step or one engine prefill chunk, the model's byte counts)."""
    model = SyntheticModel(spec, layer_format, head_format, threads)
    try:
        t = _seconds(model.step if run == "step" else model.prefill)
        return t, model.layer_bytes, model.head_bytes, model.state_bytes
    finally:
        model.close()


def engine_isa(threads: int) -> str:
    """The kernels the engine runs models with on this CPU (em_model_isa)."""
    model = SyntheticModel(ModelSpec("mamba1", n_layer=1, **TINY), "f32", "f32", threads)
    try:
        return model.isa
    finally:
        model.close()


def measure_native_costs(bandwidth: float, fp32_ops: float, nbytes: int, threads: int) -> dict[str, Figure]:
    """The native engine's TargetCost figures at `threads` threads, against the processor's measured
    read `bandwidth` (bytes/s) and `fp32_ops` rate; streaming models hold `nbytes` of weights."""
    from edgemamba.devices.predict import matrix_ops, workload

    def launches(spec, fmt):
        w = workload(spec, "ort-cpu", PRECISION_OF[fmt], engine="native")
        return w.step_launches, w.chunk_launches

    how = f"measured: native engine ({engine_isa(threads)} kernels), synthetic models (probe_native), {threads} threads"
    out: dict[str, Figure] = {}
    squeezed: set[str] = set()

    def busy(seconds: float, overhead: float, what: str) -> float:
        """`seconds` less the overheads the prediction adds; at least a tenth of it (a busy machine can
        make the jobs measured before cost more than a whole run: that figure is then unreliable)."""
        if overhead > 0.9 * seconds:
            squeezed.add(what)
        return max(seconds - overhead, 0.1 * seconds)

    # launch_s, call_s: a tiny model of 1 and 33 layers
    t1, t33 = (_timed(ModelSpec("mamba1", n_layer=n, **TINY), "f32", "f32", threads, "step")[0] for n in (1, 33))
    (j1, _), (j33, _) = launches(ModelSpec("mamba1", n_layer=1, **TINY), "f32"), \
        launches(ModelSpec("mamba1", n_layer=33, **TINY), "f32")
    launch = max(0.0, (t33 - t1) / (j33 - j1))
    call = max(0.0, t1 - j1 * launch)
    out["launch_s"] = Figure(launch, f"{how}: decode steps of a d_model-16 model, 1 and 33 layers "
                                     f"({(t33 - t1) / 32 * 1e6:.1f} µs a layer of {(j33 - j1) // 32} jobs)")
    out["call_s"] = Figure(call, f"{how}: a 1-layer d_model-16 step beyond its jobs")

    # the scan (per state element) and the GEMM rate (float32) need each other: measure, then substitute
    scan = {arch: _timed(spec, "f32", "f32", threads, "prefill")[0] for arch, spec in SCAN.items()}
    layers = [ModelSpec("mamba1", d, 1, 16, 2 * d, 16, 4, dt_rank=d // 16) for d in GEMM_WIDTHS]
    gemm_t = {(fmt, i): _timed(spec, fmt, "f32", threads, "prefill")[0]
              for fmt in LAYER_FORMATS for i, spec in enumerate(layers)}

    def fixed(spec, fmt):  # one engine prefill chunk's jobs and call
        return call + launches(spec, fmt)[1] * launch

    def gemm_rate(fmt: str) -> float:
        """The harmonic mean over the widths of ops / (time less the jobs, the call and the scan)."""
        slowness = 0.0
        for i, spec in enumerate(layers):
            rows = CHUNK[fmt]
            scan_s = rows * spec.n_layer * spec.d_inner * spec.d_state * element["mamba1"]
            t = busy(gemm_t[fmt, i], fixed(spec, fmt) + scan_s, f"{fmt} GEMM")
            slowness += t / (rows * matrix_ops(spec))
        return len(layers) / slowness

    element = dict.fromkeys(SCAN, 0.0)
    rate = fp32_ops
    for _ in range(4):
        for arch, spec in SCAN.items():
            rows = CHUNK["f32"]
            left = busy(scan[arch], fixed(spec, "f32") + rows * matrix_ops(spec) / rate, f"{arch} scan")
            element[arch] = left / (rows * spec.n_layer * spec.d_inner * spec.d_state)
        rate = gemm_rate("f32")
    for arch, spec in SCAN.items():
        name = "state_element_s" + ("" if arch == "mamba1" else f".{arch}")
        out[name] = Figure(element[arch], f"{how}: {CHUNK['f32']}-token prefills of a {arch} model with d_inner "
                                          f"{spec.d_inner}, d_state {spec.d_state} and d_model 16, beyond its GEMMs")
    for fmt in LAYER_FORMATS:
        rate = gemm_rate(fmt)
        name = "gemm_efficiency" + ("" if fmt == "f32" else f".{fmt}")
        out[name] = Figure(rate / fp32_ops, f"{how}: {CHUNK[fmt]}-token prefills of one layer, d_model "
                                            f"{'/'.join(map(str, GEMM_WIDTHS))} in {fmt}: {rate / 1e9:.1f} GFLOP/s "
                                            f"(harmonic mean) against {fp32_ops / 1e9:.1f}")

    # streaming: decode steps of layers (tiny head), then of heads (tiny layers)
    read = {}
    for fmt in LAYER_FORMATS:
        per_layer = _layer_matrix_bytes(ModelSpec("mamba1", n_layer=1, **WIDE), fmt)
        spec = ModelSpec("mamba1", n_layer=max(1, math.ceil(nbytes / per_layer)), **WIDE)
        t, layer_b, head_b, state_b = _timed(spec, fmt, "f32", threads, "step")
        overhead = (call + launches(spec, fmt)[0] * launch
                    + spec.n_layer * spec.d_inner * spec.d_state * element["mamba1"])
        read[fmt] = (layer_b + 2 * state_b + head_b) / busy(t, overhead, f"{fmt} layers")
        name = "weight_read_efficiency" + ("" if fmt == "f32" else f".{fmt}")
        out[name] = Figure(read[fmt] / bandwidth, f"{how}: decode steps of {spec.n_layer} d_model-1024 layers in "
                                                  f"{fmt} ({layer_b >> 20} MiB): {read[fmt] / 1e9:.1f} GB/s against "
                                                  f"{bandwidth / 1e9:.1f}")
    for fmt in HEAD_FORMATS:
        d = 1024
        spec = ModelSpec("mamba1", d, 1, max(16, nbytes // matrix_bytes(d, 1, fmt)), 32, 4, 4, dt_rank=2)
        t, layer_b, head_b, state_b = _timed(spec, "f32", fmt, threads, "step")
        overhead = (call + launches(spec, "f32")[0] * launch + (layer_b + 2 * state_b) / read["f32"]
                    + spec.d_inner * spec.d_state * element["mamba1"])
        rate = head_b / busy(t, overhead, f"{fmt} head")
        name = "head_read_efficiency" + ("" if fmt == "f32" else f".{fmt}")
        out[name] = Figure(rate / bandwidth, f"{how}: decode steps of a {spec.vocab_size} x {d} head in {fmt} "
                                             f"({head_b >> 20} MiB): {rate / 1e9:.1f} GB/s against "
                                             f"{bandwidth / 1e9:.1f}")
    if squeezed:
        import sys

        print(f"edgemamba: the machine looks busy: thread-pool jobs measured {launch * 1e6:.0f} µs each, more than "
              f"the runs of {', '.join(sorted(squeezed))} left; those figures are unreliable (probe again when it "
              "is quieter)",
              file=sys.stderr)
    return out


def stream_test_bytes() -> int:
    """Weights of a streaming model: four times the last-level cache (so they stream from memory), at
    least 64 MiB, at most an eighth of the memory available now."""
    import psutil

    from edgemamba.devices.probe import last_level_cache_bytes

    return int(min(max(64 << 20, 4 * last_level_cache_bytes()), psutil.virtual_memory().available // 8))


def probe_native_costs(cpu, threads: int) -> dict[str, dict[str, Figure]]:
    """{"ort-cpu": figures} for a probed processor (`cpu`: its measured bandwidth and fp32 rate), or {}
    with a line on stderr where the native engine cannot run here."""
    import sys

    from edgemamba.runtimes.native import NativeUnavailable, load_library

    try:
        load_library()
    except NativeUnavailable as e:
        print(f"edgemamba: native engine costs not measured ({e}); ort-cpu predictions use the defaults",
              file=sys.stderr)
        return {}
    return {"ort-cpu": measure_native_costs(cpu.bandwidth.value, cpu.peak_ops["fp32"].value, stream_test_bytes(),
                                            threads)}
