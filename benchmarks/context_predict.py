#!/usr/bin/env python3
"""Predicted against measured per-token latency and prefill throughput on this machine.

    python benchmarks/context_predict.py --threads 2                  # probe, predict, measure (native engine)
    python benchmarks/context_predict.py --threads 1 --precisions fp32,int8
    python benchmarks/context_predict.py --committed                  # ... with the ort-cpu costs in profiles.py
    python benchmarks/context_predict.py --engine ort                 # ONNX Runtime running the artifacts

The probe (`edgemamba devices --probe`) measures the machine and the engine's own costs without the
models validated: the native engine's from synthetic models built in memory through its C API
(edgemamba/devices/probe_native.py), ONNX Runtime's from micro-graphs (elementwise chains,
layer-sized MatMuls, the head's Gemm, an ONNX Scan of the state update: edgemamba/devices/probe.py),
so validation tests the prediction model, not a fit to itself.

Validation builds random-weight ort-cpu artifacts of two Mamba-1 shapes (no hub here) at each
precision: mamba-130m's (d_model 768, 24 layers, vocab 50280) and a small one (d_model 512, 12
layers, vocab 16384, fp32 weights larger than the 32 MiB L3 cache), and for each artifact probes
this machine at the thread count, predicts with that profile for the engine that runs the artifact,
and measures with `edgemamba.measure.bench_artifact` right after, in one process (as `edgemamba bench
ART --predict this` does). The machine is shared: before the
probe and before each measurement the script waits (up to --max-wait seconds) for other processes to use less
than --quiet of the CPUs, and it records what they used during each (/proc/stat minus this
process's own CPU time): `others` in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from edgemamba.checkpoint import Checkpoint  # noqa: E402
from edgemamba.spec import ModelSpec  # noqa: E402

CACHE = ROOT / ".cache" / "context"
CODE = ("edgemamba/kernels/cpu", "edgemamba/runtimes", "edgemamba/devices", "edgemamba/measure.py")  # what the rows run
SHAPES = {
    "mamba-130m-shape": ModelSpec("mamba1", 768, 24, 50280, 1536, 16, 4, dt_rank=48, source="random:mamba-130m-shape"),
    "small": ModelSpec("mamba1", 512, 12, 16384, 1024, 16, 4, dt_rank=32, source="random:small"),
}


def random_checkpoint(spec: ModelSpec, seed: int = 0) -> Checkpoint:
    """Random weights at a trained model's scales (timing only: the values do not matter, but
    denormals or overflow would)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in spec.weight_shapes().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            weights[name] = np.broadcast_to(np.log(np.arange(1, spec.d_state + 1, dtype=np.float32)), shape).copy()
        elif leaf in ("norm", "norm_f", "D", "gate_norm"):
            weights[name] = np.ones(shape, np.float32)
        elif leaf == "dt_bias":
            weights[name] = np.full(shape, -4.0, np.float32)
        else:
            weights[name] = rng.standard_normal(shape, dtype=np.float32) * 0.02
    return Checkpoint(spec, weights)


def artifact_for(name: str, precision: str = "fp32") -> Path:
    from edgemamba.artifact import compile_artifact

    path = CACHE / (f"{name}.em" if precision == "fp32" else f"{name}.{precision}.em")
    if not (path / "manifest.json").exists():
        compile_artifact(random_checkpoint(SHAPES[name]), path, "ort-cpu", precision, force=True)
    return path


# ---- the machine is shared ------------------------------------------------------------------------
def _busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (/proc/stat: all but idle and iowait)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def others_during(fn):
    """(fn(), the fraction of the machine's CPUs other processes used meanwhile)."""
    b0, o0, t0 = _busy_s(), _own_s(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    return out, max(0.0, (_busy_s() - b0) - (_own_s() - o0)) / (wall * os.cpu_count())


def wait_for_quiet(threshold: float, max_wait_s: float = 120.0) -> float:
    """Wait until other processes use less than `threshold` of the CPUs (or max_wait_s); the last fraction."""
    deadline = time.monotonic() + max_wait_s
    while True:
        _, busy = others_during(lambda: time.sleep(2.0))
        if busy < threshold or time.monotonic() > deadline:
            return busy


# ---- validation ---------------------------------------------------------------------------------
def validate(names, precisions, tokens: int, prompt_len: int, repeats: int, threads, committed: bool,
             engine: str, quiet: float, max_wait_s: float) -> list[dict]:
    from edgemamba.artifact import load_artifact
    from edgemamba.devices.predict import artifact_workload, predict
    from edgemamba.devices.probe import probe
    from edgemamba.measure import bench_artifact

    paths = {(n, p): artifact_for(n, p) for n in names for p in precisions}  # built before anything is timed
    key = "ort-cpu" if engine == "native" else f"ort-cpu/{engine}"
    rows = []
    for (name, precision), path in paths.items():
        wait_for_quiet(quiet, max_wait_s)  # probe, then measure right after: as `bench --predict this`
        profile, others = others_during(lambda: probe(gpu=False, threads=threads, costs=not committed))
        probed = {"others_cpu": others, "bandwidth_bytes_per_s": profile.cpu.bandwidth.value,
                  "fp32_ops_per_s": profile.cpu.peak_ops["fp32"].value, "cores": profile.cpu.cores,
                  "costs": {k: v.value for k, v in profile.measured_costs.get(key, {}).items()}}
        work = artifact_workload(load_artifact(path, verify=False), engine)
        pred = predict(work, profile, prompt_len=prompt_len)
        wait_for_quiet(quiet, max_wait_s)
        load_before = os.getloadavg()[0]
        meas, others = others_during(lambda: bench_artifact(path, tokens=tokens, prompt_len=prompt_len,
                                                            repeats=repeats, threads=threads, engine=engine))
        rows.append({
            "model": name, "precision": precision, "engine": meas["engine"], "isa": meas.get("isa", ""),
            "n_params": SHAPES[name].n_params,
            "weight_bytes": meas["weight_bytes"], "others_cpu": others, "probe": probed,
            "load_avg_1min": [load_before, os.getloadavg()[0]],
            "decode_ms": {"predicted": pred.decode_ms, "measured_p50": meas["decode_ms"]["p50"],
                          "error": pred.decode_ms / meas["decode_ms"]["p50"] - 1},
            "prefill_tokens_per_s": {"predicted": pred.prefill_tokens_per_s, "measured": meas["prefill_tokens_per_s"],
                                     "error": pred.prefill_tokens_per_s / meas["prefill_tokens_per_s"] - 1},
            "prediction": pred.to_dict(),
        })
        r = rows[-1]
        print(f"{name:>18} {precision}: decode predicted {r['decode_ms']['predicted']:.2f} ms, measured p50 "
              f"{r['decode_ms']['measured_p50']:.2f} ms ({r['decode_ms']['error']:+.0%}); prefill predicted "
              f"{r['prefill_tokens_per_s']['predicted']:.0f} tok/s, measured {r['prefill_tokens_per_s']['measured']:.0f} "
              f"({r['prefill_tokens_per_s']['error']:+.0%}); others {others:.0%} "
              f"(probe {probed['others_cpu']:.0%})",
              file=sys.stderr)
    return rows


def _git_head() -> str:
    """The checkout's commit, "+dirty" where the CPU engine or the prediction model differ from it."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT.parent, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", *CODE) else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--engine", choices=("native", "ort"), default="native")
    ap.add_argument("--committed", action="store_true",
                    help="predict with the engine's costs in profiles.py instead of the probe's measurement of them")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", type=float, default=0.1,
                    help="wait for other processes to use less than this fraction of the CPUs before each phase")
    ap.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for --quiet at most")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    rows = validate(args.models.split(","), args.precisions.split(","), args.tokens, args.prompt_len, args.repeats,
                    args.threads, args.committed, args.engine, args.quiet, args.max_wait)
    result = {"machine": os.uname().nodename, "threads": args.threads, "engine": args.engine, "git": _git_head(),
              "load_avg": os.getloadavg(),
              "costs": "edgemamba/devices/profiles.py" if args.committed else "measured by the probe",
              "validation": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
