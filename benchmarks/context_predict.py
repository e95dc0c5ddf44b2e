#!/usr/bin/env python3
"""Predicted against measured per-token latency and prefill throughput on this machine.

    python benchmarks/context_predict.py                    # probe (with ONNX Runtime's costs), predict, measure
    python benchmarks/context_predict.py --committed        # ... with the ort-cpu costs in profiles.py
    OPENBLAS_NUM_THREADS=2 python benchmarks/context_predict.py --threads 2

The probe (`edgemamba devices --probe`) measures the machine and ONNX Runtime's own costs with
micro-graphs only (elementwise chains, layer-sized MatMuls, the head's Gemm, an ONNX Scan of the
state update: edgemamba/devices/probe.py), never the models validated, so validation tests the
prediction model, not a fit to itself.

Validation builds random-weight artifacts of two Mamba-1 shapes (no hub here): mamba-130m's
(d_model 768, 24 layers, vocab 50280) and a small one (d_model 512, 12 layers, vocab 16384, weights
larger than the 32 MiB L3 cache), probes this machine (`edgemamba devices --probe`), predicts with
that profile, and measures with `edgemamba.measure.bench_artifact` right after, in one process. The
machine is shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from edgemamba.checkpoint import Checkpoint  # noqa: E402
from edgemamba.spec import ModelSpec  # noqa: E402

CACHE = ROOT / ".cache" / "context"
MEASURED = ("launch_s", "call_s", "weight_read_efficiency", "head_read_efficiency", "state_element_s", "scan_step_s")
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


def artifact_for(name: str) -> Path:
    from edgemamba.artifact import compile_artifact

    path = CACHE / f"{name}.em"
    if not (path / "manifest.json").exists():
        compile_artifact(random_checkpoint(SHAPES[name]), path, force=True)
    return path


# ---- validation ---------------------------------------------------------------------------------
def validate(names, tokens: int, prompt_len: int, repeats: int, threads, committed: bool) -> list[dict]:
    from edgemamba.artifact import load_artifact
    from edgemamba.devices.predict import artifact_workload, predict
    from edgemamba.devices.probe import probe
    from edgemamba.measure import bench_artifact

    rows = []
    for name in names:
        path = artifact_for(name)
        profile = probe(gpu=False, threads=threads, costs=not committed)
        pred = predict(artifact_workload(load_artifact(path, verify=False)), profile, prompt_len=prompt_len)
        load_before = os.getloadavg()[0]
        meas = bench_artifact(path, tokens=tokens, prompt_len=prompt_len, repeats=repeats, threads=threads)
        rows.append({
            "model": name, "n_params": SHAPES[name].n_params, "load_avg_1min": [load_before, os.getloadavg()[0]],
            "probe": {"bandwidth_bytes_per_s": profile.cpu.bandwidth.value,
                      "fp32_ops_per_s": profile.cpu.peak_ops["fp32"].value, "cores": profile.cpu.cores,
                      "ort_costs": {k: getattr(profile.cost("ort-cpu"), k).value for k in MEASURED}},
            "decode_ms": {"predicted": pred.decode_ms, "measured_p50": meas["decode_ms"]["p50"],
                          "error": pred.decode_ms / meas["decode_ms"]["p50"] - 1},
            "prefill_tokens_per_s": {"predicted": pred.prefill_tokens_per_s, "measured": meas["prefill_tokens_per_s"],
                                     "error": pred.prefill_tokens_per_s / meas["prefill_tokens_per_s"] - 1},
            "prediction": pred.to_dict(),
        })
        r = rows[-1]
        print(f"{name:>18}: decode predicted {r['decode_ms']['predicted']:.2f} ms, measured p50 "
              f"{r['decode_ms']['measured_p50']:.2f} ms ({r['decode_ms']['error']:+.0%}); prefill predicted "
              f"{r['prefill_tokens_per_s']['predicted']:.0f} tok/s, measured {r['prefill_tokens_per_s']['measured']:.0f} "
              f"({r['prefill_tokens_per_s']['error']:+.0%}); load {load_before:.1f}", file=sys.stderr)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--committed", action="store_true",
                    help="predict with the ort-cpu costs in profiles.py instead of the probe's measurement of them")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    result = {"machine": os.uname().nodename, "threads": args.threads, "load_avg": os.getloadavg(),
              "ort_costs": "edgemamba/devices/profiles.py" if args.committed else "measured by the probe",
              "validation": validate(args.models.split(","), args.tokens, args.prompt_len, args.repeats,
                                     args.threads, args.committed)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
