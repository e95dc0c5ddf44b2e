"""Per-token latency and memory against context length, measured, beside a Transformer's formula.

`context_sweep` measures an artifact on this machine: for each context length N it prefills N
tokens into a fresh state, then times decode steps (p50/p90) and reads the process's resident
memory, and for GPU targets the GPU memory in use. The comparison is a GPT-class Transformer of
the same parameter class: the same d_model and half the layers (one attention + MLP block,
~12·d_model² parameters, matches two Mamba blocks of ~6·d_model² each); for mamba-130m that is
the GPT-Neo-125M / Pythia-160M shape (768 × 12). Its KV cache grows as 2 (K and V) · layers ·
d_model · bytes per element per token, and its per-token latency is drawn from the measured Mamba
latency scaled by the bytes each streams per token (weights, plus the KV cache for the
Transformer): both decode steps are bandwidth-bound.

`plot_context` draws only what the result dict holds, so the JSON written beside the PNG is the
plot's data.
"""

from __future__ import annotations

import re
import sys
import time

import numpy as np

from edgemamba.errors import EdgeMambaError

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20}


def parse_contexts(text: str) -> list[int]:
    """'64,1k,8k,64k' -> [64, 1024, 8192, 65536] (k = 1024)."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", part)
        if not m or int(m.group(1)) == 0:
            raise EdgeMambaError(f"--contexts: {part.strip()!r} is not a context length (e.g. 64,1k,8k,64k)")
        out.append(int(m.group(1)) * _SUFFIX[m.group(2).lower()])
    return sorted(set(out))


def transformer_shape(spec) -> dict:
    """The comparison Transformer: same d_model, half the layers, the same vocabulary."""
    n_layer = max(1, spec.n_layer // 2)
    params = 12 * n_layer * spec.d_model**2 + spec.vocab_size * spec.d_model  # blocks + tied embedding
    return {"d_model": spec.d_model, "n_layer": n_layer, "vocab_size": spec.vocab_size, "n_params": params,
            "description": f"GPT-class Transformer, d_model {spec.d_model}, {n_layer} layers (attention + MLP), "
                           f"~{params / 1e6:.0f}M parameters"}


def kv_cache_bytes(shape: dict, context: int, bytes_per_element: int) -> int:
    """K and V for every layer and position: 2 · n_layer · d_model · context elements."""
    return 2 * shape["n_layer"] * shape["d_model"] * context * bytes_per_element


def gpu_memory_in_use() -> int | None:
    """Bytes in use on CUDA device 0 (cudaMemGetInfo: total - free, every process and the CUDA
    context included); None where no CUDA runtime is loaded."""
    import ctypes

    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
            return None
        return int(total.value - free.value)
    return None


def context_sweep(artifact, contexts: list[int], *, tokens: int = 64, threads: int | None = None,
                  progress: bool = False, seed: int = 0) -> dict:
    import psutil

    from edgemamba.devices.fit import weight_bytes
    from edgemamba.devices.profiles import target_cost
    from edgemamba.session import Session

    session = Session(artifact, threads=threads)
    spec = session.spec
    on_gpu = target_cost(session.artifact.target).processor == "gpu"
    rng = np.random.default_rng(seed)
    process = psutil.Process()
    points = []
    for n in contexts:
        session.reset()
        t = time.perf_counter()
        session.prefill(rng.integers(0, spec.vocab_size, n))
        prefill_s = time.perf_counter() - t
        ids = rng.integers(0, spec.vocab_size, tokens + 4)
        for i in ids[:4]:  # warm-up
            session.step([i])
        lat = np.empty(tokens)
        for k in range(tokens):
            t = time.perf_counter()
            session.step([ids[4 + k]])
            lat[k] = time.perf_counter() - t
        ms = lat * 1e3
        points.append({"context": n, "decode_ms_p50": float(np.median(ms)), "decode_ms_p90": float(np.percentile(ms, 90)),
                       "prefill_tokens_per_s": n / prefill_s, "rss_bytes": int(process.memory_info().rss),
                       "state_bytes": spec.state_bytes(1)})
        if on_gpu:  # the weights and the state live in GPU memory
            points[-1]["gpu_memory_bytes"] = gpu_memory_in_use()
        if progress:
            print(f"context {n:>8}: decode p50 {points[-1]['decode_ms_p50']:.2f} ms/token, "
                  f"prefill {points[-1]['prefill_tokens_per_s']:.0f} tokens/s", file=sys.stderr)

    precision = session.artifact.precision
    kv_bytes_per_element = 4 if precision == "fp32" else 2  # the Transformer keeps K/V at the model's float type
    tf = transformer_shape(spec)
    mamba_step_bytes = weight_bytes(spec, precision) + 2 * spec.state_bytes(1)
    tf_weights = tf["n_params"] * kv_bytes_per_element
    base_ms = points[0]["decode_ms_p50"]
    for p in points:
        kv = kv_cache_bytes(tf, p["context"], kv_bytes_per_element)
        p["transformer_kv_bytes"] = kv
        p["transformer_weights_plus_kv_bytes"] = tf_weights + kv
        p["transformer_decode_ms_scaled"] = base_ms * (tf_weights + kv) / mamba_step_bytes
    return {
        "artifact": str(session.artifact.path), "target": session.artifact.target, "precision": precision,
        "engine": session.engine,
        "model": {"arch": spec.arch, "d_model": spec.d_model, "n_layer": spec.n_layer, "vocab_size": spec.vocab_size,
                  "n_params": spec.n_params, "source": spec.source},
        "decode_tokens_per_context": tokens, "threads": threads,
        "transformer": {**tf, "kv_bytes_per_element": kv_bytes_per_element,
                        "kv_formula": "2 * n_layer * d_model * context * bytes_per_element",
                        "latency_formula": "mamba_p50_at_first_context * (transformer_weight_bytes + kv_bytes) "
                                           "/ mamba_step_bytes"},
        "mamba_step_bytes": mamba_step_bytes,
        "points": points,
    }


def plot_context(result: dict, path) -> object:
    """Write the latency and memory panels for a context_sweep result; returns the matplotlib figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeMambaError("--plot needs matplotlib: pip install matplotlib") from None

    pts = result["points"]
    x = [p["context"] for p in pts]
    tf = result["transformer"]
    name = result["model"]["source"] or f"Mamba d_model {result['model']['d_model']} × {result['model']['n_layer']}"
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    lat.plot(x, [p["decode_ms_p50"] for p in pts], "o-", label="Mamba, measured p50")
    lat.plot(x, [p["decode_ms_p90"] for p in pts], "o:", color="C0", alpha=0.6, label="Mamba, measured p90")
    lat.plot(x, [p["transformer_decode_ms_scaled"] for p in pts], "s--", color="C3",
             label="Transformer, formula (bytes/token scaled)")
    lat.set(xscale="log", xlabel="context length (tokens)", ylabel="decode latency (ms/token)",
            title="Per-token latency")
    lat.set_ylim(bottom=0)
    mem.plot(x, [p["rss_bytes"] / 2**20 for p in pts], "o-", label="Mamba process RSS, measured")
    if all(p.get("gpu_memory_bytes") for p in pts):
        mem.plot(x, [p["gpu_memory_bytes"] / 2**20 for p in pts], "o-", color="C1",
                 label="GPU memory in use, measured (CUDA context included)")
    mem.plot(x, [p["state_bytes"] / 2**20 for p in pts], "o--", color="C2", label="Mamba state (fp32, exact)")
    mem.plot(x, [p["transformer_kv_bytes"] / 2**20 for p in pts], "s--", color="C3",
             label=f"Transformer KV cache ({tf['kv_bytes_per_element']} B/elem, formula)")
    mem.plot(x, [p["transformer_weights_plus_kv_bytes"] / 2**20 for p in pts], "s:", color="C3", alpha=0.6,
             label="Transformer weights + KV cache")
    mem.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="MiB", title="Memory")
    for ax in (lat, mem):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    engine = result.get("engine", result["target"])
    runs = f"{result['target']}/{result['precision']}" + (f", {engine} engine" if engine != result["target"] else "")
    fig.suptitle(f"{name} ({runs}) vs {tf['description']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version string: same data, same bytes
    plt.close(fig)
    return fig
