"""Build tvm-* artifacts: compile the Relax module of a ModelSpec for a target, pack the weights.

    tvm-llvm      this machine's CPU (LLVM with its own instruction set extensions)
    tvm-aarch64   64-bit Arm Linux, cross-compiled and linked with Debian's aarch64-linux-gnu-g++
    tvm-cuda      NVIDIA GPUs of one architecture (arch sm_87 Jetson Orin, sm_90 H100, ...); the CUDA
                  kernels are compiled to cubin here with nvcc, so the device compiles nothing

Precisions: fp32, fp16 (weights; state and activations stay float32), int8 (weight-only, one scale
per output row, dequantized inside the kernels). int4 is not implemented.

The artifact: model.so (the library), weights.bin (packed weights, see runtimes.tvm.param_specs),
kernels.<arch>.cubin for CUDA, tokenizer.json when the checkpoint has one, manifest.json. A tvm-llvm
library is built for this machine's CPU (LLVM -mcpu of the host, recorded in the manifest's target):
it may not run on an older CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgemamba.errors import EdgeMambaError

PRECISIONS = ("fp32", "fp16", "int8")  # int8: weight-only, per-row scales
DEFAULT_CUDA_ARCH = "sm_90"


@dataclass(frozen=True)
class TvmTarget:
    device: str  # "cpu" or "cuda": where the library runs
    precisions: tuple[str, ...]
    make: Callable  # (arch) -> tvm.target.Target
    cross_cc: str | None = None  # C++ compiler that links the library for another machine


def _llvm_host(_arch):
    from edgemamba.kernels.tvm_common import cpu_target

    return cpu_target()


def _llvm_aarch64(_arch):
    import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})


def _cuda(arch):
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": arch or DEFAULT_CUDA_ARCH, "host": {"kind": "llvm"}})


TARGETS: dict[str, TvmTarget] = {
    "tvm-llvm": TvmTarget("cpu", PRECISIONS, _llvm_host),
    "tvm-aarch64": TvmTarget("cpu", PRECISIONS, _llvm_aarch64, cross_cc="aarch64-linux-gnu-g++"),
    "tvm-cuda": TvmTarget("cuda", ("fp16", "fp32", "int8"), _cuda),
}


def compile_library(spec, target_name: str, precision: str, out_dir: Path, *, arch: str | None = None,
                    batches=None, pdl: str | None = None) -> dict:
    """model.so (+ cubin) for this spec in out_dir; returns the manifest's "tvm" entry less params.
    pdl: how decode-step kernels use programmatic dependent launch, a key of `tvm_common.PDL_MODES`
    (None: the default where the arch has it, sm_90 and newer)."""
    import tvm

    from edgemamba.kernels.tvm_common import DEFAULT_PDL, pdl_for, supports_pdl
    from edgemamba.kernels.tvm_model import STEP_BATCHES, build_module, relax_pipeline, step_launches
    from edgemamba.runtimes.tvm import WEIGHT_DTYPES, dt_proj_dtype

    tt = TARGETS[target_name]
    target = tt.make(arch)
    batches = tuple(batches or STEP_BATCHES)
    gpu = tt.device == "cuda"
    if gpu and pdl is None:
        pdl = DEFAULT_PDL if supports_pdl(target) else "off"
    use_pdl = gpu and pdl_for(target, pdl) is not None
    mod = build_module(spec, precision, gpu, target, batches, pdl=pdl)
    with target, _cuda_postproc(_coherent_pdl_loads if use_pdl else None):
        ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline())
    info = {"device": tt.device, "target": json.dumps(target.export(), default=str), "step_batches": list(batches),
            "greedy": True, "library": "model.so", "cubins": {},  # greedy: greedy_{B} (libraries since 2026-11-23)
            "dt_proj_dtype": dt_proj_dtype(WEIGHT_DTYPES[precision])}
    if 1 in batches:  # what a decode step launches, for `edgemamba bench --predict`
        info["step_launches"] = step_launches(mod, 1)
    if gpu:
        arch = str(target.attrs["arch"])
        source = _cuda_source(ex.mod)
        name = f"kernels.{arch}.cubin"
        (out_dir / name).write_bytes(nvcc_cubin(source, arch))
        info["cubins"][name] = hashlib.sha256(source.encode()).hexdigest()
        info["arch"] = arch
        info["pdl"] = pdl
    if tt.cross_cc and shutil.which(tt.cross_cc) is None:
        raise EdgeMambaError(f"{target_name} links with {tt.cross_cc}, which is not installed "
                             "(Debian: apt-get install g++-aarch64-linux-gnu)")
    kwargs = {"cc": tt.cross_cc} if tt.cross_cc else {}
    ex.export_library(str(out_dir / "model.so"), **kwargs)
    return info


@contextlib.contextmanager
def _cuda_postproc(fn):
    """TVM's hook on the CUDA source it generates (what the library embeds and nvcc compiles), set
    to `fn` for the duration; None: left as it is."""
    if fn is None:
        yield
        return
    import tvm_ffi

    name = "tvm_callback_cuda_postproc"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, lambda code, *_: fn(str(code)), override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
        else:
            tvm_ffi.remove_global_func(name)


_KERNEL = re.compile(r'^extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', re.M)


def _coherent_pdl_loads(code: str) -> str:
    """Kernels launched with programmatic dependent launch (those that call griddepcontrol.wait)
    without `__restrict__` on their parameters but the weights they read only after the wait, so that
    nvcc reads what other kernels write with coherent loads that stay after the wait
    (`tvm_common.with_pdl` says why), and the weights a kernel preloads with coherent loads that stay
    before it (ptxas moves non-coherent loads across the wait either way)."""
    from edgemamba.kernels.tvm_common import PDL_CONSTANT_PARAMS

    starts = [(m.start(), m.group(1)) for m in _KERNEL.finditer(code)]
    before = {}  # PDL kernel -> its source before the wait
    for (start, name), (end, _) in zip(starts, starts[1:] + [(len(code), "")]):
        if "griddepcontrol_wait();" in code[start:end]:
            before[name] = code[start:end].split("griddepcontrol_wait();")[0].split("{", 1)[1]
    lines = code.split("\n")
    for i, line in enumerate(lines):
        m = _KERNEL.match(line)
        if m and m.group(1) in before:
            head = before[m.group(1)]

            def strip(p):
                keep = p.group(1) in PDL_CONSTANT_PARAMS and not re.search(rf"\b{p.group(1)}_ptr\b", head)
                return p.group(0) if keep else p.group(1) + "_ptr"

            lines[i] = re.sub(r"__restrict__ (\w+)_ptr\b", strip, line)
    return "\n".join(lines)


def _cuda_source(module) -> str:
    """The CUDA source of the library's device kernels (the one `cuda` module in its import tree)."""
    stack, found = [module], []
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            found.append(m.inspect_source())
        stack.extend(m.imports)
    if len(found) != 1:
        raise RuntimeError(f"expected one CUDA module in the library, found {len(found)}")
    return found[0]


def nvcc_cubin(source: str, arch: str) -> bytes:
    if shutil.which("nvcc") is None:
        raise EdgeMambaError("tvm-cuda compiles its kernels with nvcc, which is not on PATH")
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "kernels.cu", Path(d) / "kernels.cubin"
        src.write_text(source)
        proc = subprocess.run(["nvcc", "--cubin", "-O3", f"-arch={arch}", "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise EdgeMambaError(f"nvcc failed on the generated CUDA kernels: {proc.stderr.strip()[-500:]}")
        return out.read_bytes()


def compile_tvm_artifact(ckpt, dest: Path, target: str, precision: str, force: bool = False, *,
                         arch: str | None = None, batches=None, pdl: str | None = None):
    """The artifact builder for tvm-* targets (registered in edgemamba.artifact)."""
    return _write_artifact(ckpt.spec, dest, target, precision, force, arch=arch, batches=batches, ckpt=ckpt,
                           pdl=pdl)


def compile_tvm_library(spec, dest: Path, target: str, precision: str, force: bool = False, *,
                        arch: str | None = None, batches=None, pdl: str | None = None):
    """An artifact without weights: the library for every checkpoint of this shape. Its runtime
    takes weights packed elsewhere (`TvmBackend(..., weights=pack_weights(...))`), e.g. on a
    device that has the runtime but no compiler."""
    return _write_artifact(spec, dest, target, precision, force, arch=arch, batches=batches, ckpt=None, pdl=pdl)


def _write_artifact(spec, dest, target, precision, force, *, arch, batches, ckpt, pdl=None):
    from edgemamba.artifact import atomic_dir, load_artifact, write_manifest
    from edgemamba.runtimes.tvm import WEIGHTS, pack_weights, write_packed

    if precision not in TARGETS[target].precisions:
        raise EdgeMambaError(f"precision {precision!r} is not available for target {target!r}; "
                             f"available: {', '.join(TARGETS[target].precisions)}")
    with atomic_dir(dest, force) as tmp:
        info = compile_library(spec, target, precision, tmp, arch=arch, batches=batches, pdl=pdl)
        files = [tmp / info["library"], *(tmp / c for c in info["cubins"])]
        info["params"] = None
        if ckpt is not None:
            info["params"] = write_packed(pack_weights(spec, ckpt.weights, precision), tmp / WEIGHTS)
            files.append(tmp / WEIGHTS)
        write_manifest(tmp, spec, target, precision, ckpt, graphs={"library": info["library"]}, files=files,
                       ids_dtype="int32", tvm=info)
    return load_artifact(dest, verify=False)
