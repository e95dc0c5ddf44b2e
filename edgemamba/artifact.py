"""The artifact: a directory with manifest.json plus graph, weight and tokenizer files.

Written to a temporary directory beside the destination and renamed into place, so a failure
never leaves a half-written artifact. Loading checks the format version and every file's SHA-256.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgemamba import __version__
from edgemamba.errors import EdgeMambaError
from edgemamba.spec import ModelSpec

if TYPE_CHECKING:
    from edgemamba.checkpoint import Checkpoint

FORMAT = "edgemamba-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = ("step", "prefill")  # ONNX targets: step.onnx and prefill.onnx
WEIGHTS_FILE = "weights.bin"  # ... sharing one weights file

def _targets() -> dict[str, tuple[str, ...]]:
    from edgemamba.passes.pipelines import PIPELINES, precisions_for

    return {**{target: precisions_for(target) for target, _ in PIPELINES},
            **{target: precisions for target, (precisions, _) in _builders().items()}}


def _builders() -> dict:
    """Targets whose artifacts another module builds (a compiled library and packed weights, not
    ONNX graphs): target -> (precisions, builder taking compile_artifact's arguments)."""
    from edgemamba.kernels.tvm_build import TARGETS as TVM_TARGETS, compile_tvm_artifact

    return {target: (t.precisions, compile_tvm_artifact) for target, t in TVM_TARGETS.items()}


RUNTIME_TARGETS = ("ort-cpu", "tensorrt", "tvm-llvm", "tvm-aarch64", "tvm-cuda")  # edgemamba.runtimes
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "w8a8")


def targets() -> dict[str, tuple[str, ...]]:
    """target -> precisions it can build now. Looked up, never branched on. Computed on first use:
    it imports the compiler side (passes, TVM), which running an artifact never needs."""
    global _TARGETS
    if _TARGETS is None:
        _TARGETS = _targets()
    return _TARGETS


_TARGETS = None


def __getattr__(name: str):  # `artifact.TARGETS`, lazily
    if name == "TARGETS":
        return targets()
    raise AttributeError(name)

# Targets whose artifacts add files built from the saved graphs (TensorRT: an engine per graph):
# target -> module with `check()` (refuses before any work) and
# `compile_engines(out_dir, spec, precision, graph files) -> (files, manifest entries)`.
_GRAPH_BUILDERS = {"tensorrt": "edgemamba.runtimes.tensorrt"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_dir(dest: Path, force: bool = False):
    """Yield a temporary directory that becomes `dest` only if the block succeeds. On any failure
    the temporary is removed and a replaced `dest` (with force) is left as it was."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise EdgeMambaError(f"{dest}: already exists (use --force to replace it)")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the artifact gets the usual mode
    except OSError as e:
        raise EdgeMambaError(f"{dest.parent}: cannot write here ({e.strerror or e})") from None
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
            try:
                os.replace(tmp, dest)
            except OSError:
                os.replace(old / dest.name, dest)  # put the previous artifact back
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgeMambaError(f"{dest}: write failed ({e.strerror or e}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: a unique temporary beside it, fsync, rename."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise EdgeMambaError(f"{path}: write failed ({e.strerror or e}); nothing was written") from None


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict
    spec: ModelSpec

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def file(self, key: str) -> Path:
        return self.path / self.manifest["graphs"][key]

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.manifest.get("tokenizer")
        return self.path / name if name else None


def state_bytes(state: list[dict], batch: int = 1) -> int:
    """Bytes of one sequence's state from the manifest's state entries."""
    import numpy as np

    return sum(batch * int(np.prod(e["shape"][1:])) * np.dtype(e["dtype"]).itemsize for e in state)


def check_target(target: str, precision: str) -> None:
    if target not in targets():
        raise EdgeMambaError(f"unknown target {target!r}; available: {', '.join(targets())}")
    if precision not in targets()[target]:
        raise EdgeMambaError(
            f"precision {precision!r} is not available for target {target!r}; available: {', '.join(targets()[target])}"
        )


def compile_artifact(ckpt: "Checkpoint", dest: Path, target: str = "ort-cpu", precision: str = "fp32",
                     force: bool = False, recipe=None, calib_ids=None, **options) -> Artifact:
    """`options` go to targets with their own builder (tvm-cuda: arch="sm_87")."""
    from edgemamba.export import GRAPHS, build_graphs, save_graphs
    from edgemamba.passes.pipelines import PIPELINES, build_pipeline

    check_target(target, precision)
    if target in _builders():
        return _builders()[target][1](ckpt, dest, target, precision, force, **options)
    engines = importlib.import_module(_GRAPH_BUILDERS[target]) if target in _GRAPH_BUILDERS else None
    if engines is not None:
        engines.check()
    spec = ckpt.spec
    run_pipeline, describe = build_pipeline(target, precision, recipe, calib_ids)
    with atomic_dir(dest, force) as tmp:
        models = build_graphs(ckpt, PIPELINES[(target, precision)].ops)
        modified = run_pipeline(models)
        pipeline = {**describe(), "modified": modified}
        files = save_graphs(models, tmp)
        built = {}
        if engines is not None:
            engine_files, built = engines.compile_engines(tmp, spec, precision, files)
            files.update(engine_files)
        if target == "ort-cpu":  # the native CPU engine runs it from this, without the graphs
            from edgemamba.runtimes.native import graph_index

            built["weights_index"] = graph_index(files["step"])
        write_manifest(tmp, spec, target, precision, ckpt, graphs={k: files[k].name for k in GRAPHS},
                       files=list(files.values()), ssm_state_dtype=recipe.state_dtype if recipe else "float32",
                       pipeline=pipeline, **built)
    return load_artifact(dest, verify=False)


def state_entries(spec: ModelSpec, ssm_dtype: str = "float32") -> list[dict]:
    """The manifest's state tensors: graph input/output names, shapes (batch symbolic), dtypes."""
    out = []
    for i in range(spec.n_layer):
        for kind, shape in (("conv", spec.conv_state_shape(1)), ("ssm", spec.ssm_state_shape(1))):
            out.append({"name": f"{kind}_state.{i}", "input": f"past_{kind}_state.{i}",
                        "output": f"present_{kind}_state.{i}", "shape": ["batch", *shape[1:]],
                        "dtype": ssm_dtype if kind == "ssm" else "float32"})
    return out


def write_manifest(tmp: Path, spec: ModelSpec, target: str, precision: str, ckpt: "Checkpoint | None", *,
                   graphs: dict[str, str], files: list[Path], ssm_state_dtype: str = "float32",
                   ids_dtype: str = "int64", **sections) -> None:
    """Copy the tokenizer (if any) and write manifest.json for the files of an artifact being built in
    `tmp`; `sections` are target-specific manifest sections (pipeline, tensorrt, tvm)."""
    files = list(files)
    tokenizer = None
    if ckpt is not None and ckpt.tokenizer_path is not None:
        shutil.copyfile(ckpt.tokenizer_path, tmp / "tokenizer.json")
        files.append(tmp / "tokenizer.json")
        tokenizer = "tokenizer.json"
    state = state_entries(spec, ssm_state_dtype)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgemamba_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": target,
        "precision": precision,
        "spec": spec.to_dict(),
        "spec_hash": spec.spec_hash(),
        "graphs": graphs,
        "tokenizer": tokenizer,
        "io": {"input_ids": {"dtype": ids_dtype, "shape": ["batch", "seq"]},
               "logits": {"dtype": "float32", "shape": ["batch", spec.vocab_size]}},
        "state": state,
        "state_bytes_per_sequence": state_bytes(state),
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
        "source": {"checkpoint": str(ckpt.path) if ckpt is not None and ckpt.path else None,
                   "bytes_by_dtype": ckpt.source_bytes_by_dtype if ckpt is not None else {}},
        **sections,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def load_artifact(path: Path | str, verify: bool = True) -> Artifact:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise EdgeMambaError(f"{path}: not an edgemamba artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeMambaError(f"{mpath}: malformed JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EdgeMambaError(f"{mpath}: not an edgemamba manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EdgeMambaError(
            f"{mpath}: artifact format version {version!r} is newer than this edgemamba supports ({FORMAT_VERSION}); "
            "upgrade edgemamba"
        )
    for key, kind in (("spec", dict), ("target", str), ("precision", str), ("graphs", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise EdgeMambaError(f"{mpath}: field {key!r} is missing or not a {kind.__name__}")
    spec = ModelSpec.from_dict(manifest["spec"])
    if manifest.get("spec_hash") != spec.spec_hash():  # the manifest's own spec, hand-edited or damaged
        raise EdgeMambaError(f"{mpath}: the spec does not match its spec_hash (manifest edited or corrupted)")
    # Against the targets the runtimes know, not targets(): that would import the compiler side.
    if manifest["target"] not in RUNTIME_TARGETS or manifest["precision"] not in PRECISIONS:
        raise EdgeMambaError(f"{mpath}: target/precision {manifest['target']}/{manifest['precision']} is not one "
                             f"this edgemamba runs (targets: {', '.join(RUNTIME_TARGETS)})")
    files = manifest["files"]
    for name, info in files.items():
        f = path / name
        if Path(name).name != name or name in ("", ".", "..") or not name.isprintable():
            raise EdgeMambaError(f"{mpath}: file name {name!r} must be a plain name (no path, no control characters)")
        if not isinstance(info, dict):
            raise EdgeMambaError(f"{mpath}: entry for file {name!r} is not an object")
        if not f.exists():
            raise EdgeMambaError(f"{path}: file {name!r} listed in the manifest is missing")
        if f.stat().st_size != info.get("bytes"):
            raise EdgeMambaError(f"{f}: size {f.stat().st_size} does not match the manifest ({info.get('bytes')})")
        if verify and sha256_file(f) != info.get("sha256"):
            raise EdgeMambaError(f"{f}: checksum does not match the manifest (file modified or corrupted)")
    tokenizer = manifest.get("tokenizer")
    for key, name in [*manifest["graphs"].items(), *([] if tokenizer is None else [("tokenizer", tokenizer)])]:
        if not isinstance(name, str) or name not in files:  # only checksummed files are read
            raise EdgeMambaError(f"{mpath}: {key!r} file {name!r} is not among the listed files")
    _check_state_entries(manifest.get("state"), spec, mpath)
    return Artifact(path, manifest, spec)


STATE_DTYPES = ("float32", "float16")


def _check_state_entries(state, spec: ModelSpec, mpath: Path) -> None:
    """The state the runtime will allocate: every layer's conv and ssm tensors, with known dtypes."""
    expected = {f"{k}_state.{i}" for i in range(spec.n_layer) for k in ("conv", "ssm")}
    if not isinstance(state, list) or not all(isinstance(e, dict) for e in state):
        raise EdgeMambaError(f"{mpath}: field 'state' must be a list of objects")
    names = [e.get("name") for e in state]
    if sorted(map(str, names)) != sorted(expected) or len(names) != len(expected):
        raise EdgeMambaError(f"{mpath}: 'state' entries do not name every layer's conv_state and ssm_state")
    for e in state:
        if e.get("dtype") not in STATE_DTYPES:
            raise EdgeMambaError(f"{mpath}: state {e['name']} has dtype {e.get('dtype')!r}; one of {', '.join(STATE_DTYPES)}")
