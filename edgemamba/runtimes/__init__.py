"""Backends behind one Session interface, looked up by the artifact's target."""

from __future__ import annotations


def backend_for(artifact):
    if artifact.target in _TVM_TARGETS:  # imported alone: a TVM device may have no onnxruntime
        from edgemamba.runtimes.tvm import TvmBackend

        return TvmBackend
    if artifact.target == "tensorrt":  # imported alone: a TensorRT device needs no onnxruntime
        from edgemamba.runtimes.tensorrt import TrtBackend

        return TrtBackend
    from edgemamba.runtimes.onnxruntime import OrtBackend

    backends = {"ort-cpu": OrtBackend}
    return backends[artifact.target]


_TVM_TARGETS = ("tvm-llvm", "tvm-aarch64", "tvm-cuda")
