"""edgemamba (ort-cpu) beside Hugging Face transformers on the CPU, in one run (issue 3's bars).

    python benchmarks/cpu_vs_transformers.py --threads 2 --repeats 5

Random weights of the mamba-130m shape. Each repeat times both peers back to back (ABAB), so
they share the machine's noise; medians and ratios are reported:
- decode: ms/token of edgemamba's step vs transformers' `generate` (greedy, cache on);
- prefill: a 512-token prompt through the prefill graph vs the same tokens fed one `step` each;
- flatness: decode p50 at context position 8192 vs 64;
- memory: edgemamba's peak RSS (its own process) vs 1.3 × weight bytes + 150 MB.
Appends a section with the command to benchmarks/RESULTS.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def make_checkpoint(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    import torch
    import transformers as T

    torch.manual_seed(0)
    T.MambaForCausalLM(T.MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280)).save_pretrained(path)
    return path


def edgemamba(*args) -> str:
    out = subprocess.run([sys.executable, "-m", "edgemamba", *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return out.stdout


def bench_edgemamba(art: Path, threads: int, **kw) -> dict:
    """One `edgemamba bench` in its own process (so its peak RSS is its own)."""
    extra = [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", v)]
    return json.loads(edgemamba("bench", art, "--json", "--threads", threads, *extra))


def bench_step_prefill(art: Path, threads: int, n: int) -> float:
    """Seconds to feed n tokens through `step`, one call per token (the baseline for prefill)."""
    code = (
        "import sys,time,numpy as np; from edgemamba import Session;"
        f"s=Session({str(art)!r}, threads={threads}); ids=np.random.default_rng(0).integers(0,50280,{n});"
        "s.step([ids[0]]); t=time.perf_counter();\nfor i in ids: s.step([i])\nprint(time.perf_counter()-t)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


PAIRED_FLAT = """
import sys, time, numpy as np
from edgemamba import Session
art, threads, near_ctx, far_ctx, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(0)
near, far = Session(art, threads=threads), Session(art, threads=threads)
vocab = near.spec.vocab_size
near.prefill(rng.integers(0, vocab, near_ctx)); far.prefill(rng.integers(0, vocab, far_ctx))
ids = rng.integers(0, vocab, steps + 10)
t_near, t_far = [], []
for i, tok in enumerate(ids):  # alternate which goes first, so neither always follows the other
    for s, out in ((near, t_near), (far, t_far)) if i % 2 else ((far, t_far), (near, t_near)):
        t = time.perf_counter(); s.step([tok]); out.append(time.perf_counter() - t)
print(np.median(t_near[10:]) * 1e3, np.median(t_far[10:]) * 1e3, near.engine)
"""


def paired_flatness(art: Path, threads: int, far: int, near: int = 64, steps: int = 300) -> tuple[float, float]:
    """p50 decode ms at context `near` and `far`, measured in one process by stepping two sessions
    alternately: both see the same machine noise at the same moment."""
    cmd = [sys.executable, "-c", PAIRED_FLAT, str(art), str(threads), str(near), str(far), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def bench_transformers(ckpt: Path, threads: int, n: int) -> float:
    """ms/token of transformers' generate (fp32, greedy, cache), measured as (T(n+1) - T(1)) / n."""
    code = f"""
import time, torch, transformers as T
torch.set_num_threads({threads})
m = T.MambaForCausalLM.from_pretrained({str(ckpt)!r}).eval()
ids = torch.randint(0, 50000, (1, 16), generator=torch.Generator().manual_seed(0))
def gen(k):
    with torch.inference_mode():
        m.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
gen(2)
t = time.perf_counter(); gen(1); t1 = time.perf_counter() - t
t = time.perf_counter(); gen({n} + 1); tn = time.perf_counter() - t
print((tn - t1) / {n} * 1e3)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128, help="decode tokens per measurement")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--only-flat-rss", action="store_true", help="only the flatness and memory rows")
    a = p.parse_args()
    ckpt = make_checkpoint(CACHE / "mamba-130m-random")
    art = Path(tempfile.mkdtemp()) / "m130.em"
    edgemamba("compile", ckpt, "--precision", "fp32", "-o", art)

    em_decode, hf_decode, prefill_tps, step_s, rss, flat64, flat8k = [], [], [], [], [], [], []
    for r in range(0 if a.only_flat_rss else a.repeats):
        b = bench_edgemamba(art, a.threads, tokens=a.tokens, prompt_len=512, repeats=3)
        em_decode.append(b["decode_ms"]["p50"])
        prefill_tps.append(b["prefill_tokens_per_s"])
        rss.append(b["peak_rss_bytes"])
        weight_bytes = b["weight_bytes"]
        hf_decode.append(bench_transformers(ckpt, a.threads, a.tokens))
        step_s.append(bench_step_prefill(art, a.threads, 512))
        print(f"repeat {r}: edgemamba {em_decode[-1]:.2f} ms/token, transformers {hf_decode[-1]:.2f}, "
              f"prefill {prefill_tps[-1]:.0f} tok/s vs step {512 / step_s[-1]:.0f} tok/s", flush=True)
    if a.only_flat_rss:
        b = bench_edgemamba(art, a.threads, tokens=64, prompt_len=512, repeats=1)
        rss, weight_bytes = [b["peak_rss_bytes"]], b["weight_bytes"]
    for r in range(max(2, a.repeats // 2)):  # flatness: two sessions stepped alternately, same noise
        near, far = paired_flatness(art, a.threads, 8192)
        flat64.append(near)
        flat8k.append(far)

    med = statistics.median
    if a.only_flat_rss:
        em_decode = hf_decode = prefill_tps = step_s = [float("nan")]
    decode_ratio = med(em_decode) / med(hf_decode)
    prefill_ratio = med(prefill_tps) / (512 / med(step_s))
    flat = med(flat8k) / med(flat64) - 1
    rss_limit = 1.3 * weight_bytes + 150 * 2**20
    rows = [
        ("decode ms/token, edgemamba fp32 / transformers generate", f"{med(em_decode):.2f} / {med(hf_decode):.2f}",
         f"{decode_ratio:.2f}×", "≤ 0.45×", decode_ratio <= 0.45),
        ("prefill 512 tokens: prefill graph / one step per token (tokens/s)",
         f"{med(prefill_tps):.0f} / {512 / med(step_s):.0f}", f"{prefill_ratio:.1f}×", "≥ 5×", prefill_ratio >= 5),
        ("decode p50 at context 8192 vs 64 (ms; two sessions stepped alternately in one process)", f"{med(flat8k):.2f} / {med(flat64):.2f}", f"{flat:+.1%}", "within ±5%",
         abs(flat) <= 0.05),
        ("peak RSS (MiB) vs 1.3 × weights + 150 MiB", f"{med(rss) / 2**20:.0f} / {rss_limit / 2**20:.0f}",
         f"{med(rss) / rss_limit:.2f}×", "≤ 1×", med(rss) <= rss_limit),
    ]
    cmd = "python benchmarks/cpu_vs_transformers.py " + " ".join(sys.argv[1:])
    lines = [
        "\n## CPU: edgemamba ort-cpu fp32 vs transformers (issue 3)\n",
        f"`{cmd}` — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {a.threads} threads, mamba-130m shape, "
        f"random weights, medians of {a.repeats} interleaved repeats (the machine was shared with other jobs: "
        "absolute times are noisy, ratios are taken side by side).\n",
        "| measure | values | ratio | bar | met |", "|---|---|---|---|---|",
        *[f"| {n} | {v} | {r} | {bar} | {'yes' if ok else 'NO'} |" for n, v, r, bar, ok in rows],
        f"\nRaw: edgemamba decode {[round(x, 2) for x in em_decode]}, transformers {[round(x, 2) for x in hf_decode]}, "
        f"flat 64 {[round(x, 2) for x in flat64]}, flat 8192 {[round(x, 2) for x in flat8k]}.\n",
    ]
    with open(a.out, "a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
