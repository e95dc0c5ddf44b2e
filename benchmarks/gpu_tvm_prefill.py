"""tvm-cuda prefill on synthetic models (layer shapes no validated model has): the measurements behind the
prediction's tvm-cuda prefill figures, and a check of the probe's token-sequential kernels against TVM's own.

  python benchmarks/gpu_tvm_prefill.py build OUT [--arch sm_90]                        # here: TVM compiler
  python3 benchmarks/gpu_tvm_prefill.py run OUT --profile IN.json --write FIT.json     # there: runtime only
  python3 benchmarks/gpu_tvm_prefill.py ab OUT1 [OUT2 ...] [--models M,...]           # there: gpu_tvm.py builds

ab: the prefill of gpu_tvm.py's models (mamba_ssm's shapes, its seeded fp16 weights) in one call of 2,048
tokens, for each build (`gpu_tvm.py build OUTi`, e.g. one per prefill variant): last logits of a 150-token
prefill against the NumPy reference, of the 2,048-token prefill against 2,048 steps of the same build (CUDA
graphs), wall time (median of 5, two rounds, the second in reverse order) and every kernel's GPU time (torch
profiler over one prefill: µs and launches by kernel, their sum against the wall time).

build: weightless tvm-cuda fp16 libraries of Mamba-1 and Mamba-2 models with synthetic layers (d_model
1024, d_inner 2048; Mamba-1: d_state 16, dt_rank 64; Mamba-2: 32 heads of 64, d_state 128), 2 and 8 layers,
a 4096-token vocabulary; TVM's runtime libraries in OUT/runtime.

run: seeded random weights; per library a 512-token prefill in Session's chunks of 256: wall time (median
of 5) and every kernel's GPU time (torch profiler), and the model's figures fitted from them:
  kloop_step_s          the prefill's matrix products' GPU time / their K-tile steps (predict.kloop_steps)
  chunk_launch_extra_s  wall time beyond the kernels' GPU time, per kernel: solved from the 2- and 8-layer
                        libraries with a constant per chunk, averaged over the two architectures
and the token-sequential part three ways, ns per token and layer (conv + scan): TVM's kernels inside the
prefill; TVM's kernels alone (probe.measure_scan_step: what `edgemamba devices --probe --tvm-library
OUT/mamba1-L2.em` reports as scan_step_s); and CUDA C of the same structure (below) in the same harness,
a generic kernel the probe does not use, because it is no proxy for TVM's (RESULTS.md, issue 9).
--write: IN.json (a profile from `edgemamba devices --probe --json`) with the two fitted figures and the
Mamba-1 library's scan step added to its tvm-cuda costs; --json: everything measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgemamba.spec import ModelSpec  # noqa: E402

CHUNK, PROMPT = 256, 512


def synthetic(arch: str, n_layer: int) -> ModelSpec:
    if arch == "mamba1":
        return ModelSpec(arch="mamba1", d_model=1024, n_layer=n_layer, vocab_size=4096, d_inner=2048, d_state=16,
                         d_conv=4, dt_rank=64)
    return ModelSpec(arch="mamba2", d_model=1024, n_layer=n_layer, vocab_size=4096, d_inner=2048, d_state=128,
                     d_conv=4, n_heads=32, head_dim=64, n_groups=1)


MODELS = {f"{arch}-L{n}": synthetic(arch, n) for arch in ("mamba1", "mamba2") for n in (2, 8)}


# ---------------------------------------------------------------------------------------------
# build (here)
# ---------------------------------------------------------------------------------------------
def build(out: Path, arch: str) -> None:
    from edgemamba.kernels.tvm_build import compile_tvm_library
    from edgemamba.runtimes.tvm import runtime_dir

    out.mkdir(parents=True, exist_ok=True)
    for name, spec in MODELS.items():
        compile_tvm_library(spec, out / f"{name}.em", "tvm-cuda", "fp16", force=True, arch=arch, batches=(1,))
        print(f"{name}: built", flush=True)
    (out / "runtime").mkdir(exist_ok=True)
    for lib in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy(runtime_dir() / lib, out / "runtime" / lib)


# ---------------------------------------------------------------------------------------------
# run (on the GPU machine)
# ---------------------------------------------------------------------------------------------
def _complete(src: Path, dest: Path, spec: ModelSpec) -> None:
    """The weightless library with seeded random weights packed beside it (as gpu_tvm.py weights)."""
    from gpu_tvm import random_weights

    from edgemamba.artifact import MANIFEST, sha256_file
    from edgemamba.runtimes.tvm import WEIGHTS, pack_weights, write_packed

    shutil.copytree(src, dest, dirs_exist_ok=True)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["tvm"]["params"] = write_packed(pack_weights(spec, random_weights(spec, 0), "fp16"), dest / WEIGHTS)
    manifest["files"][WEIGHTS] = {"sha256": sha256_file(dest / WEIGHTS), "bytes": (dest / WEIGHTS).stat().st_size}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _prefill(session, prompt, torch) -> dict:
    """Wall time of a prefill (median of 5, state reset before each) and its kernels' GPU time."""
    from torch.profiler import ProfilerActivity, profile

    walls = []
    for _ in range(6):
        session.reset()
        torch.cuda.synchronize()
        t = time.perf_counter()
        session.prefill(prompt)
        walls.append(time.perf_counter() - t)
    session.reset()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        session.prefill(prompt)
        torch.cuda.synchronize()
    kernels = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if us > 0:
            kernels[ev.key] = [us * 1e-6, ev.count]
    return {"wall_s": float(np.median(walls[1:])), "kernels": kernels}


# CUDA C of the same structure as tvm-cuda's prefill conv and scan (kernels/tvm_prefill.py): one thread per
# conv channel, or per (channel, lane) with NL lanes splitting d_state, walks the chunk token by token,
# loading each token's inputs from global memory; shapes are compile-time constants, as TVM specializes them.
CUDA_C = r"""
#define E {e}
#define N {n}
#define NL {lanes}
#define SPL (N / NL)
#define COLS {cols}
#define LO {lo}
#define CONV {conv}
#define R {r}
#define DBC {dbc}
#define H {heads}
#define P {head_dim}
#define HPG {heads_per_group}

__device__ __forceinline__ float softplus(float x) {{ return x > 20.0f ? x : log1pf(expf(fminf(x, 20.0f))); }}
__device__ __forceinline__ unsigned short to_half(float v) {{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}}

// causal conv (width 4) + silu over the chunk, in place on proj columns [LO, LO + CONV), state in place
extern "C" __global__ void __launch_bounds__(128) conv_chunk(const float* __restrict__ w, const float* __restrict__ b,
        float* __restrict__ state, float* __restrict__ proj, int t) {{
    int c = blockIdx.x * 128 + threadIdx.x;
    if (c >= CONV) return;
    float win[4];
    for (int j = 0; j < 3; ++j) win[j] = state[c * 3 + j];
    for (long long i = 0; i < t; ++i) {{
        win[3] = proj[i * COLS + LO + c];
        float v = w[c * 4] * win[0] + w[c * 4 + 1] * win[1] + w[c * 4 + 2] * win[2] + w[c * 4 + 3] * win[3] + b[c];
        proj[i * COLS + LO + c] = v / (1.0f + expf(-v));
        for (int j = 0; j < 3; ++j) win[j] = win[j + 1];
    }}
    for (int j = 0; j < 3; ++j) state[c * 3 + j] = win[j];
}}

// Mamba-1 selective scan: x and z from proj, dt (t, E) from dt_proj, B and C from x_proj's rows; y fp16
extern "C" __global__ void __launch_bounds__(128) scan1(const float* __restrict__ proj, const float* __restrict__ dbc,
        const float* __restrict__ dt, const float* __restrict__ dt_bias, const float* __restrict__ A,
        const float* __restrict__ D, float* __restrict__ state, unsigned short* __restrict__ y, int t) {{
    int th = blockIdx.x * 128 + threadIdx.x;
    int c = th / NL, lane = th % NL;
    float h[SPL], a[SPL];
#pragma unroll
    for (int j = 0; j < SPL; ++j) {{ h[j] = state[c * N + lane * SPL + j]; a[j] = A[c * N + lane * SPL + j]; }}
    for (long long i = 0; i < t; ++i) {{
        float delta = softplus(dt[i * E + c] + dt_bias[c]), acc = 0.0f;
#pragma unroll
        for (int j = 0; j < SPL; ++j)
            h[j] = expf(delta * a[j]) * h[j] + delta * proj[i * COLS + c] * dbc[i * DBC + R + lane * SPL + j];
#pragma unroll
        for (int j = 0; j < SPL; ++j) acc += h[j] * dbc[i * DBC + R + N + lane * SPL + j];
#pragma unroll
        for (int o = NL / 2; o > 0; o /= 2) acc += __shfl_down_sync(0xffffffffu, acc, o, NL);
        if (lane == 0) {{
            float z = proj[i * COLS + E + c];
            y[i * E + c] = to_half((acc + D[c] * proj[i * COLS + c]) * (z / (1.0f + expf(-z))));
        }}
    }}
#pragma unroll
    for (int j = 0; j < SPL; ++j) state[c * N + lane * SPL + j] = h[j];
}}

// Mamba-2 selective scan: x, B, C and dt from proj (z | xBC | dt), one A and dt per head; y float32
extern "C" __global__ void __launch_bounds__(128) scan2(const float* __restrict__ proj, const float* __restrict__ dt_bias,
        const float* __restrict__ A, const float* __restrict__ D, float* __restrict__ state, float* __restrict__ y,
        int t) {{
    int th = blockIdx.x * 128 + threadIdx.x;
    int c = th / NL, lane = th % NL, hd = c / P, g = hd / HPG;
    float h[SPL];
#pragma unroll
    for (int j = 0; j < SPL; ++j) h[j] = state[c * N + lane * SPL + j];
    for (long long i = 0; i < t; ++i) {{
        float delta = softplus(proj[i * COLS + E + CONV + hd] + dt_bias[hd]), acc = 0.0f;
#pragma unroll
        for (int j = 0; j < SPL; ++j)
            h[j] = expf(delta * A[hd]) * h[j] + delta * proj[i * COLS + E + c] * proj[i * COLS + 2 * E + g * N + lane * SPL + j];
#pragma unroll
        for (int j = 0; j < SPL; ++j) acc += h[j] * proj[i * COLS + 2 * E + (H / HPG) * N + g * N + lane * SPL + j];
#pragma unroll
        for (int o = NL / 2; o > 0; o /= 2) acc += __shfl_down_sync(0xffffffffu, acc, o, NL);
        if (lane == 0) y[i * E + c] = acc + D[hd] * proj[i * COLS + E + c];
    }}
#pragma unroll
    for (int j = 0; j < SPL; ++j) state[c * N + lane * SPL + j] = h[j];
}}
"""


def cuda_c_kernels(torch, shape: dict):
    """CUDA_C compiled with NVRTC (through torch) for `shape` (probe.sequential_shape), as
    probe.measure_sequential_kernels callables."""
    s = shape
    source = CUDA_C.format(e=s["e"], n=s["n"], lanes=s["lanes"], cols=s["cols"], lo=s["lo"], conv=s["conv"], r=s["r"],
                           dbc=s["r"] + 2 * s["n"], heads=s["heads"], head_dim=s["head_dim"],
                           heads_per_group=s["heads"] // s["groups"])
    conv_k = torch.cuda._compile_kernel(source, "conv_chunk")
    scan_k = torch.cuda._compile_kernel(source, "scan1" if s["arch"] == "mamba1" else "scan2")
    scan_names = (("proj", "dbc", "dt", "dt_bias", "A", "D", "ssm_state", "y") if s["arch"] == "mamba1"
                  else ("proj", "dt_bias", "A", "D", "ssm_state", "y"))
    block, conv_grid, scan_grid = (128, 1, 1), (-(-s["conv"] // 128), 1, 1), (s["e"] * s["lanes"] // 128, 1, 1)
    return (lambda b, t: conv_k(grid=conv_grid, block=block, args=[b["conv_w"], b["conv_b"], b["conv_state"],
                                                                     b["proj"], t]),
            lambda b, t: scan_k(grid=scan_grid, block=block, args=[*(b[k] for k in scan_names), t]))


def run(out: Path, profile_in: Path | None, write: Path | None, json_out: Path | None) -> None:
    os.environ.setdefault("EDGEMAMBA_TVM_RUNTIME", str(out / "runtime"))
    import torch

    from edgemamba.devices import probe
    from edgemamba.devices.predict import kloop_steps, workload
    from edgemamba.devices.profiles import TARGET_COSTS
    from edgemamba.session import Session

    tiles = TARGET_COSTS["tvm-cuda"].kloop_tiles
    rng = np.random.default_rng(0)
    res = {"models": {}, "sequential_ns": {}}
    for name, spec in MODELS.items():
        art = Path("/tmp/gpu_tvm_prefill") / f"{name}.em"
        _complete(out / f"{name}.em", art, spec)
        session = Session(art, verify=False, prefill_chunk=CHUNK)
        r = _prefill(session, rng.integers(0, spec.vocab_size, PROMPT), torch)
        ks, names = r["kernels"], probe.tvm_prefill_kernel_names(spec, "fp16")
        chunks = -(-PROMPT // CHUNK)
        r |= {"gpu_s": sum(v[0] for v in ks.values()),
              "launches": sum(v[1] for k, v in ks.items() if not k.startswith("Memcpy")),
              "products_s": sum(v[0] for k, v in ks.items() if k.startswith("matmul_")),
              "ksteps": chunks * kloop_steps(spec, tiles),
              "sequential_ns": 1e9 * sum(v[0] for k, v in ks.items() if k.startswith((names["conv"], names["scan"])))
              / (PROMPT * spec.n_layer)}
        assert r["launches"] == chunks * workload(spec, "tvm-cuda", "fp16").chunk_launches, (name, r["launches"])
        res["models"][name] = r
        print(f"{name}: prefill {r['wall_s'] * 1e3:.2f} ms, kernels {r['gpu_s'] * 1e3:.2f} ms GPU in {r['launches']}, "
              f"products {r['products_s'] * 1e6 / r['ksteps']:.3f} µs a K step, conv + scan "
              f"{r['sequential_ns']:.0f} ns a token and layer", flush=True)
        del session

    # the token-sequential kernels: TVM's alone (what the probe measures), and the CUDA C, same harness
    from edgemamba.artifact import load_artifact

    for arch in ("mamba1", "mamba2"):
        art = load_artifact(Path("/tmp/gpu_tvm_prefill") / f"{arch}-L2.em", verify=False)
        alone = probe.measure_scan_step(torch, art)
        shape = probe.sequential_shape(art.spec)
        cuda_c = probe.measure_sequential_kernels(torch, shape, cuda_c_kernels(torch, shape),
                                                  y_dtype=probe.tvm_prefill_kernel_names(art.spec, "fp16")["y"])
        in_prefill = res["models"][f"{arch}-L8"]["sequential_ns"]
        res["sequential_ns"][arch] = {"tvm_in_prefill": in_prefill, "tvm_alone": alone.value * 1e9,
                                      "tvm_alone_source": alone.source,
                                      "cuda_c": {k: v * 1e9 for k, v in cuda_c.items()}}
        print(f"{arch} conv + scan, ns a token: TVM in the prefill {in_prefill:.0f}; TVM alone {alone.value * 1e9:.0f} "
              f"({alone.source.rsplit(': ', 1)[-1]}); CUDA C {cuda_c['conv'] * 1e9:.0f} + {cuda_c['scan'] * 1e9:.0f}",
              flush=True)

    # the fits
    ms = res["models"]
    kstep = sum(m["products_s"] for m in ms.values()) / sum(m["ksteps"] for m in ms.values())
    extras = {}
    for arch in ("mamba1", "mamba2"):
        small, big = ms[f"{arch}-L2"], ms[f"{arch}-L8"]
        gap = [m["wall_s"] - m["gpu_s"] for m in (small, big)]
        per_kernel = (gap[1] - gap[0]) / (big["launches"] - small["launches"])
        per_chunk = (gap[0] - per_kernel * small["launches"]) / -(-PROMPT // CHUNK)
        extras[arch] = {"per_kernel_s": per_kernel, "per_chunk_s": per_chunk}
        print(f"{arch}: beyond the kernels' GPU time {per_kernel * 1e6:.1f} µs a kernel + "
              f"{per_chunk * 1e6:.0f} µs a chunk")
    extra = float(np.mean([x["per_kernel_s"] for x in extras.values()]))
    res["fit"] = {"kloop_step_s": kstep, "chunk_launch_extra_s": extra, "by_arch": extras}
    print(f"fit: kloop_step_s {kstep * 1e6:.3f} µs, chunk_launch_extra_s {extra * 1e6:.1f} µs", flush=True)
    if json_out:
        json_out.write_text(json.dumps(res, indent=1))
    if write:
        profile = json.loads(profile_in.read_text())
        how = ("measured: TVM's own prefill kernels on synthetic 2- and 8-layer models (d_inner 2048), "
               "benchmarks/gpu_tvm_prefill.py")
        alone = res["sequential_ns"]["mamba1"]
        profile.setdefault("measured_costs", {}).setdefault("tvm-cuda", {}).update({
            "scan_step_s": {"value": alone["tvm_alone"] * 1e-9, "source": alone["tvm_alone_source"]},
            "kloop_step_s": {"value": kstep, "source": f"{how}: matrix-product time over their K-tile steps"},
            "chunk_launch_extra_s": {"value": extra, "source": f"{how}: prefill time beyond the kernels' GPU time, "
                                                               "per kernel"}})
        write.write_text(json.dumps(profile, indent=2))


def _profile_prefill(be, prompt, torch) -> dict:
    """Kernels of one prefill call by name: [µs, launches], and the call's wall time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        be.prefill(prompt, 0)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if us > 0:
            kernels[ev.key] = [float(us), int(ev.count)]
    return {"profiled_wall_ms": wall * 1e3, "kernels": kernels}


def ab(outs: list[Path], models: list[str], n_prompt: int = 2048) -> None:
    """Prefill of several builds of gpu_tvm.py's models (see the module's docstring)."""
    os.environ.setdefault("EDGEMAMBA_TVM_RUNTIME", str(outs[0] / "runtime"))
    import torch
    from gpu_tvm import MODELS as GPU_MODELS
    from gpu_tvm import prefill_ms, random_weights

    from edgemamba.artifact import load_artifact
    from edgemamba.checkpoint import Checkpoint
    from edgemamba.reference import Reference
    from edgemamba.runtimes.tvm import TvmBackend, pack_weights

    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    rows = []
    for name in models:
        spec = GPU_MODELS[name]
        weights = random_weights(spec, seed=0)
        packed = pack_weights(spec, weights, "fp16")
        prompt = np.random.default_rng(2).integers(0, spec.vocab_size, n_prompt)
        ref_logits, _ = Reference(Checkpoint(spec, weights)).forward(prompt[None, :150])
        ref_last = ref_logits[0, -1]
        builds = []
        for out in outs:
            if not (out / f"{name}.em").exists():
                continue
            be = TvmBackend(load_artifact(out / f"{name}.em"), 1, weights=packed)
            row = {"model": name, "build": str(out), "wall_ms": []}
            be.reset(slice(0, 1))
            got = be.prefill(prompt[:150], 0)
            row["ref150_rel"] = float(np.abs(got - ref_last).max() / np.abs(ref_last).max())
            row["ref150_argmax"] = bool(got.argmax() == ref_last.argmax())
            be.reset(slice(0, 1))
            pre = be.prefill(prompt, 0)
            be.reset(slice(0, 1))
            for tkn in prompt:
                stepped = be.step(np.array([tkn]))[0]
            row["vs_steps_rel"] = float(np.abs(pre - stepped).max() / np.abs(stepped).max())
            builds.append((row, be))
        for order in (builds, builds[::-1]):
            for row, be in order:
                row["wall_ms"] += [prefill_ms(be, prompt, torch) for _ in range(6)]
                row["wall_ms"].pop(-6)  # each round's first: warm-up
        for row, be in builds:
            be.reset(slice(0, 1))
            row |= _profile_prefill(be, prompt, torch)
            ks = row["kernels"]
            busy = sum(v[0] for v in ks.values()) / 1e3
            row["median_ms"] = float(np.median(row["wall_ms"]))
            print(f"\n{name} {row['build']}: prefill {n_prompt} median {row['median_ms']:.2f} ms "
                  f"(rounds {np.median(row['wall_ms'][:5]):.2f}, {np.median(row['wall_ms'][5:]):.2f}); profiled call "
                  f"{row['profiled_wall_ms']:.2f} ms, kernels {busy:.2f} ms GPU in {sum(v[1] for v in ks.values())} launches; "
                  f"vs reference (150) {row['ref150_rel']:.2e} argmax {row['ref150_argmax']}; "
                  f"vs {n_prompt} steps {row['vs_steps_rel']:.2e}", flush=True)
            for k, (us, n) in sorted(ks.items(), key=lambda kv: -kv[1][0])[:14]:
                print(f"   {us / 1e3:8.3f} ms {n:5d}x  {us / n:8.1f} us  {k[:90]}")
            rows.append(row)
        del builds
        torch.cuda.empty_cache()
    print("\nPREFILL_AB " + json.dumps(rows))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["build", "run", "ab"])
    p.add_argument("out", type=Path, nargs="+")
    p.add_argument("--models", default="mamba-130m,mamba2-130m,mamba-1.4b", help="ab: gpu_tvm.py's models")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--profile", type=Path, help="run: a profile JSON (`edgemamba devices --probe --json`)")
    p.add_argument("--write", type=Path, help="run: the profile with the fitted tvm-cuda figures")
    p.add_argument("--json", type=Path, help="run: everything measured")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if a.mode == "ab":
        ab(a.out, a.models.split(","))
        return
    if len(a.out) != 1:
        p.error(f"{a.mode} takes one folder")
    a.out = a.out[0]
    if a.mode == "build":
        build(a.out, a.arch)
    else:
        if a.write and not a.profile:
            p.error("--write needs --profile")
        run(a.out, a.profile, a.write, a.json)


if __name__ == "__main__":
    main()
