"""Does a model fit a device? Weights + state + workspace against the memory left after the OS.

Weights are counted per precision from the ModelSpec (or taken from an artifact's real files):
matrices (in_proj, x_proj, dt_proj, out_proj) and the embedding / lm_head at the precision's
storage, with their scales; the small per-channel tensors (norms, conv, A, D, dt_bias, biases)
stay float32 in every precision, as does the state (DESIGN.md, numerics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgemamba.devices.profiles import GiB, MiB, PRECISIONS, DeviceProfile, target_cost
from edgemamba.errors import EdgeMambaError
from edgemamba.spec import ModelSpec

MATRICES = ("in_proj", "x_proj", "dt_proj", "out_proj")
EMBEDDINGS = ("embedding", "lm_head")


@dataclass(frozen=True)
class Storage:
    """How one precision stores a weight matrix (out, in): `bits` per weight, in blocks of `group`
    inputs (the input axis padded to whole blocks) with a `scale_bytes` scale each; group 0: one
    scale per output row. `embedding` / `head`: how the gathered table and the head are stored, if
    differently (a tied table stored two ways is stored twice); `float_kinds`: matrices kept in
    float32; `rotation`: a float32 Hadamard block (the largest power of two dividing d_inner, at most
    64) is stored too."""

    bits: int
    group: int = 0
    scale_bytes: int = 0
    embedding: Storage | None = None
    head: Storage | None = None
    float_kinds: tuple[str, ...] = ()
    rotation: bool = False

    def matrix_bytes(self, rows: int, cols: int) -> int:
        if self.group == 0:
            return rows * cols * self.bits // 8 + rows * self.scale_bytes
        return rows * math.ceil(cols / self.group) * (self.group * self.bits // 8 + self.scale_bytes)

    def embedding_bytes(self, rows: int, cols: int) -> int:
        return (self.embedding or self).matrix_bytes(rows, cols)

    def head_bytes(self, rows: int, cols: int) -> int:
        return (self.head or self.embedding or self).matrix_bytes(rows, cols)

    def tables_bytes(self, spec) -> int:
        """The embedding and the head: one table when tied and stored one way."""
        table = self.embedding_bytes(spec.vocab_size, spec.d_model)
        head = self.head_bytes(spec.vocab_size, spec.d_model)
        return table + head if (head != table or not spec.tie_embeddings) else table


# Mirrors edgemamba's own formats (passes/pipelines.py; tests/test_devices.py checks the two agree):
# int8 and int4 are MatMulNBits blocks of 64 with float32 scales, int4 keeps an int8 head;
# W8A8 stores int8 weights (the rotated out_proj too) with a float32 scale and an int8 zero point per
# output channel, and stores the head that way apart from an int8 gather table in blocks of 128.
STORAGE: dict[str, Storage] = {
    "fp32": Storage(32),
    "fp16": Storage(16),
    "int8": Storage(8, 64, 4),
    "int4": Storage(4, 64, 4, embedding=Storage(8, 64, 4)),
    "w8a8": Storage(8, 0, 5, embedding=Storage(8, 128, 4), head=Storage(8, 0, 5), rotation=True),
}
assert set(STORAGE) == set(PRECISIONS)


def storage(precision: str) -> Storage:
    try:
        return STORAGE[precision]
    except KeyError:
        raise EdgeMambaError(f"unknown precision {precision!r}; known: {', '.join(STORAGE)}") from None


def weight_formats(precision: str) -> tuple[str, str]:
    """How `precision` stores the layer matrices and the head, as profiles.FORMATS names: "f32", "f16",
    "q8" / "q4" (MatMulNBits blocks), "w8" (per-channel int8)."""
    def name(st: Storage) -> str:
        return {32: "f32", 16: "f16", 4: "q4"}.get(st.bits) or ("q8" if st.group else "w8")

    st = storage(precision)
    return name(st), name(st.head or st.embedding or st)


def weight_bytes(spec: ModelSpec, precision: str) -> int:
    """Bytes of all weights stored at `precision` (scales included)."""
    st = storage(precision)
    block = min(64, spec.d_inner & -spec.d_inner)  # the largest power of two dividing d_inner
    total = st.tables_bytes(spec) + (4 * block**2 if st.rotation else 0)
    for name, shape in spec.weight_shapes().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in MATRICES and leaf not in st.float_kinds:
            total += st.matrix_bytes(*shape)
        elif leaf not in EMBEDDINGS:
            total += 4 * math.prod(shape)
    return total


def activation_bytes(spec: ModelSpec, chunk: int) -> int:
    """float32 activations live during a prefill chunk: one layer's tensors (residual, normed
    input, in_proj output, conv output, x_proj output, Δ, Δ·x, y) twice over for producer and
    consumer, plus the logits."""
    per_token = 3 * spec.d_model + spec.in_proj_dim + 4 * spec.d_inner + spec.dt_rank + 2 * spec.d_state
    return 2 * 4 * chunk * per_token + 2 * 4 * spec.vocab_size


def workspace_bytes(spec: ModelSpec, target: str, chunk: int = 256) -> int:
    """The runtime's own resident memory plus the activations of a prefill chunk."""
    return int(target_cost(target).runtime_bytes.value) + activation_bytes(spec, chunk)


def _gib(n: float) -> str:
    # One unit throughout a fit message, so its numbers compare at a glance.
    if n >= 0.1 * GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB" if n >= 0.1 * MiB else f"{n / 1024:.1f} KiB"


@dataclass(frozen=True)
class Fit:
    model: str
    device: str
    target: str
    precision: str
    weight_bytes: int
    state_bytes: int
    workspace_bytes: int
    usable_bytes: int
    alternatives: dict[str, int]  # other precisions this device runs -> their total bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.state_bytes + self.workspace_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.total_bytes - self.usable_bytes)

    @property
    def fitting_precisions(self) -> list[str]:
        """Precisions that would fit, largest (most accurate) first."""
        order = list(self.alternatives)  # the device's preference breaks ties (int8 before w8a8)
        ok = [p for p, b in self.alternatives.items() if b <= self.usable_bytes]
        return sorted(ok, key=lambda p: (-self.alternatives[p], order.index(p)))

    def message(self) -> str:
        head = (f"{self.model} in {self.precision} needs {_gib(self.total_bytes)} on {self.device} ({self.target}): "
                f"weights {_gib(self.weight_bytes)} + state {_gib(self.state_bytes)} + workspace "
                f"{_gib(self.workspace_bytes)}, and {_gib(self.usable_bytes)} is usable")
        if self.fits:
            return f"{head}: fits with {_gib(self.usable_bytes - self.total_bytes)} to spare"
        fitting = self.fitting_precisions
        if fitting:
            hint = "would fit: " + ", ".join(f"{p} ({_gib(self.alternatives[p])})" for p in fitting)
        else:
            hint = "no precision this device runs would fit"
        return f"{head}: {_gib(self.shortfall_bytes)} short; {hint}"

    def to_dict(self) -> dict:
        return {"model": self.model, "device": self.device, "target": self.target, "precision": self.precision,
                "weight_bytes": self.weight_bytes, "state_bytes": self.state_bytes,
                "workspace_bytes": self.workspace_bytes, "total_bytes": self.total_bytes,
                "usable_bytes": self.usable_bytes, "fits": self.fits, "shortfall_bytes": self.shortfall_bytes,
                "fitting_precisions": self.fitting_precisions}


def describe_model(spec: ModelSpec) -> str:
    kind = {"mamba1": "Mamba-1", "mamba2": "Mamba-2"}[spec.arch]
    n = spec.n_params
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    return f"a {size}-parameter {kind} model"


def check_fit(spec: ModelSpec, profile: DeviceProfile, target: str, precision: str, *, batch: int = 1,
              weights: int | None = None) -> Fit:
    """`weights`: real weight bytes (an artifact's files) instead of the spec's estimate."""
    proc = profile.processor(target)
    state = spec.state_bytes(batch)
    work = workspace_bytes(spec, target)
    alternatives = {p: weight_bytes(spec, p) + state + work for p in profile.precisions if p != precision}
    return Fit(model=describe_model(spec), device=profile.title, target=target, precision=precision,
               weight_bytes=weight_bytes(spec, precision) if weights is None else int(weights), state_bytes=state,
               workspace_bytes=work, usable_bytes=int(proc.usable_memory.value), alternatives=alternatives)


def require_fit(spec: ModelSpec, profile: DeviceProfile, target: str, precision: str, **kw) -> Fit:
    """check_fit, raising EdgeMambaError with the fit message when the model does not fit."""
    fit = check_fit(spec, profile, target, precision, **kw)
    if not fit.fits:
        raise EdgeMambaError(fit.message())
    return fit
