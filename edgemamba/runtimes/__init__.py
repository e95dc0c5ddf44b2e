"""Backends behind one Session interface, looked up by the artifact's target."""

from __future__ import annotations

import os

ENGINES = ("auto", "native", "ort")


def backend_for(artifact, engine: str = "auto"):
    """A callable (artifact, batch, threads) -> backend. For ort-cpu, `engine` picks the native CPU
    engine, ONNX Runtime, or (auto) the native engine where it supports the artifact."""
    if artifact.target in _TVM_TARGETS:  # imported alone: a TVM device may have no onnxruntime
        from edgemamba.runtimes.tvm import TvmBackend

        return TvmBackend
    if artifact.target == "tensorrt":  # imported alone: a TensorRT device needs no onnxruntime
        from edgemamba.runtimes.tensorrt import TrtBackend

        return TrtBackend
    if engine not in ENGINES:
        from edgemamba.errors import EdgeMambaError

        raise EdgeMambaError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    if engine == "ort":
        from edgemamba.runtimes.onnxruntime import OrtBackend

        return OrtBackend
    return lambda art, batch, threads: _native_or_ort(art, batch, threads, required=engine == "native")


def _native_or_ort(artifact, batch, threads, required: bool):
    from edgemamba.runtimes.native import NativeBackend, NativeUnavailable

    try:
        return NativeBackend(artifact, batch, threads)
    except NativeUnavailable as e:
        if required:
            from edgemamba.errors import EdgeMambaError

            raise EdgeMambaError(f"the native CPU engine cannot run this artifact: {e}") from None
        from edgemamba.runtimes.onnxruntime import OrtBackend

        backend = OrtBackend(artifact, batch, threads)
        backend.fallback_reason = str(e)
        return backend


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


_TVM_TARGETS = ("tvm-llvm", "tvm-aarch64", "tvm-cuda")
