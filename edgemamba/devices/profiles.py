"""Device profiles and target costs: data, not code paths.

Every figure carries its source: a vendor document's name, "measured: ..." or "estimate: why".
Estimates are marked as such (`Figure.estimate`) and shown as such by `edgemamba devices NAME`.
Code never branches on a device's name: fit checks and predictions look figures up here.

Units: bytes, bytes/s, operations/s (a multiply-add counts 2), seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from edgemamba.errors import EdgeMambaError

GiB = 1 << 30
MiB = 1 << 20
GB = 1e9
TERA = 1e12
GIGA = 1e9

# Precisions edgemamba knows, and the compute type each runs its matrix products in: weight-only
# int8/int4 dequantize to fp16 on GPUs (and to fp32 on CPUs without fp16 arithmetic).
PRECISIONS = ("fp32", "fp16", "int8", "int4", "w8a8")
COMPUTE_DTYPE = {"fp32": "fp32", "fp16": "fp16", "int8": "fp16", "int4": "fp16", "w8a8": "int8"}


@dataclass(frozen=True)
class Figure:
    value: float
    source: str  # vendor document name, "measured: how", or "estimate: why"

    @property
    def estimate(self) -> bool:
        return self.source.startswith("estimate")

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source, "estimate": self.estimate}

    @classmethod
    def from_dict(cls, d) -> Figure:
        if isinstance(d, (int, float)):
            return cls(float(d), "given")
        return cls(float(d["value"]), str(d.get("source", "given")))


def est(value: float, why: str) -> Figure:
    return Figure(value, f"estimate: {why}")


@dataclass(frozen=True)
class Processor:
    """The CPU or GPU a target runs on, with the memory its weights live in."""

    kind: str  # "cpu" or "gpu"
    name: str
    cores: int  # CPU cores, or GPU streaming multiprocessors
    memory: Figure  # bytes of the memory the weights live in (shared on Jetson and Pi)
    usable_memory: Figure  # what is left for edgemamba after the OS (and desktop) take their share
    bandwidth: Figure  # peak bytes/s of that memory
    bandwidth_efficiency: Figure  # fraction of the peak a streaming read reaches from this processor
    peak_ops: dict[str, Figure]  # compute dtype ("fp32", "fp16", "int8") -> dense ops/s
    compute_efficiency: Figure  # fraction of peak a large matrix product reaches

    def achievable_bandwidth(self) -> float:
        return self.bandwidth.value * self.bandwidth_efficiency.value

    def achievable_ops(self, dtype: str) -> float:
        # A processor without a faster path for a dtype runs it at its fp32 rate (e.g. fp16 on x86 CPUs).
        peak = self.peak_ops.get(dtype) or self.peak_ops["fp32"]
        return peak.value * self.compute_efficiency.value

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "name": self.name, "cores": self.cores,
            "memory_bytes": self.memory.to_dict(), "usable_memory_bytes": self.usable_memory.to_dict(),
            "bandwidth_bytes_per_s": self.bandwidth.to_dict(),
            "bandwidth_efficiency": self.bandwidth_efficiency.to_dict(),
            "peak_ops_per_s": {k: v.to_dict() for k, v in self.peak_ops.items()},
            "compute_efficiency": self.compute_efficiency.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Processor:
        return cls(kind=d["kind"], name=d["name"], cores=int(d["cores"]), memory=Figure.from_dict(d["memory_bytes"]),
                   usable_memory=Figure.from_dict(d["usable_memory_bytes"]),
                   bandwidth=Figure.from_dict(d["bandwidth_bytes_per_s"]),
                   bandwidth_efficiency=Figure.from_dict(d["bandwidth_efficiency"]),
                   peak_ops={k: Figure.from_dict(v) for k, v in d["peak_ops_per_s"].items()},
                   compute_efficiency=Figure.from_dict(d["compute_efficiency"]))


@dataclass(frozen=True)
class DeviceProfile:
    name: str  # what users type: `--device orin-nano-8gb`
    title: str
    cpu: Processor
    gpu: Processor | None
    targets: tuple[str, ...]  # the targets that run here, most preferred first
    precisions: tuple[str, ...]  # the precisions that run here, most preferred first
    notes: str = ""
    # target -> TargetCost fields measured on this device (`devices --probe` measures ort-cpu's)
    measured_costs: dict[str, dict[str, Figure]] = field(default_factory=dict)

    def cost(self, target: str, engine: str | None = None) -> TargetCost:
        """The costs of the engine that runs the target (its default engine unless given), with what was
        measured on this device in place of the defaults."""
        key = cost_key(target, engine)
        base, measured = target_cost(key), self.measured_costs.get(key, {})
        plain = {k: v for k, v in measured.items() if "." not in k}
        variants = {**base.variants, **{k: v for k, v in measured.items() if "." in k}}
        return dataclasses.replace(base, **plain, variants=variants)

    def processor(self, target: str) -> Processor:
        kind = target_cost(target).processor
        proc = self.gpu if kind == "gpu" else self.cpu
        if proc is None or target not in self.targets:
            raise EdgeMambaError(f"target {target!r} does not run on {self.name}; its targets: {', '.join(self.targets)}")
        return proc

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "cpu": self.cpu.to_dict(),
                "gpu": self.gpu.to_dict() if self.gpu else None, "targets": list(self.targets),
                "precisions": list(self.precisions), "notes": self.notes,
                "measured_costs": {t: {k: v.to_dict() for k, v in c.items()} for t, c in self.measured_costs.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> DeviceProfile:
        try:
            costs = {t: {k: Figure.from_dict(v) for k, v in c.items()} for t, c in d.get("measured_costs", {}).items()}
            bad = [f"{t}.{k}" for t, c in costs.items() for k in c if t not in TARGET_COSTS or not _cost_name(k)]
            if bad:
                raise EdgeMambaError(f"invalid device profile: unknown measured cost(s) {', '.join(bad)}")
            return cls(name=d["name"], title=d["title"], cpu=Processor.from_dict(d["cpu"]),
                       gpu=Processor.from_dict(d["gpu"]) if d.get("gpu") else None, targets=tuple(d["targets"]),
                       precisions=tuple(d["precisions"]), notes=d.get("notes", ""), measured_costs=costs)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EdgeMambaError(f"invalid device profile: missing or malformed field {e}") from None


@dataclass(frozen=True)
class TargetCost:
    """What a target adds to the roofline: per-launch and per-call overhead, and its runtime memory."""

    processor: str  # "cpu" or "gpu"
    launches_per_layer: dict[str, int]  # arch -> graph nodes / kernels per layer in one decode step
    launches_fixed: int  # embedding, final norm, head
    chunk_launches_per_layer: dict[str, int]  # arch -> graph nodes / kernels per layer in one prefill chunk
    chunk_launches_fixed: int  # ... and outside the layers
    launch_s: Figure  # per graph node / kernel launch
    call_s: Figure  # per graph call (host side: binding, dispatch)
    scan_step_s: Figure  # prefill: per token per layer when the scan runs as a loop of graph nodes
    state_element_s: Figure  # per state element (d_inner · d_state) per token per layer, when the recurrence
    #                          runs as separate elementwise nodes (0 when fused: then it is in the roofline)
    weight_read_efficiency: Figure  # fraction of the processor's streaming bandwidth its matrix-vector products reach
    head_read_efficiency: Figure  # ... and the (vocab, d_model) head's product, which reads the table transposed
    gemm_efficiency: Figure  # fraction of the processor's achievable matrix-product rate its prefill reaches
    runtime_bytes: Figure  # runtime libraries, context and allocator arenas resident while running
    # Prefill matrix products whose K loop, not their bytes or operations, sets their time at chunk sizes
    # (one wave of tiles walking K): layer weight name -> K depth of one tile step; and one step's time.
    kloop_tiles: dict[str, int] = field(default_factory=dict)
    kloop_step_s: Figure = Figure(0.0, "no latency-bound prefill products")
    # Of those products, the ones whose output is cut in square tiles (name -> tile side, rows and columns)
    # that the GPU runs kloop_tiles_per_core at a time on each of its cores (SMs): a chunk with more tiles
    # walks K once per wave of them. Absent: one wave whatever the chunk.
    kloop_wave_tiles: dict[str, int] = field(default_factory=dict)
    kloop_tiles_per_core: int = 0
    chunk_launch_extra_s: Figure = Figure(0.0, "a prefill kernel costs what a step's does")  # per prefill kernel
    # A prefill scan split in time into at most scan_pieces pieces of a multiple of 16 tokens, walked twice
    # (tvm-cuda since git 0862449: scan_states, then scan_pieces; kernels/tvm_prefill.ScanChunkSpec): per
    # chunk and layer 2 · piece length · d_inner · scan_piece_step_s. 0: no such scan (scan_step_s instead).
    scan_pieces: int = 0
    scan_piece_step_s: Figure = Figure(0.0, "no scan in time pieces")
    # A prefill conv whose threads walk the chunk with a stride of conv_token_groups tokens (tvm-cuda's
    # conv_out): per chunk and layer ceil(T / conv_token_groups) · conv_group_step_s. 0: none.
    conv_token_groups: int = 0
    conv_group_step_s: Figure = Figure(0.0, "no conv in token groups")
    notes: str = ""
    # A Figure that differs by the weights' storage format or the architecture, as "field.variant"
    # (e.g. "weight_read_efficiency.q8", "state_element_s.mamba2"); `figure` falls back to the field.
    variants: dict[str, Figure] = field(default_factory=dict)
    # storage format -> launches each linear layer adds to a decode step (on top of launches_per_layer);
    # a layer with a side below split_linear_min adds at most one
    launches_per_linear: dict[str, int] = field(default_factory=dict)
    split_linear_min: int = 0
    # storage format -> prefill rows the engine runs at a time within a Session chunk (absent: all of it)
    engine_chunk_rows: dict[str, int] = field(default_factory=dict)
    compute_dtype: str = ""  # the dtype every precision's matrix products run in ("": COMPUTE_DTYPE's)
    graph_launches: bool = False  # an artifact's ONNX graphs count its launches (one per node)
    roofline_scan: bool = True  # the recurrence's ops count in the compute roofline (False: in state_element_s only)

    def figure(self, name: str, *variants: str) -> Figure:
        """Field `name` for the first of `variants` (storage formats, architectures) that has its own."""
        for v in variants:
            if f"{name}.{v}" in self.variants:
                return self.variants[f"{name}.{v}"]
        return getattr(self, name)


# Weight storage formats (fit.weight_formats): float32, float16, MatMulNBits 8-bit and 4-bit blocks,
# w8a8's per-channel int8; with the architectures, what a TargetCost figure can vary by.
FORMATS = ("f32", "f16", "q8", "q4", "w8")
_VARIANTS = FORMATS + ("mamba1", "mamba2")
_FIGURES = {f.name for f in dataclasses.fields(TargetCost) if f.type in ("Figure", Figure)}


def _cost_name(name: str) -> bool:
    """A measured cost's name: a Figure field, or "field.variant"."""
    base, _, variant = name.partition(".")
    return base in _FIGURES and (not variant or variant in _VARIANTS)


# ONNX Runtime running ort-cpu (`--engine ort`): defaults for devices not probed; `edgemamba devices
# --probe` measures these on the machine itself (probe.measure_ort_costs). Ranges: the 2-core CI machine
# and a quiet 16-core Xeon (RESULTS.md).
_ORT_NOTE = "measured: ONNX Runtime micro-graphs (devices/probe.py measure_ort_costs)"
_CUDA_LAUNCH = est(3e-6, "one kernel launch from a CUDA graph / TensorRT enqueue, 2-4 µs")
# GPU per-kernel and per-call costs measured on an H100 SXM (`edgemamba devices --probe` there:
# probe.measure_gpu_costs, torch micro-graphs, never a model; RESULTS.md issue 9). A probe measures
# them on the GPU at hand.
_GPU_MEASURED = "measured on an H100 SXM 80GB, 5 probes (probe.measure_gpu_costs)"
_GPU_KERNEL = Figure(3.4e-6, f"{_GPU_MEASURED}: 3.2-3.5 µs, a small cuBLAS matrix-vector kernel in CUDA-graph "
                             "replay beyond its bytes (node launch, memory round trip, reduction, drain)")
_GPU_CALL = Figure(50e-6, f"{_GPU_MEASURED}: 42-61 µs, one step call from the host: ids up, graph replay, 50k "
                          "float32 logits down")
# The TVM step (kernels/tvm_model.py): 4 kernels a Mamba-1 layer (in_proj+conv, x_proj, dt_proj+state
# update, out_proj+residual), 3 a Mamba-2 layer, plus the embedding and the lm_head.
_TVM_KERNELS = {"mamba1": 4, "mamba2": 3}
_TVM_FIXED = 2
# The TVM prefill (kernels/tvm_model.py): RMSNorm, in_proj, conv, x_proj, dt_proj, scan, out_proj a Mamba-1
# layer; RMSNorm, in_proj, conv, scan, gated RMSNorm, out_proj a Mamba-2 layer; embedding, last row, lm_head.
# tvm-cuda's conv runs across tokens and its scan in two kernels (time pieces: states, then the pieces), one
# kernel more a layer.
_TVM_CHUNK_KERNELS = {"mamba1": 7, "mamba2": 6}
_TVM_CUDA_CHUNK_KERNELS = {"mamba1": 8, "mamba2": 7}
_TVM_CHUNK_FIXED = 3
# Its matrix products walk K one tile at a time (in_proj, out_proj and, at fp16/int8, x_proj: WMMA tiles 32
# deep; dt_proj: TVM's dlight CUDA-core schedule, 16 deep), each step a global-to-shared round trip and a
# barrier; at chunk sizes one wave of tiles covers the output, so a product takes K/depth steps whatever t is.
_TVM_CUDA_KLOOP = {"in_proj": 32, "out_proj": 32, "x_proj": 32, "dt_proj": 16}
# The WMMA products' output tiles are 64 x 64 (kernels/tvm_prefill.py), 3 a core in one wave (3 x 132 SMs =
# 396), waves counted as tiles / 396 (at least 1): fitted on mamba-130m's 2,048-token profile (RESULTS.md TVM
# section "Prefill"): in_proj 1536 tiles in 80 µs = 4.4 x its 24 K steps, out_proj 384 tiles in 41 µs = 1.1 x
# its 48. dt_proj (dlight, CUDA cores): one wave (its tiling not modelled).
_TVM_CUDA_WAVE_TILES = {"in_proj": 64, "out_proj": 64, "x_proj": 64}
_TVM_CUDA_TILES_PER_CORE = 3
_TVM_PREFILL = ("measured on an H100 SXM: TVM's own prefill kernels on synthetic 2- and 8-layer Mamba-1 and Mamba-2 "
                "models (d_inner 2048, a shape no validated model has; benchmarks/gpu_tvm_prefill.py)")
_TVM_KSTEP = Figure(0.763e-6, f"{_TVM_PREFILL}: the matrix products' GPU time over their K-tile steps, 0.68-0.80 µs "
                              "by model")
_TVM_CHUNK_EXTRA = Figure(6.5e-6, f"{_TVM_PREFILL}: a prefill's wall time beyond its kernels' GPU time, per kernel "
                                  "(the VM launches each one, no CUDA graph): 9.3 µs (Mamba-1), 3.6 µs (Mamba-2)")
# tvm-cuda's prefill has no token-sequential kernels since git 0862449 (issue 7): the conv runs across tokens
# (a kernel in the chunk's count) and the scan in at most 32 time pieces, two passes (scan_states, scan_pieces)
# of one piece length each. Its step is fitted, per channel (d_inner) and step of one pass, on one model only:
# mamba-130m's 2,048-token prefill in one call (H100 SXM, torch profiler, RESULTS.md TVM section "Prefill":
# scan_pieces 141 + scan_states 60 µs a layer over 2 passes x 64 steps x 1536 channels); not re-probed.
_TVM_SCAN_PIECES = 32
_TVM_SCAN_PIECE_STEP = Figure(1.022e-9, "fitted on one model: mamba-130m's H100 per-kernel profile of issue 7's "
                                        "parallel prefill (RESULTS.md TVM section, git 0862449), 2,048 tokens in one "
                                        "call: scan_states 60 + scan_pieces 141 µs a layer / (2 passes x 64 steps x "
                                        "1536 channels); mamba2-130m (309 µs) and mamba-1.4b (499) held out")
# The conv (conv_out: blocks of 32 channels x 32 token groups, kernels/tvm_prefill.CONV_TOKEN_GROUPS; 48-128
# blocks at the validated shapes, fewer than the SMs) walks ceil(T / 32) tokens a thread, fitted on the same
# profile: mamba-130m's conv 46 µs a layer over 64 steps (mamba2-130m 47, mamba-1.4b 55 held out).
_TVM_CONV_GROUPS = 32
_TVM_CONV_GROUP_STEP = Figure(0.72e-6, "fitted on one model: mamba-130m's H100 per-kernel profile of issue 7's parallel "
                                       "prefill (RESULTS.md TVM section, git 0862449), 2,048 tokens in one call: "
                                       "conv_out 46 µs a layer / 64 steps; mamba2-130m (47) and mamba-1.4b (55) held "
                                       "out")
_TVM_SCAN_STEP = Figure(0.0, "no token-sequential conv or scan since git 0862449 (scan_piece_step_s instead)")

_TVM_GEMV = Figure(0.85, "measured: TVM's own matrix-vector kernels on an H100 (torch profiler, RESULTS.md TVM "
                         "section) stream 2.2 TB/s (mamba-1.4b in_proj) to 2.8 TB/s (lm_head) against a 2.95 TB/s "
                         "copy: 0.75-0.94")

# The native CPU engine (runtimes/native.py, kernels/cpu/emcpu.cc), ort-cpu's default engine. A decode
# step is a few thread-pool jobs a layer: conv and scan, and per linear layer one job (MatMulNBits
# weights, split by output rows; float weights with a side under 256, split by columns) or two (larger
# float weights, split by input rows, then the partial sums added); the head is one more. A prefill runs
# chunks of 128 rows (NativeBackend's max_rows, every format): norm, each linear, conv, scan (+ the gated
# norm of Mamba-2) one job each; each linear packs its weights into panels per chunk (float32 panels for
# float weights; with AVX-512 VNNI, 8- and 4-bit codes stay integers and meet the chunk's activations
# rounded per block to int16 / int8 in integer dot products, so gemm_efficiency.q8/.q4 are integer rates
# against the fp32 reference; without VNNI the rounded activations meet dequantized float32 panels).
# `edgemamba devices --probe` measures every figure below on the machine (probe_native.measure_native_costs:
# synthetic models through the engine's C API, which records the engine's kernels, em_model_isa). These
# defaults are the median of 6 such probes on this project's 2-core AMD EPYC (Zen 5, KVM) at 2 threads
# (engine of git 0f456cf, avx512_vnni kernels, weights in 2 MiB pages; 2026-11-22); efficiencies are the
# median engine rate against the median of that machine's probed references: 43.5 GB/s NumPy
# matrix-vector bandwidth (34.0-45.8 over the probes) and 375 GFLOP/s ONNX Runtime (MLAS, AVX-512) fp32
# rate (230-405, bimodal). The engine's own rates, beside each figure, moved less.
_NATIVE = ("measured: native engine (avx512_vnni kernels), synthetic models (probe_native), 6 probes, 2-core AMD "
           "EPYC Zen 5, 2 threads")
_NATIVE_COST = TargetCost(
    processor="cpu",
    launches_per_layer={"mamba1": 2, "mamba2": 2},
    launches_fixed=1,
    chunk_launches_per_layer={"mamba1": 7, "mamba2": 6},
    chunk_launches_fixed=1,
    launch_s=Figure(0.38e-6, f"{_NATIVE}: 0.34-0.46 µs a thread-pool job (dispatch, join) on a quiet machine; "
                             "1-230 µs when another process takes one of the two cores"),
    call_s=Figure(2.5e-6, f"{_NATIVE}: 2.3-3.8 µs, one step call beyond its jobs (ctypes, embedding row, final norm)"),
    scan_step_s=Figure(0.0, "the engine's scan is counted per state element (state_element_s)"),
    state_element_s=Figure(0.46e-9, f"{_NATIVE}: 0.45-0.64 ns per state element a token and layer, a Mamba-1 scan "
                                    "(an exp an element) with its conv and gates"),
    weight_read_efficiency=Figure(0.97, f"{_NATIVE}: float32 layer weights streamed by decode steps, 38-45 GB/s"),
    head_read_efficiency=Figure(1.03, f"{_NATIVE}: the float32 head (output-row split), 43-49 GB/s"),
    gemm_efficiency=Figure(1.00, f"{_NATIVE}: the 12x32 panel GEMM, float32 weights packed per chunk, "
                                 "366-436 GFLOP/s"),
    runtime_bytes=Figure(40 * MiB, "measured: 35 MiB resident set of a Session (Python, NumPy, the engine) on a "
                                   "2-layer d_model-64 artifact"),
    variants={
        "state_element_s.mamba2": Figure(0.034e-9, f"{_NATIVE}: 0.034-0.045 ns, a Mamba-2 scan (an exp a head)"),
        "weight_read_efficiency.f16": Figure(0.80, f"{_NATIVE}: float16 layer weights, 33-36 GB/s"),
        "weight_read_efficiency.q8": Figure(1.00, f"{_NATIVE}: 8-bit blocks (int16 dot products), 38-45 GB/s"),
        "weight_read_efficiency.q4": Figure(0.82, f"{_NATIVE}: 4-bit blocks (int8 dot products), 23-38 GB/s"),
        "head_read_efficiency.f16": Figure(1.01, f"{_NATIVE}: a float16 head, 41-49 GB/s"),
        "head_read_efficiency.q8": Figure(1.00, f"{_NATIVE}: an 8-bit head, 42-48 GB/s"),
        "gemm_efficiency.f16": Figure(1.07, f"{_NATIVE}: float16 weights packed into float32 panels, 385-480 GFLOP/s"),
        "gemm_efficiency.q8": Figure(1.23, f"{_NATIVE}: 8-bit codes x int16 activations (VNNI vpdpwssd), "
                                           "443-585 GFLOP/s"),
        "gemm_efficiency.q4": Figure(1.64, f"{_NATIVE}: 4-bit codes x int8 activations (VNNI vpdpbusd), "
                                           "576-842 GFLOP/s"),
    },
    launches_per_linear={"f32": 2, "f16": 2, "q8": 1, "q4": 1},
    split_linear_min=256,
    engine_chunk_rows={"f32": 128, "f16": 128, "q8": 128, "q4": 128},
    compute_dtype="fp32",  # every format's GEMM rate is gemm_efficiency[.FMT] x the fp32 rate (measured per format)
    roofline_scan=False,  # the scan is a loop of its own: state_element_s, measured
)

# Decode-step launches per layer: ort-cpu on ONNX Runtime counts the exporter's graph nodes (Constant nodes
# folded away); tensorrt counts its kernels (an estimate: norm, in_proj, conv, x_proj, dt_proj,
# scan update, gate, out_proj, residual); tvm-* count the TIR kernels of their step. Keys: targets
# (their default engine), and "target/engine" for another engine of a target (TARGET_ENGINES).
TARGET_COSTS: dict[str, TargetCost] = {
    "ort-cpu": _NATIVE_COST,
    "ort-cpu/ort": TargetCost(
        processor="cpu", graph_launches=True,
        launches_per_layer={"mamba1": 47, "mamba2": 52},
        launches_fixed=8,
        chunk_launches_per_layer={"mamba1": 47, "mamba2": 52},  # estimate: an artifact's prefill graph is counted
        chunk_launches_fixed=8,
        launch_s=Figure(0.7e-6, _ORT_NOTE + ": 0.4-1.0 µs per elementwise node"),
        call_s=Figure(5e-6, _ORT_NOTE + ": 4-7 µs per graph call"),
        scan_step_s=Figure(10e-6, _ORT_NOTE + ": 3-12 µs per ONNX Scan iteration on a quiet machine, 55-130 µs "
                                             "on the 2-core CI machine under load"),
        state_element_s=Figure(3.5e-9, _ORT_NOTE + ": 2.7-5 ns per state element through the 6 update nodes"),
        weight_read_efficiency=Figure(0.7, _ORT_NOTE + ": layer-sized MatMuls (prepacking off) against NumPy's "
                                                      "matrix-vector product, 0.73 at 1-2 threads, ~0.4 at 16"),
        head_read_efficiency=Figure(0.9, _ORT_NOTE + ": the head's Gemm(transB=1), 0.83-1.0"),
        gemm_efficiency=Figure(1.0, "measured: `devices --probe` measures the fp32 rate with ONNX Runtime itself"),
        runtime_bytes=est(128 * MiB, "Python, NumPy and ONNX Runtime resident set with a tiny model (measured ~140 MiB)"),
    ),
    "tensorrt": TargetCost(
        processor="gpu", graph_launches=True, launches_per_layer={"mamba1": 9, "mamba2": 10}, launches_fixed=4,
        chunk_launches_per_layer={"mamba1": 9, "mamba2": 10}, chunk_launches_fixed=4, launch_s=_CUDA_LAUNCH,
        call_s=est(20e-6, "enqueue + stream sync"), scan_step_s=est(0.0, "fused selective-scan plugin"),
        state_element_s=est(0.0, "fused: in the roofline"),
        weight_read_efficiency=est(0.9, "cuBLAS/TensorRT GEMV on large matrices"),
        head_read_efficiency=est(0.9, "cuBLAS/TensorRT GEMV on large matrices"),
        gemm_efficiency=est(1.0, "cuBLAS/TensorRT GEMM (the processor's efficiency covers it)"),
        runtime_bytes=est(800 * MiB, "CUDA context + TensorRT/cuBLAS kernels resident (about 0.6-1 GiB on Jetson)"),
    ),
    "tvm-cuda": TargetCost(
        processor="gpu", launches_per_layer=_TVM_KERNELS, launches_fixed=_TVM_FIXED,
        chunk_launches_per_layer=_TVM_CUDA_CHUNK_KERNELS, chunk_launches_fixed=_TVM_CHUNK_FIXED, launch_s=_GPU_KERNEL,
        call_s=_GPU_CALL, scan_step_s=_TVM_SCAN_STEP,
        state_element_s=est(0.0, "fused: in the roofline"),
        weight_read_efficiency=_TVM_GEMV, head_read_efficiency=_TVM_GEMV,
        gemm_efficiency=est(0.7, "tuned TVM GEMM against cuBLAS"),
        runtime_bytes=est(400 * MiB, "CUDA context + compiled module"),
        kloop_tiles=_TVM_CUDA_KLOOP, kloop_step_s=_TVM_KSTEP, chunk_launch_extra_s=_TVM_CHUNK_EXTRA,
        scan_pieces=_TVM_SCAN_PIECES, scan_piece_step_s=_TVM_SCAN_PIECE_STEP,
        conv_token_groups=_TVM_CONV_GROUPS, conv_group_step_s=_TVM_CONV_GROUP_STEP,
        kloop_wave_tiles=_TVM_CUDA_WAVE_TILES, kloop_tiles_per_core=_TVM_CUDA_TILES_PER_CORE,
    ),
    "tvm-llvm": TargetCost(
        processor="cpu", launches_per_layer=_TVM_KERNELS, launches_fixed=_TVM_FIXED,
        chunk_launches_per_layer=_TVM_CHUNK_KERNELS, chunk_launches_fixed=_TVM_CHUNK_FIXED,
        launch_s=est(1e-6, "one packed-function call per fused operator"), call_s=est(20e-6, "VM entry + binding"),
        scan_step_s=est(1e-6, "scan loop compiled into one operator"),
        state_element_s=est(0.0, "fused into one vectorized operator: in the roofline"),
        weight_read_efficiency=est(0.7, "LLVM-vectorized GEMV"),
        head_read_efficiency=est(0.7, "LLVM-vectorized GEMV"),
        gemm_efficiency=est(0.7, "tuned TVM GEMM against MLAS/OpenBLAS"),
        runtime_bytes=est(64 * MiB, "TVM runtime + compiled library"),
    ),
    "tvm-aarch64": TargetCost(
        processor="cpu", launches_per_layer=_TVM_KERNELS, launches_fixed=_TVM_FIXED,
        chunk_launches_per_layer=_TVM_CHUNK_KERNELS, chunk_launches_fixed=_TVM_CHUNK_FIXED,
        launch_s=est(2e-6, "one packed-function call per fused operator on a Cortex-A core"),
        call_s=est(40e-6, "VM entry + binding on a Cortex-A core"),
        scan_step_s=est(2e-6, "scan loop compiled into one operator"),
        state_element_s=est(0.0, "fused into one vectorized operator: in the roofline"),
        weight_read_efficiency=est(0.7, "LLVM-vectorized NEON GEMV"),
        head_read_efficiency=est(0.7, "LLVM-vectorized NEON GEMV"),
        gemm_efficiency=est(0.7, "tuned TVM GEMM against a BLAS"),
        runtime_bytes=est(64 * MiB, "TVM runtime + compiled library"),
    ),
}


# Targets that more than one engine runs, the default (what engine "auto" picks where it can) first.
TARGET_ENGINES = {"ort-cpu": ("native", "ort")}


def cost_key(target: str, engine: str | None = None) -> str:
    """The TARGET_COSTS key of `engine` running `target`: the target itself for its default engine."""
    engines = TARGET_ENGINES.get(target, ())
    if engine in (None, "", "auto", target) or not engines or engine == engines[0]:
        return target
    if engine not in engines:
        raise EdgeMambaError(f"engine {engine!r} does not run {target}; its engines: {', '.join(engines)}")
    return f"{target}/{engine}"


def target_cost(target: str) -> TargetCost:
    """A target's costs (its default engine), or another engine's as "target/engine"."""
    try:
        return TARGET_COSTS[target]
    except KeyError:
        known = ", ".join(t for t in TARGET_COSTS if "/" not in t)
        raise EdgeMambaError(f"unknown target {target!r}; known: {known}") from None


# ---------------------------------------------------------------------------------------------
# the profiles
# ---------------------------------------------------------------------------------------------
def _arm_a7x(cores: int, ghz: float) -> dict[str, Figure]:
    """Cortex-A76/A78: two 128-bit NEON FMA pipes -> 16 fp32, 32 fp16 flops and 64 int8 ops (SDOT) per cycle."""
    why = f"{cores} cores × {ghz} GHz × 2 NEON FMA pipes (16 fp32 / 32 fp16 / 64 int8-SDOT ops per cycle)"
    return {"fp32": est(cores * ghz * 16 * GIGA, why), "fp16": est(cores * ghz * 32 * GIGA, why),
            "int8": est(cores * ghz * 64 * GIGA, why)}


def _jetson(name: str, title: str, sheet: str, *, gib: int, usable_gib: float, bandwidth_gbs: float, cpu_cores: int,
            cpu_ghz: float, sms: int, gpu_mhz: int, int8_sparse_tops_gpu: float, int8_source: str, notes: str):
    memory = Figure(gib * GiB, sheet)
    usable = est(usable_gib * GiB, f"{gib} GiB minus carve-outs and Ubuntu + JetPack desktop "
                                   f"(~{gib - usable_gib:.1f} GiB); headless images leave ~1 GiB more")
    bandwidth = Figure(bandwidth_gbs * GB, sheet)
    int8_dense = int8_sparse_tops_gpu / 2 * TERA
    gpu = Processor(
        kind="gpu", name=f"{sms * 128}-core NVIDIA Ampere GPU, {sms * 4} Tensor Cores, {gpu_mhz} MHz", cores=sms,
        memory=memory, usable_memory=usable, bandwidth=bandwidth,
        bandwidth_efficiency=est(0.8, "GPU streaming reads on LPDDR5 reach ~80% of peak"),
        peak_ops={"fp32": est(sms * 128 * 2 * gpu_mhz * 1e6, f"{sms * 128} CUDA cores × 2 × {gpu_mhz} MHz"),
                  "fp16": est(int8_dense / 2, "half the dense INT8 Tensor Core rate (Ampere)"),
                  "int8": Figure(int8_dense, f"{int8_source}: {int8_sparse_tops_gpu:g} sparse INT8 TOPS (GPU), halved "
                                             "for dense")},
        compute_efficiency=est(0.6, "Tensor Core GEMM at chunk-sized M reaches ~60% of peak"),
    )
    cpu = Processor(
        kind="cpu", name=f"{cpu_cores}-core Arm Cortex-A78AE, {cpu_ghz} GHz", cores=cpu_cores, memory=memory,
        usable_memory=usable, bandwidth=bandwidth,
        bandwidth_efficiency=est(0.5, "the Orin CPU complex reaches about half of the LPDDR5 peak"),
        peak_ops=_arm_a7x(cpu_cores, cpu_ghz), compute_efficiency=est(0.5, "NEON GEMM in a portable runtime"),
    )
    return DeviceProfile(name, title, cpu, gpu, targets=("tensorrt", "tvm-cuda", "tvm-aarch64", "ort-cpu"),
                         precisions=("fp16", "int8", "w8a8", "int4", "fp32"), notes=notes)


def _dgpu(name: str, title: str, *, gpu_name: str, sms: int, sheet: str, gib: float, usable_gib: float,
          bandwidth_gbs: float, fp32_t: float, fp16_t: float, int8_t: float, dense_note: str, host: Processor,
          notes: str):
    return DeviceProfile(
        name, title, cpu=host,
        gpu=Processor(
            kind="gpu", name=gpu_name, cores=sms, memory=Figure(gib * GiB, sheet),
            usable_memory=est(usable_gib * GiB, "minus the CUDA context, driver reserve and (desktop) display"),
            bandwidth=Figure(bandwidth_gbs * GB, sheet),
            bandwidth_efficiency=est(0.85, "streaming reads reach 80-90% of GDDR6X/HBM3 peak"),
            peak_ops={"fp32": Figure(fp32_t * TERA, sheet), "fp16": Figure(fp16_t * TERA, f"{sheet} ({dense_note})"),
                      "int8": Figure(int8_t * TERA, f"{sheet} ({dense_note})")},
            compute_efficiency=est(0.6, "Tensor Core GEMM at chunk-sized M reaches ~60% of peak"),
        ),
        targets=("tensorrt", "tvm-cuda", "ort-cpu", "tvm-llvm"), precisions=("fp16", "int8", "w8a8", "int4", "fp32"),
        notes=notes,
    )


def _x86_host(name: str, cores: int, ghz: float, gib: int, usable_gib: int, channels: int, mts: int,
              why: str) -> Processor:
    avx = f"{cores} cores × {ghz} GHz × 2 256-bit FMA pipes (32 fp32 flops/cycle)"
    return Processor(
        kind="cpu", name=name, cores=cores, memory=est(gib * GiB, why),
        usable_memory=est(usable_gib * GiB, "minus the OS, desktop and other applications"),
        bandwidth=est(channels * 8 * mts * 1e6, f"{channels} × 64-bit DDR5-{mts} channels (JEDEC)"),
        bandwidth_efficiency=est(0.6, "all-core streaming reads on client DDR5 reach ~60% of peak"),
        peak_ops={"fp32": est(cores * ghz * 32 * GIGA, avx), "int8": est(cores * ghz * 128 * GIGA, avx + ", VNNI ×4")},
        compute_efficiency=est(0.5, "MLAS/LLVM GEMM at sustained all-core clocks"),
    )


_H100_SHEET = "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"
_ADA_SHEET = "NVIDIA Ada GPU Architecture whitepaper (GeForce RTX 4090)"
_RPI5 = "Raspberry Pi 5 product brief"

PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    _jetson("orin-nano-8gb", "NVIDIA Jetson Orin Nano 8GB", "NVIDIA Jetson Orin Nano Series Data Sheet", gib=8,
            usable_gib=5.5, bandwidth_gbs=68, cpu_cores=6, cpu_ghz=1.5, sms=8, gpu_mhz=625, int8_sparse_tops_gpu=40,
            int8_source="NVIDIA Jetson Orin Nano Series Data Sheet",
            notes="15 W mode figures; the 'Super' mode (JetPack 6.2, 25 W) raises bandwidth to 102 GB/s and the GPU "
                  "clock to 1020 MHz"),
    _jetson("orin-nx-16gb", "NVIDIA Jetson Orin NX 16GB", "NVIDIA Jetson Orin NX Series Data Sheet", gib=16,
            usable_gib=13.5, bandwidth_gbs=102.4, cpu_cores=8, cpu_ghz=2.0, sms=8, gpu_mhz=918,
            int8_sparse_tops_gpu=60, int8_source="estimate: 100 sparse INT8 TOPS (module, NVIDIA Jetson Orin NX Series "
                                                  "Data Sheet) minus 40 for the two DLAs",
            notes="25 W mode figures"),
    _jetson("agx-orin-64gb", "NVIDIA Jetson AGX Orin 64GB", "NVIDIA Jetson AGX Orin Series Data Sheet", gib=64,
            usable_gib=61, bandwidth_gbs=204.8, cpu_cores=12, cpu_ghz=2.2, sms=16, gpu_mhz=1300,
            int8_sparse_tops_gpu=170, int8_source="NVIDIA Jetson AGX Orin Series Data Sheet", notes="MAXN mode figures"),
    DeviceProfile(
        "rpi5-8gb", "Raspberry Pi 5 8GB",
        cpu=Processor(
            kind="cpu", name="4-core Arm Cortex-A76 (BCM2712), 2.4 GHz", cores=4, memory=Figure(8 * GiB, _RPI5),
            usable_memory=est(7 * GiB, "8 GiB minus Raspberry Pi OS with desktop (~1 GiB)"),
            bandwidth=est(17.1 * GB, f"32-bit LPDDR4X-4267 ({_RPI5}): 4267 MT/s × 4 bytes"),
            bandwidth_efficiency=est(0.6, "STREAM-like reads on the Pi 5 reach ~10 GB/s"),
            peak_ops=_arm_a7x(4, 2.4), compute_efficiency=est(0.5, "NEON GEMM in a portable runtime"),
        ),
        gpu=None, targets=("tvm-aarch64", "ort-cpu"), precisions=("int8", "w8a8", "int4", "fp16", "fp32"),
        notes="the VideoCore VII GPU is not a target",
    ),
    DeviceProfile(
        "x86-laptop", "Typical x86 laptop (8 cores, 16 GB DDR5-5600)",
        cpu=_x86_host("8-core x86-64 laptop CPU, AVX2 + VNNI, ~4 GHz", cores=8, ghz=4.0, gib=16, usable_gib=10,
                      channels=2, mts=5600, why="a typical 2024 laptop: 16 GB, dual-channel DDR5-5600"),
        gpu=None, targets=("ort-cpu", "tvm-llvm"), precisions=("fp32", "int8", "w8a8", "int4", "fp16"),
        notes="a composite of current 8-core laptop CPUs (e.g. Ryzen 7 7840U, Core Ultra 7 155H): every figure "
              "is an estimate; `edgemamba devices --probe` measures yours",
    ),
    _dgpu("rtx-4090", "NVIDIA GeForce RTX 4090 (desktop)", gpu_name="NVIDIA GeForce RTX 4090, 128 SMs", sms=128,
          sheet=_ADA_SHEET, gib=24, usable_gib=22.5, bandwidth_gbs=1008, fp32_t=82.6, fp16_t=165.2, int8_t=660.6,
          dense_note="dense Tensor Core rates; fp16 with fp32 accumulation", host=_x86_host("16-core desktop host CPU (estimate)", cores=16, ghz=4.5, gib=64, usable_gib=56, channels=2,
                         mts=5600, why="a typical desktop host: 64 GB dual-channel DDR5-5600"),
          notes="GeForce runs fp16 with fp32 accumulation at half the fp16-accumulation rate"),
    _dgpu("h100-sxm-80gb", "NVIDIA H100 SXM 80GB", gpu_name="NVIDIA H100 SXM5, 132 SMs", sms=132, sheet=_H100_SHEET,
          gib=80, usable_gib=78, bandwidth_gbs=3350, fp32_t=67, fp16_t=989.5, int8_t=1979,
          dense_note="the sparse Tensor Core figures halved for dense", host=_x86_host("16-core cloud host slice (estimate)", cores=16, ghz=3.0, gib=128, usable_gib=120,
                         channels=4, mts=4800, why="a typical cloud VM slice beside one H100: 128 GiB"),
          notes="one GPU of an HGX/DGX H100 board or a cloud VM"),
)}


def get_profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise EdgeMambaError(f"unknown device {name!r}; known: {', '.join(PROFILES)} "
                             "(or 'this' for this machine, or a profile JSON from `edgemamba devices --probe --json`)"
                             ) from None
