"""Backends behind one Session interface, looked up by the artifact's target."""

from __future__ import annotations


def backend_for(artifact):
    from edgemamba.runtimes.onnxruntime import OrtBackend

    backends = {"ort-cpu": OrtBackend}
    return backends[artifact.target]
