"""Per-target pipelines: data looked up by (target, precision), never an if-chain.

A pipeline is a list of named phases; each phase is a list of pass factories taking the recipe.
`build_pipeline` instantiates the passes once, so the step and prefill graphs share their tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgemamba.errors import EdgeMambaError
from edgemamba.passes.float16 import Float16State, Float16Weights
from edgemamba.passes.fuse import KERNEL_OPS, FusedOpsFloat16
from edgemamba.passes.fusion import FuseRMSNorm
from edgemamba.passes.quantize import QUANTIZABLE, QuantizeEmbedding, QuantizeMatMulNBits, QuantOptions
from edgemamba.passes.w8a8 import Calibrate, QuantizeQDQ, RotateOutProj
from edgemamba.passes.weight_only import QuantizeWeightsInt8


@dataclass(frozen=True)
class Recipe:
    """Per-model overrides, from --recipe recipe.yaml. Defaults were chosen by measurement
    (benchmarks/RESULTS.md, precision section)."""

    block_size: int = 0  # 0: the precision's default
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 compute (fast), 0 = float32 activations
    quantize: tuple[str, ...] = QUANTIZABLE
    keep: tuple[str, ...] = ()  # e.g. [lm_head]: keep in float32
    skip_layers: tuple[int, ...] = ()  # layers left in float32
    embedding: bool = True  # quantize the embedding table too
    head_bits: int = 0  # 0: same as the precision
    ssm_input_percentile: float = 99.99  # w8a8: clipping of the SSM input's calibrated range
    hadamard_block: int = 64  # w8a8: largest block of the out_proj-input rotation
    state_dtype: str = "float32"  # or "float16": SSM state stored in 16 bits between tokens

    @classmethod
    def load(cls, path: str | Path | None) -> Recipe:
        if path is None:
            return cls()
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise EdgeMambaError(f"{path}: no such recipe file") from None
        except yaml.YAMLError as e:
            raise EdgeMambaError(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise EdgeMambaError(f"{path}: a recipe is a mapping of options")
        known = {f.name: f for f in fields(cls)}
        out = {}
        for key, value in data.items():
            if key not in known:
                raise EdgeMambaError(f"{path}: unknown recipe option {key!r}; options: {', '.join(known)}")
            default = known[key].default
            if isinstance(default, tuple):
                if not isinstance(value, list):
                    raise EdgeMambaError(f"{path}: {key} must be a list")
                value = tuple(value)
            elif type(value) is not type(default):
                raise EdgeMambaError(f"{path}: {key} must be a {type(default).__name__}, got {value!r}")
            out[key] = value
        bad = [k for k in out.get("quantize", ()) + out.get("keep", ()) if k not in QUANTIZABLE]
        if bad:
            raise EdgeMambaError(f"{path}: unknown weight kind(s) {bad}; kinds: {', '.join(QUANTIZABLE)}")
        return cls(**out)

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


@dataclass
class Context:
    """What passes may need besides the recipe: calibration tokens, and passes of earlier phases."""

    calib_ids: object = None  # np.ndarray of token ids, or None
    made: dict = field(default_factory=dict)


def _quant(bits: int, default_block: int, default_head_bits: int = 0) -> Callable:
    def make(r: Recipe, ctx: Context):
        options = QuantOptions(bits=bits, block_size=r.block_size or default_block, accuracy_level=r.accuracy_level,
                               kinds=r.quantize, skip_layers=r.skip_layers, embedding=r.embedding,
                               head_bits=r.head_bits or default_head_bits or None, keep=r.keep)
        head = QuantizeMatMulNBits(options)
        return [head, QuantizeEmbedding(options, head)]

    return make


def _fp(precision: str):
    return lambda r, ctx: [Float16Weights(precision)]


def _fuse(r: Recipe, ctx: Context):
    return [FuseRMSNorm()]


def _cleanup(r: Recipe, ctx: Context):
    return [RemoveUnusedNodesPass()]


def _state(r: Recipe, ctx: Context):
    if r.state_dtype not in ("float32", "float16"):
        raise EdgeMambaError(f"recipe state_dtype must be float32 or float16, got {r.state_dtype!r}")
    return [Float16State()] if r.state_dtype == "float16" else []


def _rotate(r: Recipe, ctx: Context):
    return [RotateOutProj(r.hadamard_block)]


def _calibrate(r: Recipe, ctx: Context):
    if ctx.calib_ids is None:
        raise EdgeMambaError("precision w8a8 needs calibration data: --calib FILE (text or token ids)")
    ctx.made["calibrate"] = Calibrate(ctx.calib_ids, None, r.ssm_input_percentile)
    return [ctx.made["calibrate"]]


def _quant_w8a8(r: Recipe, ctx: Context):
    embedding = QuantOptions(bits=8, block_size=128, kinds=(), embedding=r.embedding)
    return [QuantizeQDQ(ctx.made["calibrate"], tuple(k for k in r.quantize if k not in r.keep), r.skip_layers),
            QuantizeEmbedding(embedding, QuantizeMatMulNBits(embedding))]


def _fused_fp16(r: Recipe, ctx: Context):
    return [FusedOpsFloat16()]


def _weight_only_int8(r: Recipe, ctx: Context):
    return [QuantizeWeightsInt8(tuple(k for k in r.quantize if k not in r.keep), r.skip_layers, r.embedding)]


@dataclass(frozen=True)
class Phase:
    name: str
    make: Callable[[Recipe, Context], list]


@dataclass(frozen=True)
class Pipeline:
    phases: list[Phase] = field(default_factory=list)
    state_dtype: str = "float32"
    ops: frozenset[str] = frozenset()  # fused ops the target's backend runs: the export emits them


PIPELINES: dict[tuple[str, str], Pipeline] = {
    # RMSNorm onto ORT's SimplifiedLayerNormalization: 0.95x step time on the demo model (measured).
    ("ort-cpu", "fp32"): Pipeline([Phase("fuse", _fuse), Phase("state", _state), Phase("cleanup", _cleanup)]),
    ("ort-cpu", "fp16"): Pipeline([Phase("fuse", _fuse), Phase("precision", _fp("fp16")), Phase("state", _state),
                                   Phase("cleanup", _cleanup)]),
    # Defaults from measurement on the trained demo model (benchmarks/RESULTS.md, precision section).
    # int8 block 64: 99.12% top-1 vs 99.15% at block 32 (demo model, 4096 held-out tokens, weight-only),
    # half the scales: 1.0625 bytes a weight, as llama.cpp's Q8_0.
    ("ort-cpu", "int8"): Pipeline([Phase("fuse", _fuse), Phase("quantize", _quant(8, 64)), Phase("state", _state),
                                   Phase("cleanup", _cleanup)]),
    ("ort-cpu", "int4"): Pipeline([Phase("fuse", _fuse), Phase("quantize", _quant(4, 64, default_head_bits=8)),
                                   Phase("state", _state), Phase("cleanup", _cleanup)]),
    # w8a8 fuses after calibration: the calibration probes read the unfused graph's MatMul inputs.
    ("ort-cpu", "w8a8"): Pipeline([Phase("rotate", _rotate), Phase("calibrate", _calibrate),
                                   Phase("quantize", _quant_w8a8), Phase("fuse", _fuse), Phase("state", _state),
                                   Phase("cleanup", _cleanup)]),
    # TensorRT: the graphs hold the kernels' fused ops (plugins); engines are strongly typed, so the
    # precision is in the graph: fp16 weights and GEMMs with float32 islands (norms, residual, state),
    # the fused ops on float16 activations; int8 adds weight-only int8 (QDQ on the weights).
    ("tensorrt", "fp32"): Pipeline([Phase("state", _state), Phase("cleanup", _cleanup)], ops=KERNEL_OPS),
    ("tensorrt", "fp16"): Pipeline([Phase("precision", _fp("fp16")), Phase("fused-fp16", _fused_fp16),
                                    Phase("state", _state), Phase("cleanup", _cleanup)], ops=KERNEL_OPS),
    ("tensorrt", "int8"): Pipeline([Phase("precision", _fp("fp16")), Phase("fused-fp16", _fused_fp16),
                                    Phase("quantize", _weight_only_int8), Phase("state", _state),
                                    Phase("cleanup", _cleanup)], ops=KERNEL_OPS),
}


def precisions_for(target: str) -> tuple[str, ...]:
    return tuple(p for t, p in PIPELINES if t == target)


def build_pipeline(target: str, precision: str, recipe: Recipe | None = None, calib_ids=None):
    """A callable on {kind: ir.Model} that runs every phase on every graph, and its description.
    Passes of a phase are made when the phase starts, so they can use what earlier phases made."""
    pipeline = PIPELINES[(target, precision)]
    recipe = recipe or Recipe()
    ctx = Context(calib_ids)
    if precision == "w8a8" and calib_ids is None:
        _calibrate(recipe, ctx)  # refuse before any work
    phases: list[tuple[str, list]] = []

    def run(models: dict[str, ir.Model]) -> dict[str, dict[str, bool]]:
        report: dict[str, dict[str, bool]] = {}
        for phase in pipeline.phases:
            passes = phase.make(recipe, ctx)
            phases.append((phase.name, passes))
            name = phase.name
            for p in passes:
                for kind, model in models.items():
                    result = p(model)
                    report.setdefault(f"{name}/{type(p).__name__}", {})[kind] = result.modified
        return report

    def describe() -> dict:
        return {"phases": [{"name": n, "passes": [type(p).__name__ for p in ps]} for n, ps in phases],
                **({"fused_ops": sorted(pipeline.ops)} if pipeline.ops else {}),
                "recipe": recipe.to_dict(), "calibration_tokens": None if calib_ids is None else int(len(calib_ids))}

    return run, describe
