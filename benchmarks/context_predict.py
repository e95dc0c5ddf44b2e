#!/usr/bin/env python3
"""Calibrate the ort-cpu target costs, then check predictions against measurement on this machine.

    python benchmarks/context_predict.py --calibrate        # micro-benchmarks -> ort-cpu constants
    python benchmarks/context_predict.py --validate         # predicted vs measured, 130m + small shapes
    python benchmarks/context_predict.py --calibrate --validate   # ... with this run's calibration

Calibration uses ONNX Runtime micro-graphs only (a chain of elementwise nodes, a 1-node graph, a
large matrix-vector product as MatMul and as the head's Gemm(transB=1), an ONNX Scan of the Mamba state update at two state sizes), never the
models validated, so validation tests the model, not a fit to itself.

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
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from edgemamba.checkpoint import Checkpoint  # noqa: E402
from edgemamba.spec import ModelSpec  # noqa: E402

CACHE = ROOT / ".cache" / "context"
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


# ---- calibration --------------------------------------------------------------------------------
def _session(model, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.disable_prepacking", "1")  # as the ORT backend runs
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _median_s(fn, n):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _model(nodes, inputs, outputs, inits=()):
    from onnx import helper

    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                             opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def calibrate(threads: int) -> dict:
    from onnx import TensorProto, helper, numpy_helper

    from edgemamba.devices.probe import bandwidth_test_bytes, measure_read_bandwidth

    f32 = TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    out = {}

    # per-node and per-call overhead: chains of 1 and 401 elementwise nodes on a d_inner-sized row
    width = 1536
    def chain(k):
        nodes, prev = [], "x"
        for i in range(k):
            nodes.append(helper.make_node("Mul" if i % 2 else "Add", [prev, "c"], [f"y{i}"]))
            prev = f"y{i}"
        c = numpy_helper.from_array(np.full((1, width), 1.0, np.float32), "c")
        return _model(nodes, [vi("x", f32, [1, width])], [vi(prev, f32, [1, width])], [c])
    x = np.ones((1, width), np.float32)
    one, many = _session(chain(1), threads), _session(chain(401), threads)
    t1 = _median_s(lambda: one.run(None, {"x": x}), 2000)
    t401 = _median_s(lambda: many.run(None, {"x": x}), 300)
    out["launch_s"] = (t401 - t1) / 400
    out["call_s"] = t1 - out["launch_s"]

    # matrix-vector products: a chain of layer-sized (1024², 4 MiB) MatMuls, all together 4× the
    # last-level cache, so each streams from memory and pays its own dispatch, as in a decode step
    total = bandwidth_test_bytes()
    k = 1024
    count = total // (4 * k * k)
    names = [f"w{i}" for i in range(count)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"y{i - 1}", w], [f"y{i}"]) for i, w in enumerate(names)]
    model = _model(nodes, [vi("x", f32, [1, k])] + [vi(w, f32, [k, k]) for w in names],
                   [vi(f"y{count - 1}", f32, [1, k])])
    feeds = {"x": np.ones((1, k), np.float32)}
    feeds.update({w: np.full((k, k), 1.0 / k, np.float32) for w in names})  # weights as inputs: never prepacked
    sess = _session(model, threads)
    ort_bw = total / _median_s(lambda: sess.run(None, feeds), 9)
    del sess, feeds
    np_bw = measure_read_bandwidth(total)
    out["ort_gemv_bytes_per_s"], out["numpy_gemv_bytes_per_s"] = ort_bw, np_bw
    out["weight_read_efficiency"] = ort_bw / np_bw
    k = 4096
    n = total // (4 * k)
    xv = np.ones((1, k), np.float32)
    # the head: Gemm(h, table, transB=1) over a (vocab, d_model)-shaped table of the same size
    table = numpy_helper.from_array(np.full((n, k), 1e-3, np.float32), "table")
    head = _session(_model([helper.make_node("Gemm", ["x", "table"], ["y"], transB=1)], [vi("x", f32, [1, k])],
                           [vi("y", f32, [1, n])], [table]), threads)
    head_bw = k * n * 4 / _median_s(lambda: head.run(None, {"x": xv}), 15)
    out["ort_head_bytes_per_s"], out["head_read_efficiency"] = head_bw, head_bw / np_bw
    del head

    # the prefill scan: ONNX Scan of h' = exp(dt·A)·h + dtx·B, y = h'·C over 256 steps, two sizes
    per_step = {}
    for e in (512, 2048):
        ns = 16
        body = helper.make_graph(
            [helper.make_node("Mul", ["dt_t", "A"], ["da"]), helper.make_node("Exp", ["da"], ["eda"]),
             helper.make_node("Mul", ["eda", "h_in"], ["decay"]), helper.make_node("Mul", ["dtx_t", "B_t"], ["inp"]),
             helper.make_node("Add", ["decay", "inp"], ["h_out"]), helper.make_node("MatMul", ["h_out", "C_t"], ["y_t"])],
            "body", [vi("h_in", f32, [1, e, ns]), vi("dt_t", f32, [1, e, 1]), vi("dtx_t", f32, [1, e, 1]),
                     vi("B_t", f32, [1, 1, ns]), vi("C_t", f32, [1, ns, 1])],
            [vi("h_out", f32, [1, e, ns]), vi("y_t", f32, [1, e, 1])])
        scan = helper.make_node("Scan", ["h0", "dt", "dtx", "B", "C"], ["h", "y"], body=body, num_scan_inputs=4,
                                scan_input_axes=[1] * 4, scan_output_axes=[1])
        a = numpy_helper.from_array(-np.tile(np.arange(1, ns + 1, dtype=np.float32), (e, 1)), "A")
        steps = 256
        model = _model([scan], [vi("h0", f32, [1, e, ns]), vi("dt", f32, [1, steps, e, 1]),
                                vi("dtx", f32, [1, steps, e, 1]), vi("B", f32, [1, steps, 1, ns]),
                                vi("C", f32, [1, steps, ns, 1])],
                       [vi("h", f32, [1, e, ns]), vi("y", f32, [1, steps, e, 1])], [a])
        sess = _session(model, threads)
        feeds = {"h0": np.zeros((1, e, ns), np.float32), "dt": np.full((1, steps, e, 1), 0.01, np.float32),
                 "dtx": np.full((1, steps, e, 1), 0.01, np.float32), "B": np.ones((1, steps, 1, ns), np.float32),
                 "C": np.ones((1, steps, ns, 1), np.float32)}
        per_step[e * ns] = _median_s(lambda: sess.run(None, feeds), 7) / steps
    (s1, t1), (s2, t2) = sorted(per_step.items())
    out["state_element_s"] = (t2 - t1) / (s2 - s1)
    out["scan_step_s"] = t1 - s1 * out["state_element_s"]
    return out


# ---- validation ---------------------------------------------------------------------------------
def with_calibration(calibration: dict) -> None:
    """Use freshly calibrated ort-cpu costs (in this process) instead of the ones in profiles.py."""
    import dataclasses

    from edgemamba.devices import profiles

    fields = {f.name for f in dataclasses.fields(profiles.TargetCost)}
    measured = {k: profiles.Figure(v, "measured: this run") for k, v in calibration.items() if k in fields}
    profiles.TARGET_COSTS["ort-cpu"] = dataclasses.replace(profiles.TARGET_COSTS["ort-cpu"], **measured)


def validate(names, tokens: int, prompt_len: int, repeats: int, threads) -> list[dict]:
    from edgemamba.artifact import load_artifact
    from edgemamba.devices.predict import artifact_workload, predict
    from edgemamba.devices.probe import probe
    from edgemamba.measure import bench_artifact

    rows = []
    for name in names:
        path = artifact_for(name)
        profile = probe(gpu=False, threads=threads)
        pred = predict(artifact_workload(load_artifact(path, verify=False)), profile, prompt_len=prompt_len)
        load_before = os.getloadavg()[0]
        meas = bench_artifact(path, tokens=tokens, prompt_len=prompt_len, repeats=repeats, threads=threads)
        rows.append({
            "model": name, "n_params": SHAPES[name].n_params, "load_avg_1min": [load_before, os.getloadavg()[0]],
            "probe": {"bandwidth_bytes_per_s": profile.cpu.bandwidth.value,
                      "fp32_ops_per_s": profile.cpu.peak_ops["fp32"].value, "cores": profile.cpu.cores},
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
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    from edgemamba.devices.probe import _physical_cores

    result = {"machine": os.uname().nodename, "cores": _physical_cores(), "load_avg": os.getloadavg()}
    if args.calibrate:
        result["calibration"] = calibrate(args.threads or _physical_cores())
        print(json.dumps(result["calibration"], indent=2))
    if args.validate:
        if args.calibrate:
            with_calibration(result["calibration"])
        result["costs"] = "calibrated in this run" if args.calibrate else "edgemamba/devices/profiles.py"
        result["validation"] = validate(args.models.split(","), args.tokens, args.prompt_len, args.repeats,
                                        args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
