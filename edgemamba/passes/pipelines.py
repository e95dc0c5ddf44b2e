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
from edgemamba.passes.float16 import Float16Weights
from edgemamba.passes.quantize import QUANTIZABLE, QuantizeEmbedding, QuantizeMatMulNBits, QuantOptions


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


def _quant(bits: int, default_block: int) -> Callable[[Recipe], list[ir.passes.PassBase]]:
    def make(r: Recipe):
        options = QuantOptions(bits=bits, block_size=r.block_size or default_block, accuracy_level=r.accuracy_level,
                               kinds=r.quantize, skip_layers=r.skip_layers, embedding=r.embedding,
                               head_bits=r.head_bits or None, keep=r.keep)
        head = QuantizeMatMulNBits(options)
        return [head, QuantizeEmbedding(options, head)]

    return make


def _fp(precision: str):
    return lambda r: [Float16Weights(precision)]


def _cleanup(r: Recipe):
    return [RemoveUnusedNodesPass()]


@dataclass(frozen=True)
class Phase:
    name: str
    make: Callable[[Recipe], list]


@dataclass(frozen=True)
class Pipeline:
    phases: list[Phase] = field(default_factory=list)
    state_dtype: str = "float32"


PIPELINES: dict[tuple[str, str], Pipeline] = {
    ("ort-cpu", "fp32"): Pipeline([Phase("cleanup", _cleanup)]),
    ("ort-cpu", "fp16"): Pipeline([Phase("precision", _fp("fp16")), Phase("cleanup", _cleanup)]),
    ("ort-cpu", "int8"): Pipeline([Phase("quantize", _quant(8, 128)), Phase("cleanup", _cleanup)]),
    ("ort-cpu", "int4"): Pipeline([Phase("quantize", _quant(4, 64)), Phase("cleanup", _cleanup)]),
}


def precisions_for(target: str) -> tuple[str, ...]:
    return tuple(p for t, p in PIPELINES if t == target)


def build_pipeline(target: str, precision: str, recipe: Recipe | None = None):
    """A callable on {kind: ir.Model} that runs every phase on every graph, and its description."""
    pipeline = PIPELINES[(target, precision)]
    recipe = recipe or Recipe()
    phases = [(ph.name, ph.make(recipe)) for ph in pipeline.phases]

    def run(models: dict[str, ir.Model]) -> dict[str, dict[str, bool]]:
        report: dict[str, dict[str, bool]] = {}
        for name, passes in phases:
            for p in passes:
                for kind, model in models.items():
                    result = p(model)
                    report.setdefault(f"{name}/{type(p).__name__}", {})[kind] = result.modified
        return report

    description = {"phases": [{"name": n, "passes": [type(p).__name__ for p in ps]} for n, ps in phases],
                   "recipe": recipe.to_dict()}
    return run, description
