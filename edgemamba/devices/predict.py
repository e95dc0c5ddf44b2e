"""Predicted per-token latency and prefill throughput on a device profile.

A roofline plus the overheads of the engine that runs the target:

    decode step    max(body bytes / bw + head bytes / bw_head, ops / peak)
                   + launches · launch_s + call_s + n_layer · state_elements · state_element_s
    prefill chunk  Σ over the engine's pieces of the chunk (T rows: the whole chunk, or 128-row pieces)
                     max(layer bytes / bw [+ head bytes / bw_head], (T · token ops [+ head ops]) / peak,
                         K-tile steps · waves · kloop_step_s)         [the head: once, with the last piece]
                     + launches · (launch_s + chunk_launch_extra_s)
                   + call_s + T · n_layer · (scan_step_s + state_elements · state_element_s)
                   + n_layer · (2 · piece length · d_inner · scan_piece_step_s
                                + ceil(T / conv_token_groups) · conv_group_step_s)

bw and peak are what the processor achieves (datasheet peak × efficiency, or a measurement from
`edgemamba devices --probe`) times the engine's own efficiency for the weights' storage format
(float32, float16, 8- or 4-bit blocks); body bytes are what one decode step streams besides the
head: every layer weight once and the state read and written; the head (the tied embedding, or
lm_head) is read whole once per step, and an untied embedding only one row. Launches are what the
engine dispatches: ONNX Runtime's graph nodes (ort-cpu with `--engine ort`, counted in the artifact's
graphs), the native CPU engine's thread-pool jobs (ort-cpu's default: a few a layer, by the weights'
format), a GPU target's kernels. The state_element terms are the recurrence where it is not in the
roofline: ONNX Runtime's separate elementwise nodes, the native engine's scan (per state element,
with its conv and gates; its ops then leave the roofline: `roofline_scan`); fused GPU kernels have
them at 0. scan_step_s is a scan that walks the chunk token by
token (ONNX Scan iterations; tvm-cuda's conv and scan before git 0862449); scan_piece_step_s a scan
split in time into at most scan_pieces pieces (tvm-cuda's scan_states and scan_pieces: each walks one
piece length, ceil(T / pieces) rounded up to 16, with d_inner channels a step); conv_group_step_s a
conv whose threads walk the chunk in conv_token_groups strides (tvm-cuda's conv_out). Products whose K loop bounds them at
chunk sizes (a target's kloop_tiles) take their K-tile steps once per wave of output tiles: one wave
at Session chunk sizes, more for long chunks (kloop_wave_tiles: tvm-cuda's 64 x 64 WMMA tiles, 3 a core). The workload comes from the ModelSpec at a precision, or from an artifact's real weight files and
graphs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from edgemamba.devices.fit import MATRICES, storage, weight_bytes, weight_formats
from edgemamba.devices.profiles import COMPUTE_DTYPE, TARGET_ENGINES, DeviceProfile, cost_key, target_cost
from edgemamba.spec import ModelSpec

# Files of an artifact that hold weights (the exporter's weights.bin, compiled engines).
WEIGHT_FILE_SUFFIXES = (".bin", ".engine", ".plan")


@dataclass(frozen=True)
class Workload:
    """What one decode step and one prefill token cost, independent of the device."""

    target: str
    precision: str
    n_layer: int
    state_elements: int  # per layer: d_inner · d_state (Mamba-2: n_heads · head_dim · d_state, the same)
    weight_bytes: int  # all weights as stored
    head_bytes: int  # the (vocab, d_model) head as stored, read whole once per decode step and per chunk
    body_bytes: int  # the rest a decode step streams: layer weights, one embedding row, the state read + written
    token_ops: float  # per token, the head excluded (a multiply-add counts 2)
    head_ops: float  # the head, once per decode step and per prefill chunk
    step_launches: int  # graph nodes / kernels / thread-pool jobs per decode step
    chunk_launches: int  # ... per prefill chunk (the engine's piece of one), the scan loop excluded
    chunk_ksteps: int = 0  # K-tile steps of the prefill's latency-bound products a chunk (the target's kloop_tiles)
    arch: str = "mamba1"
    # per product with waves of output tiles (the target's kloop_wave_tiles): (K-tile steps over all
    # layers, output columns N, tile side); chunk_ksteps holds their steps for one wave
    chunk_waves: tuple = ()
    channels: int = 0  # d_inner: what a scan in time pieces walks per step
    engine: str = ""  # what runs the target: "native" or "ort" for ort-cpu ("": its only engine)
    layer_format: str = "f32"  # storage of the layer matrices (profiles.FORMATS)
    head_format: str = "f32"  # ... and of the head
    matrix_ops: float = 0.0  # the part of token_ops in the layer projections

    @property
    def step_bytes(self) -> int:
        return self.body_bytes + self.head_bytes

    @property
    def step_ops(self) -> float:
        return self.token_ops + self.head_ops


def matrix_ops(spec: ModelSpec) -> float:
    """Per token: 2 per multiply-add of every layer projection (the head excluded)."""
    return 2.0 * sum(math.prod(shape) for name, shape in spec.weight_shapes().items()
                     if name.rsplit(".", 1)[-1] in MATRICES)


def _token_ops(spec: ModelSpec) -> float:
    """The layer projections, the recurrence h' = exp(Δ·A)·h + Δ·x·B, y = h'·C at ~7 ops per state
    element, and the conv, gates and norms."""
    per_layer = 7 * spec.d_inner * spec.d_state + 2 * spec.conv_dim * spec.d_conv + 12 * spec.d_inner + 6 * spec.d_model
    return matrix_ops(spec) + spec.n_layer * per_layer


def scan_piece_length(t: int, pieces: int) -> int:
    """Tokens one piece of a scan split in time into at most `pieces` pieces walks (a multiple of 16, as
    kernels/tvm_prefill.ScanChunkSpec.pieces splits it); 0 when pieces is 0 (no such scan)."""
    return 0 if not pieces else (max(-(-t // pieces), 16) + 15) // 16 * 16


def kloop_steps(spec: ModelSpec, tiles: dict[str, int]) -> int:
    """K-tile steps of a prefill chunk's products: ceil(K / depth) for each layer weight named in
    `tiles` (K: the weight's last axis, as torch stores W (N, K)), over all layers."""
    shapes = spec.weight_shapes()
    per_layer = sum(-(-shapes[f"layers.0.{name}"][-1] // depth) for name, depth in tiles.items()
                    if f"layers.0.{name}" in shapes)
    return spec.n_layer * per_layer


def kloop_waves(spec: ModelSpec, tiles: dict[str, int], sides: dict[str, int]) -> tuple:
    """(K-tile steps over all layers, output columns N, tile side) of each product in both `tiles` and
    `sides` (W (N, K) as torch stores it)."""
    shapes = spec.weight_shapes()
    return tuple((spec.n_layer * -(-shapes[f"layers.0.{n}"][-1] // tiles[n]), shapes[f"layers.0.{n}"][0], side)
                 for n, side in sides.items() if n in tiles and f"layers.0.{n}" in shapes)


def kloop_time(work: Workload, rows: int, step_s: float, wave: int) -> float:
    """The K loops of a chunk of `rows` tokens: every product's K-tile steps, times the waves of its output
    tiles (`wave` tiles at once, tiles / wave and at least 1; 0: one wave) for those in chunk_waves."""
    extra = 0.0
    if wave:  # waves as a fraction (tiles / wave, at least 1): a partial wave's tiles share the cores
        for steps, n, side in work.chunk_waves:
            extra += steps * (max(1.0, -(-rows // side) * -(-n // side) / wave) - 1.0)
    return (work.chunk_ksteps + extra) * step_s


def workload(spec: ModelSpec, target: str, precision: str, *, engine: str | None = None, weights: int | None = None,
             step_launches: int | None = None, chunk_launches: int | None = None) -> Workload:
    """From the spec at `precision`, run by `engine` (the target's default when None); `weights`
    (real weight-file bytes) and the launch counts of real graphs replace the estimates when known."""
    key = cost_key(target, engine)
    cost = target_cost(key)
    layer_format, head_format = weight_formats(precision)
    st = storage(precision)
    estimated = weight_bytes(spec, precision)
    scale = 1.0 if weights is None else weights / estimated  # spread real file bytes over the parts
    head = st.head_bytes(spec.vocab_size, spec.d_model)
    table = st.tables_bytes(spec) - head  # an embedding stored apart from the head (0: one table serves both)
    unread = max(0, table - st.embedding_bytes(1, spec.d_model))  # a step gathers one row of it
    per_linear = cost.launches_per_linear.get(layer_format, 0)
    linears = sum(per_linear if min(shape) >= cost.split_linear_min else min(per_linear, 1)
                  for name, shape in spec.weight_shapes().items()
                  if name.startswith("layers.0.") and name.rsplit(".", 1)[-1] in MATRICES)
    default = (cost.launches_per_layer[spec.arch] + linears) * spec.n_layer + cost.launches_fixed
    default_chunk = cost.chunk_launches_per_layer[spec.arch] * spec.n_layer + cost.chunk_launches_fixed
    return Workload(
        target=target, precision=precision, n_layer=spec.n_layer, state_elements=spec.d_inner * spec.d_state,
        weight_bytes=int(estimated * scale), head_bytes=int(head * scale),
        body_bytes=int((estimated - head - unread) * scale) + 2 * spec.state_bytes(1),
        token_ops=_token_ops(spec), head_ops=2.0 * spec.vocab_size * spec.d_model,
        step_launches=default if step_launches is None else step_launches,
        chunk_launches=default_chunk if chunk_launches is None else chunk_launches,
        chunk_ksteps=kloop_steps(spec, cost.kloop_tiles), chunk_waves=kloop_waves(spec, cost.kloop_tiles,
                                                                                  cost.kloop_wave_tiles),
        arch=spec.arch, channels=spec.d_inner, engine=key.partition("/")[2] or TARGET_ENGINES.get(target, ("",))[0],
        layer_format=layer_format, head_format=head_format, matrix_ops=matrix_ops(spec),
    )


def _graph_launches(path) -> int:
    """Nodes ONNX Runtime executes per call of a graph: Constants fold away; a Scan's body is
    counted by the scan term, not here."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type != "Constant" for node in graph.node)


def artifact_engine(artifact, engine: str | None = "auto") -> str:
    """The engine that runs an artifact, as a Session given `engine` picks it ("auto": the target's
    default engine where it runs the artifact's precision and state, else the next one); "" for a
    target with one engine."""
    engines = TARGET_ENGINES.get(artifact.target)
    if not engines:
        return ""
    if engine not in (None, "", "auto"):
        cost_key(artifact.target, engine)  # refuses an engine the target does not have
        return engine
    from edgemamba.runtimes.native import NATIVE_PRECISIONS

    float_state = all(e["dtype"] == "float32" for e in artifact.manifest["state"])
    return engines[0] if artifact.precision in NATIVE_PRECISIONS and float_state else engines[1]


def artifact_workload(artifact, engine: str | None = "auto") -> Workload:
    """From an artifact: its real weight-file sizes, and, for an engine that runs its ONNX graphs node
    by node, their node counts."""
    engine = artifact_engine(artifact, engine)
    files = artifact.manifest["files"]
    weights = sum(info["bytes"] for name, info in files.items() if name.endswith(WEIGHT_FILE_SUFFIXES)) or None
    launches = {}
    step_kernels = (artifact.manifest.get("tvm") or {}).get("step_launches")
    if step_kernels:  # a compiled library's own count (tvm-cuda on sm_90+: x_proj fused into in_proj)
        launches["step"] = int(step_kernels)
    for kind in ("step", "prefill") if target_cost(cost_key(artifact.target, engine)).graph_launches else ():
        if kind not in artifact.manifest["graphs"]:  # a compiled library (tvm-*): the target's kernel counts
            continue
        path = artifact.file(kind)
        if path.suffix == ".onnx" and path.exists():
            launches[kind] = _graph_launches(path)
    return workload(artifact.spec, artifact.target, artifact.precision, engine=engine, weights=weights,
                    step_launches=launches.get("step"), chunk_launches=launches.get("prefill"))


@dataclass(frozen=True)
class Prediction:
    device: str
    target: str
    precision: str
    engine: str  # "native" or "ort" for ort-cpu; "" for a target with one engine
    decode_ms: float
    decode_bound: str  # "bandwidth" or "compute": the larger roofline term
    decode_memory_ms: float
    decode_compute_ms: float
    decode_overhead_ms: float  # launches, the call, and an unfused state update
    prefill_tokens_per_s: float
    prefill_tokens: int
    bandwidth_bytes_per_s: float  # achievable, as used (layer weights)
    ops_per_s: float  # achievable, as used
    step_bytes: int
    step_ops: float

    def to_dict(self) -> dict:
        return asdict(self)


def predict(work: Workload, profile: DeviceProfile, *, prompt_len: int = 512, chunk: int = 256) -> Prediction:
    proc = profile.processor(work.target)
    cost = profile.cost(work.target, work.engine)
    bandwidth = proc.achievable_bandwidth() * cost.figure("weight_read_efficiency", work.layer_format).value
    head_bandwidth = proc.achievable_bandwidth() * cost.figure("head_read_efficiency", work.head_format).value
    ops = (proc.achievable_ops(cost.compute_dtype or COMPUTE_DTYPE[work.precision])
           * cost.figure("gemm_efficiency", work.layer_format).value)
    state_s = work.n_layer * work.state_elements * cost.figure("state_element_s", work.arch).value  # per token
    token_ops = work.token_ops if cost.roofline_scan else work.matrix_ops  # else the scan is all in state_s

    memory_s = work.body_bytes / bandwidth + work.head_bytes / head_bandwidth
    compute_s = (token_ops + work.head_ops) / ops
    overhead_s = work.step_launches * cost.launch_s.value + cost.call_s.value + state_s

    scan_s = work.n_layer * cost.figure("scan_step_s", work.arch).value + state_s  # per prefill token
    wave = cost.kloop_tiles_per_core * (proc.cores or 0)  # output tiles a wave of the GPU's cores runs
    chunk_launch_s = cost.launch_s.value + cost.chunk_launch_extra_s.value
    layer_bytes = work.weight_bytes - work.head_bytes
    prefill_s = 0.0
    for start in range(0, prompt_len, chunk):  # the Session feeds the prompt in chunks
        t = min(chunk, prompt_len - start)
        rows = cost.engine_chunk_rows.get(work.layer_format) or t  # ... and the engine runs each in pieces
        for first in range(0, t, rows):
            r, last = min(rows, t - first), first + rows >= t  # the logits: the last piece's last row
            roof = max(layer_bytes / bandwidth + (work.head_bytes / head_bandwidth if last else 0.0),
                       (r * token_ops + (work.head_ops if last else 0.0)) / ops,
                       kloop_time(work, r, cost.kloop_step_s.value, wave))
            prefill_s += roof + work.chunk_launches * chunk_launch_s
        prefill_s += cost.call_s.value + t * scan_s + work.n_layer * 2 * scan_piece_length(t, cost.scan_pieces) * (
            work.channels * cost.figure("scan_piece_step_s", work.arch).value)
        if cost.conv_token_groups:
            prefill_s += work.n_layer * -(-t // cost.conv_token_groups) * cost.conv_group_step_s.value
    return Prediction(
        device=profile.name, target=work.target, precision=work.precision, engine=work.engine,
        decode_ms=1e3 * (max(memory_s, compute_s) + overhead_s),
        decode_bound="bandwidth" if memory_s >= compute_s else "compute",
        decode_memory_ms=1e3 * memory_s, decode_compute_ms=1e3 * compute_s, decode_overhead_ms=1e3 * overhead_s,
        prefill_tokens_per_s=prompt_len / prefill_s, prefill_tokens=prompt_len,
        bandwidth_bytes_per_s=bandwidth, ops_per_s=ops, step_bytes=work.step_bytes, step_ops=token_ops + work.head_ops,
    )
