"""Measurements on this machine: per-token latency, prefill throughput, memory."""

from __future__ import annotations

import contextlib
import resource
import sys
import time

import numpy as np


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: VmHWM, the high-water mark of this process's own address space. (ru_maxrss survives
    execve, so a process started from a large parent would report the parent's peak.) Elsewhere
    ru_maxrss (macOS reports bytes, others KiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def bench_artifact(artifact, *, tokens=256, prompt_len=512, context=0, repeats=3, threads=None, progress=False,
                   seed=0, engine="auto") -> dict:
    import click

    from edgemamba.session import Session

    session = Session(artifact, threads=threads, engine=engine)
    rng = np.random.default_rng(seed)
    vocab = session.spec.vocab_size
    prompt = rng.integers(0, vocab, prompt_len)
    prefill_s = []
    for _ in range(repeats):
        session.reset()
        t = time.perf_counter()
        session.prefill(prompt)
        prefill_s.append(time.perf_counter() - t)
    session.reset()
    if context:
        session.prefill(rng.integers(0, vocab, context))
    else:
        session.prefill(prompt[:1])
    ids = rng.integers(0, vocab, tokens + 8)
    for t in ids[:8]:  # warm-up
        session.step([t])
    lat = np.empty(tokens)
    steps = range(tokens)
    bar = click.progressbar(steps, label="decoding", file=sys.stderr) if progress else contextlib.nullcontext(steps)
    with bar as it:
        for i in it:
            t = time.perf_counter()
            session.step([ids[8 + i]])
            lat[i] = time.perf_counter() - t
    ms = lat * 1e3
    weights = session.artifact.manifest["files"].get("weights.bin", {}).get("bytes", 0)
    return {
        "artifact": str(session.artifact.path),
        "target": session.artifact.target,
        "precision": session.artifact.precision,
        "engine": session.engine,
        **({"fallback_reason": r} if (r := getattr(session.backend, "fallback_reason", None)) else {}),
        **({"isa": isa} if (isa := getattr(session.backend, "isa", None)) else {}),  # the native engine's kernels
        "tokens": tokens,
        "context": int(session.positions[0] - tokens - 8),
        "decode_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                      "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())},
        "prefill_tokens": prompt_len,
        "prefill_tokens_per_s": float(prompt_len / np.median(prefill_s)),
        "peak_rss_bytes": peak_rss_bytes(),
        "weight_bytes": weights,
        "state_bytes": session.spec.state_bytes(1),
    }

