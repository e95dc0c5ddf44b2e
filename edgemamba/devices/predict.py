"""Predicted per-token latency and prefill throughput on a device profile.

A roofline plus the target's overheads:

    decode step   max(bytes / bandwidth, ops / peak) + launches · launch_s + call_s
    prefill chunk max(weight bytes / bandwidth, T · ops / peak) + launches · launch_s + call_s
                  + T · n_layer · scan_step_s          (a scan run as a loop of graph nodes)

where bandwidth and peak are what the processor achieves (datasheet peak × efficiency, or a
measurement from `edgemamba devices --probe`), and bytes are what one decode step streams: every
weight once (the tied embedding is read whole as the head; an untied embedding only one row) and
the state read and written. The workload comes from the ModelSpec at a precision, or from an
artifact's real weight files and graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from edgemamba.devices.fit import storage, weight_bytes
from edgemamba.devices.profiles import COMPUTE_DTYPE, DeviceProfile, target_cost
from edgemamba.spec import ModelSpec

# Files of an artifact that hold weights (the exporter's weights.bin, compiled engines).
WEIGHT_FILE_SUFFIXES = (".bin", ".engine", ".plan")


@dataclass(frozen=True)
class Workload:
    """What one decode step and one prefill token cost, independent of the device."""

    target: str
    precision: str
    n_layer: int
    weight_bytes: int  # all weights as stored
    step_bytes: int  # streamed per decode step: weights read + state read and written
    step_ops: float  # per decode step (a multiply-add counts 2)
    token_ops: float  # per prefill token, the head excluded (computed once per chunk)
    head_ops: float
    step_launches: int  # graph nodes / kernels per decode step
    chunk_launches: int  # graph nodes / kernels per prefill chunk, the scan loop excluded


def _ops_per_token(spec: ModelSpec) -> tuple[float, float]:
    """(layer ops per token, head ops): 2 per multiply-add of every projection, and the
    recurrence h' = exp(Δ·A)·h + Δ·x·B, y = h'·C at ~7 ops per state element."""
    mats = sum(math.prod(shape) for name, shape in spec.weight_shapes().items()
               if name.rsplit(".", 1)[-1] in ("in_proj", "x_proj", "dt_proj", "out_proj"))
    per_layer_elementwise = 7 * spec.d_inner * spec.d_state + 2 * spec.conv_dim * spec.d_conv + 12 * spec.d_inner \
        + 6 * spec.d_model
    return 2.0 * mats + spec.n_layer * per_layer_elementwise, 2.0 * spec.vocab_size * spec.d_model


def _streamed_fraction(spec: ModelSpec, precision: str) -> float:
    """Fraction of the stored weight bytes a decode step reads: an untied embedding contributes one row."""
    total = weight_bytes(spec, precision)
    if spec.tie_embeddings:
        return 1.0
    unused = storage(precision).matrix_bytes(spec.vocab_size - 1, spec.d_model)
    return (total - unused) / total


def workload(spec: ModelSpec, target: str, precision: str, *, weights: int | None = None,
             step_launches: int | None = None, chunk_launches: int | None = None) -> Workload:
    """From the spec at `precision`; `weights` (real weight-file bytes) and the launch counts of
    real graphs replace the estimates when known."""
    cost = target_cost(target)
    stored = weight_bytes(spec, precision) if weights is None else int(weights)
    layer_ops, head_ops = _ops_per_token(spec)
    per_layer = cost.launches_per_layer[spec.arch]
    default = per_layer * spec.n_layer + cost.launches_fixed
    return Workload(
        target=target, precision=precision, n_layer=spec.n_layer, weight_bytes=stored,
        step_bytes=int(stored * _streamed_fraction(spec, precision)) + 2 * spec.state_bytes(1),
        step_ops=layer_ops + head_ops, token_ops=layer_ops, head_ops=head_ops,
        step_launches=default if step_launches is None else step_launches,
        chunk_launches=default if chunk_launches is None else chunk_launches,
    )


def _graph_launches(path) -> int:
    """Nodes ONNX Runtime executes per call of a graph: Constants fold away; a Scan's body is
    counted by the scan term, not here."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type != "Constant" for node in graph.node)


def artifact_workload(artifact) -> Workload:
    """From an artifact: its real weight-file sizes, and its graphs' node counts where they are ONNX."""
    files = artifact.manifest["files"]
    weights = sum(info["bytes"] for name, info in files.items() if name.endswith(WEIGHT_FILE_SUFFIXES)) or None
    launches = {}
    for kind in ("step", "prefill"):
        path = artifact.file(kind)
        if path.suffix == ".onnx" and path.exists():
            launches[kind] = _graph_launches(path)
    return workload(artifact.spec, artifact.target, artifact.precision, weights=weights,
                    step_launches=launches.get("step"), chunk_launches=launches.get("prefill"))


@dataclass(frozen=True)
class Prediction:
    device: str
    target: str
    precision: str
    decode_ms: float
    decode_bound: str  # "bandwidth" or "compute": the larger roofline term
    decode_memory_ms: float
    decode_compute_ms: float
    decode_overhead_ms: float
    prefill_tokens_per_s: float
    prefill_tokens: int
    bandwidth_bytes_per_s: float  # achievable, as used
    ops_per_s: float  # achievable, as used
    step_bytes: int
    step_ops: float

    def to_dict(self) -> dict:
        return asdict(self)


def predict(work: Workload, profile: DeviceProfile, *, prompt_len: int = 512, chunk: int = 256) -> Prediction:
    proc = profile.processor(work.target)
    cost = target_cost(work.target)
    bandwidth = proc.achievable_bandwidth() * cost.weight_read_efficiency.value
    ops = proc.achievable_ops(COMPUTE_DTYPE[work.precision]) * cost.gemm_efficiency.value

    memory_s = work.step_bytes / bandwidth
    compute_s = work.step_ops / ops
    overhead_s = work.step_launches * cost.launch_s.value + cost.call_s.value

    prefill_s = 0.0
    for start in range(0, prompt_len, chunk):  # the Session feeds the prompt in chunks
        t = min(chunk, prompt_len - start)
        roof = max(work.weight_bytes / bandwidth, (t * work.token_ops + work.head_ops) / ops)
        prefill_s += roof + work.chunk_launches * cost.launch_s.value + cost.call_s.value \
            + t * work.n_layer * cost.scan_step_s.value
    return Prediction(
        device=profile.name, target=work.target, precision=work.precision,
        decode_ms=1e3 * (max(memory_s, compute_s) + overhead_s),
        decode_bound="bandwidth" if memory_s >= compute_s else "compute",
        decode_memory_ms=1e3 * memory_s, decode_compute_ms=1e3 * compute_s, decode_overhead_ms=1e3 * overhead_s,
        prefill_tokens_per_s=prompt_len / prefill_s, prefill_tokens=prompt_len,
        bandwidth_bytes_per_s=bandwidth, ops_per_s=ops, step_bytes=work.step_bytes, step_ops=work.step_ops,
    )
