"""tvm-llvm beside ort-cpu on this CPU: `edgemamba bench` on artifacts of one checkpoint, alternating.

    python benchmarks/cpu_tvm.py [--size 130m] [--arch mamba1] [--rounds 3] [--threads 2]

A random-weight transformers checkpoint of the size is written under benchmarks/.cache (no hub here),
compiled with `edgemamba compile` for ort-cpu fp32 and tvm-llvm fp32, fp16 and int8, then each artifact
is benchmarked in its own process per round (`edgemamba bench ART --tokens T --prompt-len 512 --repeats 3
--threads N --json`), the artifacts alternating within each round. Prints a markdown table of medians
over rounds and the load average seen by each run (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "cpu_tvm"
SIZES = {"130m": (768, 24), "370m": (1024, 48)}
ARTIFACTS = [("ort-cpu", "fp32"), ("tvm-llvm", "fp32"), ("tvm-llvm", "fp16"), ("tvm-llvm", "int8")]


def checkpoint(size: str, arch: str) -> Path:
    d_model, n_layer = SIZES[size]
    out = CACHE / f"{arch}-{size}"
    if (out / "config.json").exists():
        return out
    import torch
    import transformers

    torch.manual_seed(0)
    if arch == "mamba1":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(
            hidden_size=d_model, num_hidden_layers=n_layer, vocab_size=50280))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            hidden_size=d_model, num_hidden_layers=n_layer, vocab_size=50280, num_heads=2 * d_model // 64,
            head_dim=64, n_groups=1, state_size=128))
    model.save_pretrained(out)
    return out


def edgemamba(*args) -> str:
    return subprocess.run([sys.executable, "-m", "edgemamba", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="130m", choices=list(SIZES))
    ap.add_argument("--arch", default="mamba1", choices=["mamba1", "mamba2"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()

    ckpt = checkpoint(a.size, a.arch)
    arts = {}
    for target, prec in ARTIFACTS:
        path = CACHE / f"{a.arch}-{a.size}.{target}.{prec}.em"
        if not (path / "manifest.json").exists():
            t = time.perf_counter()
            edgemamba("compile", str(ckpt), "--target", target, "--precision", prec, "-o", str(path), "--force")
            print(f"compiled {target}/{prec} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        arts[(target, prec)] = path

    runs: dict[tuple, list[dict]] = {k: [] for k in arts}
    for r in range(a.rounds):
        for key, path in arts.items():
            load = os.getloadavg()[0]
            res = json.loads(edgemamba("bench", str(path), "--tokens", str(a.tokens), "--prompt-len", "512",
                                       "--repeats", "3", "--threads", str(a.threads), "--json"))
            res["load"] = load
            runs[key].append(res)
            print(f"round {r + 1} {key}: decode p50 {res['decode_ms']['p50']:.2f} ms, "
                  f"prefill {res['prefill_tokens_per_s']:.0f} tok/s, load {load:.1f}", file=sys.stderr)

    base = statistics.median(x["decode_ms"]["p50"] for x in runs[ARTIFACTS[0]])
    print(f"| target / precision | decode ms/token p50 (median of {a.rounds}) | vs ort-cpu fp32 | "
          f"prefill-512 tok/s | peak RSS MiB | weights MiB | load avg at runs |")
    print("|---|---|---|---|---|---|---|")
    for key, xs in runs.items():
        dec = statistics.median(x["decode_ms"]["p50"] for x in xs)
        pre = statistics.median(x["prefill_tokens_per_s"] for x in xs)
        rss = max(x["peak_rss_bytes"] for x in xs) / 2**20
        wts = xs[0]["weight_bytes"] / 2**20
        loads = "-".join(f"{x['load']:.1f}" for x in xs)
        print(f"| {key[0]} {key[1]} | {dec:.2f} | {dec / base:.2f} | {pre:.0f} | {rss:.0f} | {wts:.0f} | {loads} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
