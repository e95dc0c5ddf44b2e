"""Precision: accuracy on held-out text, artifact size and CPU decode speed, per precision, beside
ONNX Runtime's naive `quantize_dynamic` of the same fp32 graph (issue 4's bars).

    python benchmarks/precision.py --tokens 4096 --repeats 5 --threads 2

Accuracy: the trained demo model (edgemamba/data/demo-mamba), teacher-forced over held-out
Python source it never saw (edgemamba/data/heldout.txt), against the float32 NumPy reference.
Speed and size: random weights of the mamba-130m shape, decode p50 of each precision measured
in rotation (every repeat times all of them), ratios to fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / "edgemamba" / "data"
PRECISIONS = ("fp32", "fp16", "int8", "int4", "w8a8")
BARS = {"fp16": "top-1 ≥ 99.5%, ppl ≤ +0.1%", "int8": "top-1 ≥ 99%, ppl ≤ +0.5%", "w8a8": "ppl ≤ +2%",
        "int4": "ppl ≤ +4%", "fp32": "identical"}


def cli(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "edgemamba", *map(str, args)], capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise RuntimeError(r.stderr)
    return r.stdout


def compile_all(ckpt: Path, out: Path, calib: Path) -> dict[str, Path]:
    arts = {}
    for p in PRECISIONS:
        arts[p] = out / f"{p}.em"
        cli("compile", ckpt, "--precision", p, "--calib", calib, "-o", arts[p], "--force")
    return arts


def naive_dynamic(ckpt: Path, out: Path) -> Path:
    """ORT's quantize_dynamic (int8 weights, dynamic per-tensor uint8 activations) on the plain
    exported fp32 step graph (`edgemamba export`: standard ONNX, what a user would hand it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    cli("export", ckpt, "-o", out / "export", "--force")
    path = out / "naive_step.onnx"
    quantize_dynamic(str(out / "export" / "step.onnx"), str(path), weight_type=QuantType.QInt8,
                     use_external_data_format=True)
    return path


def score_graph(step_path: Path, spec, ids: np.ndarray) -> np.ndarray:
    """Teacher-forced logits through a bare step graph (for the naive baseline)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(str(step_path), so, providers=["CPUExecutionProvider"])
    state = {i.name: np.zeros([1 if d == "batch" else d for d in i.shape], np.float32)
             for i in s.get_inputs() if i.name != "input_ids"}
    names = [o.name for o in s.get_outputs()]
    out = np.empty((ids.size, spec.vocab_size), np.float32)
    for j, t in enumerate(ids):
        res = dict(zip(names, s.run(None, {"input_ids": np.array([[t]]), **state})))
        out[j] = res["logits"][0]
        state = {k: res[k.replace("past_", "present_")] for k in state}
    return out


def accuracy(tokens: int, work: Path) -> list[dict]:
    from tokenizers import Tokenizer

    from edgemamba.checkpoint import load_checkpoint
    from edgemamba.reference import Reference
    from edgemamba.verify import compare_logits, read_ids, verify_artifact

    ckpt = DATA / "demo-mamba"
    arts = compile_all(ckpt, work / "demo", DATA / "calib.txt")
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    ids = read_ids(DATA / "heldout.txt", tok, tokens)
    rows = []
    for p, art in arts.items():
        r = verify_artifact(art, ckpt, ids, greedy_tokens=64)
        r["name"] = p
        rows.append(r)
        print(f"{p}: top-1 {r['top1_agreement']:.4f} ppl {r['ppl_increase']:+.3%}", flush=True)
    ck = load_checkpoint(ckpt)
    ref, _ = Reference(ck).forward(ids[None])
    naive = compare_logits(ref[0], score_graph(naive_dynamic(ckpt, work), ck.spec, ids), ids)
    naive["name"] = "ORT quantize_dynamic (naive int8)"
    naive["passed"] = None
    rows.append(naive)
    return rows


def speed(repeats: int, threads: int, work: Path) -> tuple[list[dict], dict]:
    sys.path.insert(0, str(HERE))
    from cpu_vs_transformers import CACHE, make_checkpoint

    ckpt = make_checkpoint(CACHE / "mamba-130m-random")
    calib = work / "calib_ids.txt"
    calib.write_text(" ".join(map(str, np.random.default_rng(0).integers(0, 50280, 512))))
    arts = compile_all(ckpt, work / "m130", calib)
    from edgemamba.artifact import load_artifact

    naive = naive_dynamic(ckpt, work / "naive130")
    sizes = {p: sum(f["bytes"] for f in load_artifact(a, verify=False).manifest["files"].values()) for p, a in arts.items()}
    sizes["naive"] = sum(f.stat().st_size for f in (work / "naive130").iterdir() if f.is_file())
    times: dict[str, list[float]] = {p: [] for p in (*PRECISIONS, "naive")}
    rss: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(repeats):
        for p, art in arts.items():
            b = json.loads(cli("bench", art, "--json", "--threads", threads, "--tokens", 128, "--prompt-len", 64,
                               "--repeats", 1))
            times[p].append(b["decode_ms"]["p50"])
            rss[p].append(b["peak_rss_bytes"])
        times["naive"].append(_time_graph(naive, threads))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), flush=True)
    med = {p: statistics.median(v) for p, v in times.items()}
    rows = [{"name": p, "ms": med[p], "ratio": med[p] / med["fp32"], "size_ratio": sizes[p] / sizes["fp32"],
             "rss_MiB": statistics.median(rss[p]) / 2**20 if p in rss else None} for p in times]
    return rows, times


def _time_graph(path: Path, threads: int, n: int = 128) -> float:
    code = f"""
import time, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = {threads}
s = ort.InferenceSession({str(path)!r}, so, providers=["CPUExecutionProvider"])
state = {{i.name: np.zeros([1 if d == "batch" else d for d in i.shape], np.float32) for i in s.get_inputs() if i.name != "input_ids"}}
names = [o.name for o in s.get_outputs()]
ts = []
for j in range({n} + 8):
    t = time.perf_counter(); res = dict(zip(names, s.run(None, {{"input_ids": np.array([[j % 1000]]), **state}})))
    ts.append(time.perf_counter() - t)
    state = {{k: res[k.replace("past_", "present_")] for k in state}}
print(np.median(ts[8:]) * 1e3)
"""
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp())
    acc = [] if a.skip_accuracy else accuracy(a.tokens, work)
    lines = [
        "\n## Precision: accuracy, size and CPU speed (issue 4)\n",
        f"`python benchmarks/precision.py {' '.join(sys.argv[1:])}` — {time.strftime('%Y-%m-%d')}.\n",
    ]
    if acc:
        lines += [
            f"Accuracy: the trained demo model, teacher-forced over {acc[0]['tokens']} held-out tokens, against the "
            "float32 NumPy reference (`edgemamba verify`).\n",
            "| precision | top-1 agreement | mean KL | perplexity (ref → artifact) | Δ ppl | identical greedy (of 64) | bar | met |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for r in acc:
        met = "—" if r["passed"] is None else ("yes" if r["passed"] else "NO")
        lines.append(f"| {r['name']} | {r['top1_agreement']:.2%} | {r['mean_kl']:.2e} | {r['ppl_reference']:.3f} → "
                     f"{r['ppl_artifact']:.3f} | {r['ppl_increase']:+.2%} | {r.get('greedy_identical_tokens', '—')} | "
                     f"{BARS.get(r['name'], 'baseline')} | {met} |")
    if not a.skip_speed:
        rows, raw = speed(a.repeats, a.threads, work)
        lines += [
            f"\nSpeed and size: mamba-130m shape (random weights), {a.threads} threads, decode p50 (ms/token), "
            f"median of {a.repeats} rotations; the machine was shared with other jobs, so compare ratios.\n",
            "| precision | decode ms/token | ratio to fp32 | bar | artifact size / fp32 | bar | peak RSS MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        speed_bar = {"int8": 0.5, "int4": 0.4}
        size_bar = {"int8": 0.3, "int4": 0.2}
        for r in rows:
            sb = f"≤ {speed_bar[r['name']]}× ({'met' if r['ratio'] <= speed_bar[r['name']] else 'NOT met'})" if r["name"] in speed_bar else ""
            zb = f"≤ {size_bar[r['name']]}× ({'met' if r['size_ratio'] <= size_bar[r['name']] else 'NOT met'})" if r["name"] in size_bar else ""
            rss = f"{r['rss_MiB']:.0f}" if r["rss_MiB"] else "—"
            lines.append(f"| {r['name']} | {r['ms']:.2f} | {r['ratio']:.2f}× | {sb} | {r['size_ratio']:.2f}× | {zb} | {rss} |")
        lines.append(f"\nRaw decode ms: {json.dumps({k: [round(x, 2) for x in v] for k, v in raw.items()})}\n")
    with open(a.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
