"""Load Mamba checkpoints into one ModelSpec plus canonical float32 weights.

Supported sources:
- Hugging Face directories: model_type `mamba`, `mamba2`, `falcon_mamba`; single-file or sharded
  safetensors, or `pytorch_model.bin` (read with `weights_only=True`);
- `mamba_ssm` directories: `config.json` with `d_model`, `n_layer`, `ssm_cfg`, ... and
  `pytorch_model.bin` with `backbone.layers.N.mixer.*` names;
- in-memory transformers or mamba_ssm modules (`load_checkpoint(model)`).

Canonical weight names are listed by `ModelSpec.weight_shapes()`. Shapes are checked against the
spec from headers before any tensor data is read, so a crafted file cannot make us allocate
more than the spec implies, and the spec itself is bounded by its validation.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemamba.errors import EdgeMambaError
from edgemamba.spec import ModelSpec

HF_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba")
SUPPORTED = "Hugging Face model_type mamba, mamba2, falcon_mamba; mamba_ssm (ssm_cfg layer Mamba1/Mamba2)"


@dataclass
class Checkpoint:
    spec: ModelSpec
    weights: dict[str, np.ndarray]  # canonical name -> float32 array, shapes as spec.weight_shapes()
    source_bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    tokenizer_path: Path | None = None
    path: Path | None = None


# ---------------------------------------------------------------------------------------------
# config -> ModelSpec
# ---------------------------------------------------------------------------------------------
def _json_float(x: Any, where: str, key: str) -> float:
    """transformers writes infinity as {"__float__": "Infinity"}; plain JSON may carry a string;
    null means unbounded."""
    if isinstance(x, dict) and "__float__" in x:
        x = x["__float__"]
    if x is None:
        return math.inf
    try:
        if isinstance(x, (bool, list, dict)):
            raise TypeError
        return float(x)
    except (TypeError, ValueError):
        raise EdgeMambaError(f"{where}: field {key!r} has invalid value {x!r}") from None


def _float_pair(x: Any, where: str, key: str) -> tuple[float, float]:
    if not isinstance(x, (list, tuple)) or len(x) != 2:
        raise EdgeMambaError(f"{where}: field {key!r} must be a pair [min, max], got {x!r}")
    return _json_float(x[0], where, key), _json_float(x[1], where, key)


def _first_id(x: Any, where: str, key: str) -> int | None:
    if isinstance(x, list):
        x = x[0] if x else None
    if x is None:
        return None
    if not isinstance(x, int) or isinstance(x, bool):
        raise EdgeMambaError(f"{where}: field {key!r} has invalid value {x!r}")
    return x


class _Config:
    """Typed access to a config dict, with errors that name the file and the field."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def get(self, key: str, default: Any, kind: Callable = int) -> Any:
        value = self.d.get(key, default)
        if value is None and default is None:
            return None
        try:
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError
                return value
            if isinstance(value, (bool, list, dict)):  # float(True) and int(False) would pass
                raise TypeError
            out = kind(value)
            if kind is int and out != value:
                raise ValueError
            if kind is float and not math.isfinite(out):
                raise ValueError
            return out
        except (TypeError, ValueError, OverflowError):
            raise EdgeMambaError(f"{self.where}: field {key!r} has invalid value {value!r}") from None


def spec_from_hf_config(config: dict, where: str = "config.json") -> ModelSpec:
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise EdgeMambaError(f"{where}: unsupported model_type {model_type!r}; supported: {SUPPORTED}")
    c = _Config(config, where)
    d_model = c.get("hidden_size", 768 if model_type != "mamba2" else 4096)
    expand = c.get("expand", 2, float)
    rank = config.get("time_step_rank", "auto")
    common = dict(
        d_model=d_model,
        n_layer=c.get("num_hidden_layers", 32 if model_type != "mamba2" else 64),
        d_state=c.get("state_size", 16 if model_type != "mamba2" else 128),
        d_conv=c.get("conv_kernel", 4),
        norm_eps=c.get("layer_norm_epsilon", 1e-5, float),
        use_bias=c.get("use_bias", False, bool),
        use_conv_bias=c.get("use_conv_bias", True, bool),
        residual_in_fp32=c.get("residual_in_fp32", True, bool),
        eos_token_id=_first_id(config.get("eos_token_id", 0 if model_type != "mamba2" else 2), where, "eos_token_id"),
        source=f"hf:{model_type}",
    )
    if model_type == "mamba2":
        return ModelSpec(
            arch="mamba2",
            vocab_size=c.get("vocab_size", 32768),
            d_inner=int(expand * d_model),
            n_heads=c.get("num_heads", 128),
            head_dim=c.get("head_dim", 64),
            n_groups=c.get("n_groups", 8),
            tie_embeddings=c.get("tie_word_embeddings", False, bool),
            dt_limit=_float_pair(config.get("time_step_limit", (0.0, math.inf)), where, "time_step_limit"),
            **common,
        )
    falcon = model_type == "falcon_mamba"
    return ModelSpec(
        arch="mamba1",
        vocab_size=c.get("vocab_size", 50280),
        d_inner=c.get("intermediate_size", int(expand * d_model)),
        dt_rank=math.ceil(d_model / 16) if rank == "auto" else c.get("time_step_rank", 0),
        tie_embeddings=c.get("tie_word_embeddings", True, bool),
        bcdt_rms_eps=c.get("mixer_rms_eps", 1e-6, float) if falcon else None,
        **common,
    )


def spec_from_mamba_ssm_config(config: dict, where: str = "config.json") -> ModelSpec:
    c = _Config(config, where)
    ssm_cfg = config.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise EdgeMambaError(f"{where}: field 'ssm_cfg' must be an object, got {ssm_cfg!r}")
    s = _Config(ssm_cfg, f"{where}: ssm_cfg")
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise EdgeMambaError(f"{where}: ssm_cfg.layer {layer!r} is not supported; supported: {SUPPORTED}")
    if c.get("d_intermediate", 0):
        raise EdgeMambaError(f"{where}: d_intermediate > 0 (MLP blocks) is not supported yet")
    if config.get("attn_layer_idx"):
        raise EdgeMambaError(f"{where}: attn_layer_idx is set (hybrid attention layers are not supported yet)")
    if not c.get("rms_norm", True, bool):
        raise EdgeMambaError(f"{where}: rms_norm=false (LayerNorm blocks) is not supported")
    d_model = c.get("d_model", 2560)
    vocab = c.get("vocab_size", 50277)
    multiple = c.get("pad_vocab_size_multiple", 8)
    if multiple > 0 and vocab % multiple:
        vocab += multiple - vocab % multiple  # mamba_ssm pads the embedding to this multiple
    common = dict(
        d_model=d_model,
        n_layer=c.get("n_layer", 64),
        vocab_size=vocab,
        d_conv=s.get("d_conv", 4),
        d_inner=int(s.get("expand", 2, float) * d_model),
        use_bias=s.get("bias", False, bool),
        use_conv_bias=s.get("conv_bias", True, bool),
        residual_in_fp32=c.get("residual_in_fp32", True, bool),
        tie_embeddings=c.get("tie_embeddings", True, bool),
        norm_eps=c.get("norm_epsilon", 1e-5, float),  # create_block's default; configs rarely carry it
        eos_token_id=None,
        source=f"mamba_ssm:{layer}",
    )
    if layer == "Mamba1":
        rank = ssm_cfg.get("dt_rank", "auto")
        return ModelSpec(
            arch="mamba1",
            d_state=s.get("d_state", 16),
            dt_rank=math.ceil(d_model / 16) if rank == "auto" else s.get("dt_rank", 0),
            **common,
        )
    if ssm_cfg.get("d_ssm") not in (None, common["d_inner"]):
        raise EdgeMambaError(f"{where}: ssm_cfg.d_ssm != d_inner (partial SSM width) is not supported")
    if s.get("D_has_hdim", False, bool):
        raise EdgeMambaError(f"{where}: ssm_cfg.D_has_hdim=true is not supported")
    if not s.get("rmsnorm", True, bool):
        raise EdgeMambaError(f"{where}: ssm_cfg.rmsnorm=false is not supported")
    head_dim = s.get("headdim", 64)
    if head_dim <= 0:
        raise EdgeMambaError(f"{where}: ssm_cfg.headdim must be positive, got {head_dim}")
    return ModelSpec(
        arch="mamba2",
        d_state=s.get("d_state", 128),
        n_heads=common["d_inner"] // head_dim,
        head_dim=head_dim,
        n_groups=s.get("ngroups", 1),
        dt_limit=_float_pair(ssm_cfg.get("dt_limit", (0.0, math.inf)), f"{where}: ssm_cfg", "dt_limit"),
        norm_before_gate=s.get("norm_before_gate", False, bool),
        **common,
    )


def spec_from_config(config: Any, where: str = "config.json") -> ModelSpec:
    if not isinstance(config, dict):
        raise EdgeMambaError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if "model_type" in config:
        return spec_from_hf_config(config, where)
    if "d_model" in config and "n_layer" in config:
        return spec_from_mamba_ssm_config(config, where)
    raise EdgeMambaError(f"{where}: not a Mamba config (no 'model_type', no 'd_model'/'n_layer'); supported: {SUPPORTED}")


# ---------------------------------------------------------------------------------------------
# tensor names: source -> canonical
# ---------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^(?:backbone\.)?layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "norm.weight": "norm",
    "mixer.in_proj.weight": "in_proj",
    "mixer.in_proj.bias": "in_proj_bias",
    "mixer.conv1d.weight": "conv_weight",
    "mixer.conv1d.bias": "conv_bias",
    "mixer.x_proj.weight": "x_proj",
    "mixer.dt_proj.weight": "dt_proj",
    "mixer.dt_proj.bias": "dt_bias",  # Mamba-1: Δ bias lives in dt_proj
    "mixer.dt_bias": "dt_bias",  # Mamba-2
    "mixer.A_log": "A_log",
    "mixer.D": "D",
    "mixer.norm.weight": "gate_norm",
    "mixer.out_proj.weight": "out_proj",
    "mixer.out_proj.bias": "out_proj_bias",
}
_GLOBAL_NAMES = {
    "backbone.embeddings.weight": "embedding",  # transformers
    "backbone.embedding.weight": "embedding",  # mamba_ssm
    "backbone.norm_f.weight": "norm_f",
    "lm_head.weight": "lm_head",
}


def canonical_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


# ---------------------------------------------------------------------------------------------
# tensor sources: where the bytes come from
# ---------------------------------------------------------------------------------------------
class _Tensors:
    """Shapes and dtypes without reading data; then data on request."""

    where: str

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> str: ...
    def nbytes(self, name: str) -> int: ...
    def read(self, name: str) -> np.ndarray: ...


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class _SafetensorsTensors(_Tensors):
    def __init__(self, files: list[Path], where: str):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, for bf16 safetensors)
        from safetensors import safe_open

        self.where = where
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, Path] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="numpy")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise EdgeMambaError(f"{f}: not a readable safetensors file ({_short(e)})") from None
            self._handles[str(f)] = h
            for k in keys:
                self._file_of[k] = f

    def names(self):
        return list(self._file_of)

    def _slice(self, name):
        return self._handles[str(self._file_of[name])].get_slice(name)

    def shape(self, name):
        return tuple(self._slice(name).get_shape())

    def dtype(self, name):
        return self._slice(name).get_dtype()

    def nbytes(self, name):
        return math.prod(self.shape(name)) * _ST_ITEMSIZE.get(self.dtype(name), 4)

    def read(self, name):
        f = self._file_of[name]
        try:
            return np.asarray(self._handles[str(f)].get_tensor(name), dtype=np.float32)
        except Exception as e:
            raise EdgeMambaError(f"{f}: tensor {name!r} could not be read ({_short(e)})") from None


class _TorchStateDict(_Tensors):
    """A dict of torch tensors: from pytorch_model.bin files or an in-memory module."""

    def __init__(self, state: dict, where: str):
        self.where, self._state = where, state

    @classmethod
    def from_files(cls, files: list[Path], where: str) -> _TorchStateDict:
        try:
            import torch
        except ImportError:
            raise EdgeMambaError(
                f"{files[0]}: reading pytorch_model.bin needs torch (pip install 'edgemamba[torch]'), "
                "or convert the checkpoint to safetensors"
            ) from None
        state: dict = {}
        for f in files:
            try:
                # weights_only: never execute code from a checkpoint.
                part = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:  # torch suggests turning weights_only off: exactly what we refuse
                raise EdgeMambaError(
                    f"{f}: refused: the file holds Python objects other than tensors, and unpickling them could run "
                    "code; convert a trusted copy to safetensors") from None
            except Exception as e:
                raise EdgeMambaError(f"{f}: not a readable PyTorch weights file ({_short(e)})") from None
            if not isinstance(part, dict):
                raise EdgeMambaError(f"{f}: expected a state dict, found {type(part).__name__}")
            state.update(part)
        return cls(state, where)

    def names(self):
        return list(self._state)

    def shape(self, name):
        return tuple(self._state[name].shape)

    def dtype(self, name):
        return str(self._state[name].dtype).replace("torch.", "")

    def nbytes(self, name):
        t = self._state[name]
        return t.numel() * t.element_size()

    def read(self, name):
        import torch

        return self._state[name].detach().to(torch.float32).cpu().numpy()


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:200]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeMambaError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeMambaError(f"{path}: malformed JSON ({_short(e)})") from None


def _weight_files(d: Path) -> tuple[str, list[Path]]:
    """Find the weight files of a checkpoint directory: ('safetensors'|'torch', files)."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "torch")):
        index = d / index_name
        if index.exists():
            index_json = _read_json(index)
            weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
            if not isinstance(weight_map, dict):
                raise EdgeMambaError(f"{index}: no 'weight_map' object")
            files = []
            for shard in dict.fromkeys(weight_map.values()):
                p = (d / str(shard)).resolve()
                if p.parent != d.resolve():  # a shard name must not point outside the checkpoint
                    raise EdgeMambaError(f"{index}: shard {shard!r} is outside the checkpoint directory")
                if not p.exists():
                    raise EdgeMambaError(f"{index}: shard {shard!r} is missing")
                files.append(p)
            return kind, files
    if (d / "model.safetensors").exists():
        return "safetensors", [d / "model.safetensors"]
    if (d / "pytorch_model.bin").exists():
        return "torch", [d / "pytorch_model.bin"]
    raise EdgeMambaError(f"{d}: no weights found (model.safetensors, sharded safetensors or pytorch_model.bin)")


def _open_dir(path: Path) -> tuple[ModelSpec, _Tensors, Path | None]:
    if not path.exists():
        raise EdgeMambaError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise EdgeMambaError(f"{path}: a checkpoint is a directory with config.json and weights")
    config_path = path / "config.json"
    spec = spec_from_config(_read_json(config_path), str(config_path))
    kind, files = _weight_files(path)
    tensors = (_SafetensorsTensors if kind == "safetensors" else _TorchStateDict.from_files)(files, str(path))
    tokenizer = path / "tokenizer.json"
    return spec, tensors, tokenizer if tokenizer.exists() else None


def _collect(spec: ModelSpec, tensors: _Tensors, dtype=np.float32) -> dict[str, np.ndarray]:
    """Map, check (before reading data) and read every canonical weight."""
    expected = spec.weight_shapes()
    source_of: dict[str, str] = {}
    unexpected = []
    for name in tensors.names():
        canon = canonical_name(name)
        if canon is None or canon not in expected:
            if canon == "lm_head" and spec.tie_embeddings:
                continue  # a tied head saved anyway: the embedding is used
            if canon is None and name.endswith(("_layernorm.weight",)):
                continue  # Falcon-Mamba's weightless B/C/Δ norms, saved by some versions
            unexpected.append(name)
            continue
        if canon in source_of:
            raise EdgeMambaError(f"{tensors.where}: tensors {source_of[canon]!r} and {name!r} both map to {canon}")
        source_of[canon] = name
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise EdgeMambaError(
            f"{tensors.where}: {len(unexpected)} unexpected tensor(s) for a {spec.n_layer}-layer {spec.arch} model: {shown}"
        )
    for canon, shape in expected.items():
        if canon not in source_of:
            raise EdgeMambaError(f"{tensors.where}: tensor for {canon} is missing (expected shape {shape})")
        got = tensors.shape(source_of[canon])
        # conv1d weights are stored as (channels, 1, width)
        if canon.endswith("conv_weight") and len(got) == 3 and got[1] == 1:
            got = (got[0], got[2])
        if got != shape:
            raise EdgeMambaError(
                f"{tensors.where}: tensor {source_of[canon]!r} has shape {tuple(tensors.shape(source_of[canon]))}, "
                f"expected {shape}"
            )
    _check_fits_in_memory(spec, tensors.where)
    weights = {}
    for canon, shape in expected.items():
        w = tensors.read(source_of[canon]).reshape(shape).astype(dtype, copy=False)
        if not np.all(np.isfinite(w)):
            raise EdgeMambaError(f"{tensors.where}: tensor {source_of[canon]!r} contains NaN or infinity")
        weights[canon] = w
    return weights


def _check_fits_in_memory(spec: ModelSpec, where: str) -> None:
    """Refuse before reading what cannot be held: a header (or a sparse file) may declare terabytes."""
    import psutil

    need = spec.weight_bytes(4)  # the canonical weights are float32
    have = psutil.virtual_memory().total + psutil.swap_memory().total
    if need > have:
        raise EdgeMambaError(f"{where}: the weights need {need / 2**30:.1f} GiB as float32, more than this machine's "
                             f"memory ({have / 2**30:.1f} GiB)")


def _bytes_by_dtype(tensors: _Tensors) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in tensors.names():
        dt = tensors.dtype(name)
        out[dt] = out.get(dt, 0) + tensors.nbytes(name)
    return out


def read_spec(path: str | Path) -> tuple[ModelSpec, dict[str, int]]:
    """The spec and the weight bytes by dtype, from config and file headers only."""
    spec, tensors, _ = _open_dir(Path(path))
    return spec, _bytes_by_dtype(tensors)


def _module_tensors(model: Any) -> tuple[ModelSpec, _Tensors]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "state_dict"):
        raise EdgeMambaError(f"{type(model).__name__}: not a transformers or mamba_ssm Mamba model")
    if hasattr(config, "to_dict"):  # transformers PretrainedConfig
        spec = spec_from_config(config.to_dict(), f"{type(model).__name__}.config")
    else:  # mamba_ssm's MambaConfig dataclass
        spec = spec_from_config(dict(vars(config)), f"{type(model).__name__}.config")
    return spec, _TorchStateDict(dict(model.state_dict()), type(model).__name__)


def load_checkpoint(source: str | Path | Any) -> Checkpoint:
    """Load a checkpoint directory, or an in-memory transformers / mamba_ssm module."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        spec, tensors, tokenizer = _open_dir(path)
    else:
        path, tokenizer = None, None
        spec, tensors = _module_tensors(source)
    weights = _collect(spec, tensors)
    return Checkpoint(spec, weights, _bytes_by_dtype(tensors), tokenizer, path)
