"""ModelSpec: the one canonical description of a Mamba model.

Every loader maps its checkpoint onto a ModelSpec; nothing downstream reads a raw config file.
Sizes follow the glossary in DESIGN.md (d_model, d_inner, d_state, d_conv, dt_rank, n_heads,
head_dim, n_groups).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

from edgemamba.errors import EdgeMambaError

ARCHS = ("mamba1", "mamba2")


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # "mamba1" (Mamba, Falcon-Mamba) or "mamba2"
    d_model: int
    n_layer: int
    vocab_size: int  # rows of the embedding = width of the logits (padded vocabularies included)
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int = 0  # Mamba-1 only
    n_heads: int = 0  # Mamba-2 only
    head_dim: int = 0  # Mamba-2 only
    n_groups: int = 1  # Mamba-2 only
    norm_eps: float = 1e-5
    use_bias: bool = False  # in_proj / out_proj bias
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    dt_limit: tuple[float, float] = (0.0, math.inf)  # Δ is clamped to this range after softplus
    bcdt_rms_eps: float | None = None  # Falcon-Mamba: weightless RMSNorm of B, C and Δ
    norm_before_gate: bool = False  # Mamba-2 gated RMSNorm: norm(y)·silu(z) instead of norm(y·silu(z))
    eos_token_id: int | None = None
    source: str = field(default="", compare=False)  # "hf:mamba", "mamba_ssm:Mamba2", ...

    def __post_init__(self):
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, what: str):
            if not cond:
                raise EdgeMambaError(f"invalid model spec: {what}")

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x) -> bool:
            return (is_int(x) or isinstance(x, float)) and not math.isnan(x)

        # Types first: a hand-edited manifest must not reach the comparisons below with a string.
        need(isinstance(self.arch, str) and self.arch in ARCHS, f"arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        for name in ("d_model", "n_layer", "vocab_size", "d_inner", "d_state", "d_conv"):
            value = getattr(self, name)
            need(is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        for name in ("dt_rank", "n_heads", "head_dim", "n_groups"):
            value = getattr(self, name)
            need(is_int(value) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
        for name in ("use_bias", "use_conv_bias", "residual_in_fp32", "tie_embeddings", "norm_before_gate"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        need(is_real(self.norm_eps) and math.isfinite(self.norm_eps), f"norm_eps must be a number, got {self.norm_eps!r}")
        need(isinstance(self.dt_limit, tuple) and len(self.dt_limit) == 2 and all(map(is_real, self.dt_limit)),
             f"dt_limit must be a pair of numbers, got {self.dt_limit!r}")
        need(self.bcdt_rms_eps is None or (is_real(self.bcdt_rms_eps) and 0 < self.bcdt_rms_eps < math.inf),
             f"bcdt_rms_eps must be a positive number or null, got {self.bcdt_rms_eps!r}")
        need(self.eos_token_id is None or is_int(self.eos_token_id), f"eos_token_id must be an integer, got {self.eos_token_id!r}")
        need(isinstance(self.source, str), f"source must be a string, got {self.source!r}")
        # Sizes a crafted config could inflate: refuse before anything is allocated from them.
        need(self.d_model <= 65536 and self.d_inner <= 262144, "d_model/d_inner are implausibly large")
        need(self.n_layer <= 1024 and self.vocab_size <= 4_194_304, "n_layer/vocab_size are implausibly large")
        need(self.d_state <= 1024 and self.d_conv <= 64, "d_state/d_conv are implausibly large")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        lo, hi = self.dt_limit
        need(0.0 <= lo < hi, f"dt_limit must satisfy 0 <= min < max, got {self.dt_limit}")
        if self.arch == "mamba1":
            need(self.dt_rank > 0, f"dt_rank must be positive for mamba1, got {self.dt_rank}")
        else:
            need(self.n_heads > 0 and self.head_dim > 0, "mamba2 needs n_heads and head_dim")
            need(
                self.n_heads * self.head_dim == self.d_inner,
                f"n_heads × head_dim ({self.n_heads}×{self.head_dim}) must equal d_inner ({self.d_inner})",
            )
            need(
                self.n_groups > 0 and self.n_heads % self.n_groups == 0,
                f"n_heads ({self.n_heads}) must be a multiple of n_groups ({self.n_groups})",
            )
        if self.eos_token_id is not None:
            need(0 <= self.eos_token_id < self.vocab_size, f"eos_token_id {self.eos_token_id} outside the vocabulary")

    # ---- derived sizes ------------------------------------------------------------------------
    @property
    def conv_dim(self) -> int:
        """Channels that pass through the causal conv: x for Mamba-1, x‖B‖C for Mamba-2."""
        if self.arch == "mamba1":
            return self.d_inner
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def in_proj_dim(self) -> int:
        if self.arch == "mamba1":
            return 2 * self.d_inner  # x ‖ z
        return self.d_inner + self.conv_dim + self.n_heads  # z ‖ xBC ‖ dt

    def conv_state_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The last d_conv-1 conv inputs: (b, conv_dim, d_conv-1)."""
        return (batch, self.conv_dim, self.d_conv - 1)

    def ssm_state_shape(self, batch: int = 1) -> tuple[int, ...]:
        if self.arch == "mamba1":
            return (batch, self.d_inner, self.d_state)
        return (batch, self.n_heads, self.head_dim, self.d_state)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical weight names and shapes (linear weights in (out, in) layout, as in torch)."""
        d, e, n = self.d_model, self.d_inner, self.d_state
        shapes: dict[str, tuple[int, ...]] = {"embedding": (self.vocab_size, d), "norm_f": (d,)}
        if not self.tie_embeddings:
            shapes["lm_head"] = (self.vocab_size, d)
        for i in range(self.n_layer):
            p = f"layers.{i}."
            shapes[p + "norm"] = (d,)
            shapes[p + "in_proj"] = (self.in_proj_dim, d)
            if self.use_bias:
                shapes[p + "in_proj_bias"] = (self.in_proj_dim,)
            shapes[p + "conv_weight"] = (self.conv_dim, self.d_conv)
            if self.use_conv_bias:
                shapes[p + "conv_bias"] = (self.conv_dim,)
            if self.arch == "mamba1":
                shapes[p + "x_proj"] = (self.dt_rank + 2 * n, e)
                shapes[p + "dt_proj"] = (e, self.dt_rank)
                shapes[p + "dt_bias"] = (e,)
                shapes[p + "A_log"] = (e, n)
                shapes[p + "D"] = (e,)
            else:
                shapes[p + "dt_bias"] = (self.n_heads,)
                shapes[p + "A_log"] = (self.n_heads,)
                shapes[p + "D"] = (self.n_heads,)
                shapes[p + "gate_norm"] = (e,)
            shapes[p + "out_proj"] = (d, e)
            if self.use_bias:
                shapes[p + "out_proj_bias"] = (d,)
        return shapes

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.weight_shapes().values())

    def weight_bytes(self, bytes_per_param: float = 4.0) -> int:
        return int(self.n_params * bytes_per_param)

    def state_bytes(self, batch: int = 1, bytes_per_element: int = 4) -> int:
        """Bytes of the recurrent state of `batch` sequences: constant in context length."""
        per_layer = math.prod(self.conv_state_shape(batch)) + math.prod(self.ssm_state_shape(batch))
        return self.n_layer * per_layer * bytes_per_element

    # ---- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # JSON has no infinity: an unbounded dt_limit is written as null.
        d["dt_limit"] = [None if math.isinf(x) else x for x in self.dt_limit]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        if not isinstance(d, dict):
            raise EdgeMambaError(f"invalid model spec: expected an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EdgeMambaError(f"invalid model spec: unknown field(s) {', '.join(map(repr, unknown))}")
        d = dict(d)
        if "dt_limit" in d:
            limit = d["dt_limit"]
            if not isinstance(limit, list) or len(limit) != 2 or not all(
                    x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in limit):
                raise EdgeMambaError(f"invalid model spec: dt_limit must be [min, max or null], got {limit!r}")
            lo, hi = limit
            d["dt_limit"] = (float(lo or 0.0), math.inf if hi is None else float(hi))
        try:
            return cls(**d)
        except TypeError as e:
            raise EdgeMambaError(f"invalid model spec: {e}") from None

    def spec_hash(self) -> str:
        """Identifies the model shape and numerics; state files are tagged with it."""
        d = self.to_dict()
        d.pop("source")
        d.pop("eos_token_id")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        kind = {"mamba1": "Mamba-1", "mamba2": "Mamba-2"}[self.arch]
        if self.bcdt_rms_eps is not None:
            kind = "Falcon-Mamba (Mamba-1 with B/C/Δ RMSNorm)"
        lines = [
            f"architecture   {kind}  [{self.source or 'in-memory'}]",
            f"layers         {self.n_layer}",
            f"d_model        {self.d_model}   d_inner {self.d_inner}   d_state {self.d_state}   d_conv {self.d_conv}",
        ]
        if self.arch == "mamba1":
            lines.append(f"dt_rank        {self.dt_rank}")
        else:
            lines.append(f"heads          {self.n_heads} × head_dim {self.head_dim}, n_groups {self.n_groups}")
        lines += [
            f"vocabulary     {self.vocab_size}   tied embeddings: {'yes' if self.tie_embeddings else 'no'}",
            f"norm eps       {self.norm_eps}   residual in fp32: {'yes' if self.residual_in_fp32 else 'no'}",
        ]
        return "\n".join(lines)
