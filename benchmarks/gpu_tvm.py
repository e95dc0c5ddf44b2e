"""tvm-cuda on a GPU, side by side with mamba_ssm (../shared/anchors/gpu_peers.py): fp16, random weights.

Two halves, because the GPU machine cannot take TVM's compiler:

  python benchmarks/gpu_tvm.py build OUT [--arch sm_90] [--pdl MODE]   # here: weightless tvm-cuda artifacts + runtime
  python3 benchmarks/gpu_tvm.py run OUT [--peers] [--logits DIR] [--decode-only]
                                                           # there: weights packed from a seed, checked, timed
  python3 benchmarks/gpu_tvm.py ab OUT1 OUT2 ...           # there: decode of several builds, same weights
  python3 benchmarks/gpu_tvm.py profile OUT1 ...           # there: µs per kernel of a step, batch 1 and 8
  python3 benchmarks/gpu_tvm.py timeline OUT1 ...          # there: batch-1 kernels' overlap under PDL
  python3 benchmarks/gpu_tvm.py weights OUT --dest DIR     # there: DIR/<model>.em, complete artifacts
                                                           # (the same seeded weights) for `edgemamba bench`

--peers runs OUT/gpu_peers.py (a copy of ../shared/anchors/gpu_peers.py, with mamba_ssm's source
unpacked beside it as its README says) for the same models in the same run.

`build` writes OUT/<model>.em (library + cubin, no weights; `compile_tvm_library`) and copies TVM's
runtime libraries to OUT/runtime. `run` needs only those, apache-tvm-ffi and NumPy; torch is used for
the greedy-decode loop's argmax and its CUDA graph, and for timing events.

--pdl MODE chooses how the step kernels use programmatic dependent launch (`off`, or a mode of
`edgemamba.kernels.tvm_common.PDL_MODES`; default: the library's default for the arch). `ab` takes
builds of the same models (e.g. one per mode, or of different kernel code), makes each model's
weights once, reports how far every build's 12 CUDA-graph steps are from plain launches' and from the
first build's (and 3 steps of 8 sequences from the first build's: kernels of other code sum in
another order), and times decode (batch 1 and 8) of each build in two rounds, the second in reverse
order. `profile` gives each kernel's µs per step (batch 1 and 8) of builds without PDL.

Per model, `run` reports:
  - logits of the fp16 library against the NumPy reference on the same fp16-rounded weights
    (prefill of 8 tokens, then 4 steps), max |Δ| / max |ref|
  - 12 steps through the backend's CUDA graphs against the same steps as plain kernel launches:
    the largest difference (0.0: identical). --logits DIR saves those logits as DIR/<model>.npy, or,
    where that file exists (from a run of another build of the same model), says whether they are
    identical to it; --decode-only runs only that and the decode timings
  - decode ms/token, batch 1: the step (TVM kernels) + argmax + feeding the token back, captured in
    one CUDA graph and replayed 256 times back to back (the same loop mamba_ssm's decode(cg=True) runs;
    the argmax is the library's greedy_{B} kernel, written straight into the next step's ids)
  - the same through Session-style calls (ids up, logits down, host argmax), per token, and through
    the backend's step_greedy (ids up, the library's pick, ids down: Session.generate's greedy path)
  - batch 8: one replay decodes 8 sequences; time relative to batch 1
  - prefill of 2,048 tokens in one call, against stepping through them (2,048 × the decode time)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgemamba.spec import ModelSpec  # noqa: E402

VOCAB = 50280
MODELS = {
    "mamba-130m": ModelSpec(arch="mamba1", d_model=768, n_layer=24, vocab_size=VOCAB, d_inner=1536, d_state=16,
                            d_conv=4, dt_rank=48),
    "mamba-1.4b": ModelSpec(arch="mamba1", d_model=2048, n_layer=48, vocab_size=VOCAB, d_inner=4096, d_state=16,
                            d_conv=4, dt_rank=128),
    "mamba2-130m": ModelSpec(arch="mamba2", d_model=768, n_layer=24, vocab_size=VOCAB, d_inner=1536, d_state=128,
                             d_conv=4, n_heads=24, head_dim=64, n_groups=1),
}
PEER_ARGS = {"mamba-130m": ("130m", "mamba1"), "mamba-1.4b": ("1.4b", "mamba1"), "mamba2-130m": ("130m", "mamba2")}
BATCHES = (1, 8)


def prefill_ms(be, prompt, torch) -> float:
    """Wall time of one prefill of sequence 0 from a reset state, in ms (GPU synchronized around it)."""
    be.reset(slice(0, 1))
    torch.cuda.synchronize()
    t = time.perf_counter()
    be.prefill(prompt, 0)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


# ---------------------------------------------------------------------------------------------
# build (here, with the TVM compiler)
# ---------------------------------------------------------------------------------------------
def build(out: Path, arch: str, models: list[str], pdl: str | None = None) -> None:
    from edgemamba.kernels.tvm_build import compile_tvm_library
    from edgemamba.runtimes.tvm import runtime_dir

    out.mkdir(parents=True, exist_ok=True)
    for name in models:
        t = time.perf_counter()
        compile_tvm_library(MODELS[name], out / f"{name}.em", "tvm-cuda", "fp16", force=True, arch=arch,
                            batches=BATCHES, pdl=pdl)
        print(f"{name}: built in {time.perf_counter() - t:.0f} s")
    (out / "runtime").mkdir(exist_ok=True)  # what the GPU machine needs of TVM: these two files
    for lib in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy(runtime_dir() / lib, out / "runtime" / lib)


# ---------------------------------------------------------------------------------------------
# run (on the GPU machine, runtime only)
# ---------------------------------------------------------------------------------------------
def random_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Canonical weights initialised as mamba_ssm does (scaled so activations stay O(1)), rounded
    to fp16 so that the reference sees exactly the values the library uses."""
    rng = np.random.default_rng(seed)
    n = spec.d_state
    w = {}
    for name, shape in spec.weight_shapes().items():
        leaf = name.split(".")[-1]
        if leaf in ("norm", "norm_f", "gate_norm"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "A_log":
            a = np.log(np.broadcast_to(np.arange(1, n + 1), shape) if spec.arch == "mamba1"
                       else rng.uniform(1, 16, shape))
        elif leaf == "D":
            a = np.ones(shape)
        elif leaf == "dt_bias":
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
            a = dt + np.log(-np.expm1(-dt))  # softplus⁻¹
        elif leaf == "conv_weight":
            a = rng.uniform(-0.5, 0.5, shape)
        elif leaf == "conv_bias":
            a = rng.uniform(-0.1, 0.1, shape)
        elif leaf == "dt_proj":
            a = rng.uniform(-1, 1, shape) * spec.dt_rank ** -0.5
        elif leaf == "out_proj":
            a = rng.standard_normal(shape, dtype=np.float32) * (0.02 / math.sqrt(spec.n_layer))
        else:  # embedding, in_proj, x_proj, lm_head
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        w[name] = np.asarray(a, np.float32)
    big = ("embedding", "lm_head", "in_proj", "x_proj", "out_proj")
    return {k: v.astype(np.float16).astype(np.float32) if k.split(".")[-1] in big else v for k, v in w.items()}


def run(out: Path, models: list[str], peers: bool, n_tokens: int, logits_dir: Path | None = None,
        decode_only: bool = False) -> None:
    os.environ.setdefault("EDGEMAMBA_TVM_RUNTIME", str(out / "runtime"))
    import torch
    import tvm_ffi

    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; tvm_ffi {tvm_ffi.__version__}")
    results = []
    for name in models:
        try:
            results.append(_run_model(name, art_dir=out, n_tokens=n_tokens, logits_dir=logits_dir,
                                      decode_only=decode_only))
        except Exception:  # report and go on to the next model: device time is scarce
            import traceback

            traceback.print_exc()
        torch.cuda.empty_cache()
    if decode_only:
        print("\nRESULTS " + json.dumps(results))
        return
    _peers_and_table(out, models, results, peers, n_tokens)


def _run_model(name: str, art_dir: Path, n_tokens: int, logits_dir: Path | None = None,
               decode_only: bool = False) -> dict:
    import torch
    import tvm_ffi

    from edgemamba.artifact import load_artifact
    from edgemamba.checkpoint import Checkpoint
    from edgemamba.reference import Reference
    from edgemamba.runtimes.tvm import TvmBackend, pack_weights

    out = art_dir
    spec = MODELS[name]
    art = load_artifact(out / f"{name}.em")
    t = time.perf_counter()
    weights = random_weights(spec, seed=0)
    packed = pack_weights(spec, weights, "fp16")
    print(f"\n{name}: {spec.n_params / 1e6:.0f} M parameters, weights made in {time.perf_counter() - t:.1f} s")
    res = {"model": name, "params_M": spec.n_params / 1e6,
           "weight_bytes": sum(a.nbytes for a in packed.values()), "pdl": bool(art.manifest["tvm"].get("pdl"))}
    be = TvmBackend(art, 1, weights=packed)
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, 12)

    # -- the step in CUDA-graph replay against plain launches (and against another build) -------
    plain = TvmBackend(art, 1, weights=packed, cuda_graph=False)
    stepped = {}
    for kind, backend in (("graph", be), ("plain", plain)):
        backend.reset(slice(0, 1))
        stepped[kind] = np.stack([backend.step(ids[t : t + 1])[0].copy() for t in range(len(ids))])
    del plain
    res["graph_vs_plain_max_abs"] = float(np.abs(stepped["graph"] - stepped["plain"]).max())
    print(f"  12 steps, CUDA graphs vs plain launches: max |Δ| = {res['graph_vs_plain_max_abs']:.3g}")
    if logits_dir is not None:
        saved = logits_dir / f"{name}.npy"
        if saved.exists():
            other = np.load(saved)
            res["vs_saved_logits_max_abs"] = float(np.abs(stepped["graph"] - other).max())
            print(f"  vs {saved} (another build): max |Δ| = {res['vs_saved_logits_max_abs']:.3g}")
        else:
            logits_dir.mkdir(parents=True, exist_ok=True)
            np.save(saved, stepped["graph"])
    be.reset(slice(0, 1))
    if decode_only:
        b8 = TvmBackend(art, 8, weights=packed)
        for batch in BATCHES:
            res[f"decode_ms_b{batch}"] = _graph_decode_ms(be if batch == 1 else b8, n_tokens, torch, tvm_ffi)
            print(f"  decode batch {batch}: {res[f'decode_ms_b{batch}']:.4f} ms per step (CUDA graph replay)")
        res["batch8_over_batch1"] = res["decode_ms_b8"] / res["decode_ms_b1"]
        return res

    # -- correctness: prefill 8 tokens, then 4 steps, against the NumPy reference --------------
    ref_logits, _ = Reference(Checkpoint(spec, weights)).forward(ids[None])
    got = [be.prefill(ids[:8], 0)] + [be.step(ids[t : t + 1])[0].copy() for t in range(8, 12)]
    err = np.abs(np.stack(got) - ref_logits[0, 7:]).max() / np.abs(ref_logits[0, 7:]).max()
    agree = int((np.stack(got).argmax(-1) == ref_logits[0, 7:].argmax(-1)).sum())
    res["logits_rel_err"], res["argmax_agree"] = float(err), f"{agree}/5"
    print(f"  logits vs reference: max|Δ|/max|ref| = {err:.2e}, argmax agrees {agree}/5")

    # -- batch 8: each row decodes as it would alone ------------------------------------------------
    b8 = TvmBackend(art, 8, weights=packed)
    rows = np.random.default_rng(3).integers(0, spec.vocab_size, (8, 3))
    for t in range(3):
        both = b8.step(rows[:, t]).copy()
    alone = []
    for r in range(8):
        be.reset(slice(0, 1))
        for t in range(3):
            last = be.step(rows[r, t : t + 1])[0].copy()
        alone.append(last)
    res["batch8_rel_err"] = float(np.abs(both - np.stack(alone)).max() / np.abs(np.stack(alone)).max())
    print(f"  batch 8 vs 8 x batch 1: {res['batch8_rel_err']:.2e}")

    # -- decode: step + greedy pick + feedback in one CUDA graph ---------------------------------
    for batch in BATCHES:
        bb = be if batch == 1 else b8
        res[f"decode_ms_b{batch}"] = _graph_decode_ms(bb, n_tokens, torch, tvm_ffi)
        print(f"  decode batch {batch}: {res[f'decode_ms_b{batch}']:.4f} ms per step (CUDA graph replay)")
    res["batch8_over_batch1"] = res["decode_ms_b8"] / res["decode_ms_b1"]
    res["kernels_b1"] = _kernel_profile(be, torch)

    # -- Session-style step: ids up, logits down, host argmax -----------------------------------
    tok = np.array([1])
    be.step(tok)
    t = time.perf_counter()
    for _ in range(n_tokens):
        tok = np.array([int(be.step(tok)[0].argmax())])
    res["session_step_ms"] = (time.perf_counter() - t) / n_tokens * 1e3
    print(f"  Session-style step (host logits): {res['session_step_ms']:.3f} ms/token")
    # -- Session greedy step: ids up, the library's greedy pick, ids down (Session.generate's path) -
    if be.can_step_greedy:
        agree = total = 0
        for b in (be, b8):  # the library's pick against the host's argmax of the same logits
            for t in range(4):
                pick = b.step_greedy(rows[: b.batch, t % 3])
                agree, total = agree + int(np.array_equal(pick, b.logits().argmax(-1))), total + 1
        res["greedy_agrees"] = f"{agree}/{total}"
        print(f"  greedy pick = host argmax of the same logits (batch 1 and 8): {agree}/{total}")
        res["greedy_contract"] = _greedy_contract(b8)
        print(f"  greedy kernels on crafted logits = greedy_pick (ties across chunks, NaN, ±inf): "
              f"{res['greedy_contract']}")
        tok = be.step_greedy(np.array([1]))
        t = time.perf_counter()
        for _ in range(n_tokens):
            tok = be.step_greedy(tok)
        res["session_greedy_step_ms"] = (time.perf_counter() - t) / n_tokens * 1e3
        print(f"  Session greedy step (ids only): {res['session_greedy_step_ms']:.3f} ms/token")

    # -- prefill 2048 vs stepping ------------------------------------------------------------------
    prompt = np.random.default_rng(2).integers(0, spec.vocab_size, 2048)
    be.reset(slice(0, 1))
    be.prefill(prompt[:64], 0)  # warm-up (allocations, module load)
    res["prefill_2048_ms"] = float(np.median([prefill_ms(be, prompt, torch) for _ in range(3)]))
    res["stepping_2048_ms"] = res["decode_ms_b1"] * 2048
    res["prefill_speedup"] = res["stepping_2048_ms"] / res["prefill_2048_ms"]
    print(f"  prefill 2048: {res['prefill_2048_ms']:.1f} ms; stepping: {res['stepping_2048_ms']:.1f} ms "
          f"-> {res['prefill_speedup']:.1f}x")
    # the state after prefill matches the state after stepping the same tokens
    be.reset(slice(0, 1))
    lp = be.prefill(prompt[:300], 0)
    be.reset(slice(0, 1))
    for tkn in prompt[:300]:
        ls = be.step(np.array([tkn]))[0]
    res["prefill_vs_step_rel"] = float(np.abs(lp - ls).max() / np.abs(ls).max())
    print(f"  prefill(300) vs 300 steps: last logits differ by {res['prefill_vs_step_rel']:.2e} (relative)")
    return res


def _peers_and_table(out: Path, models: list[str], results: list[dict], peers: bool, n_tokens: int) -> None:
    if peers:
        for name in models:
            size, arch = PEER_ARGS[name]
            cmd = [sys.executable, str(out / "gpu_peers.py"), "--which", "mamba_ssm",
                   "--size", size, "--arch", arch, "--n", str(n_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
            peer = json.loads(line[0][7:]) if line else {"error": proc.stderr.strip()[-300:]}
            for r in results:
                if r["model"] == name:
                    r["mamba_ssm"] = peer
            print(f"mamba_ssm {name}: {peer}")

    print("\nRESULTS " + json.dumps(results))
    print(f"\n{'model':<13}{'TVM ms/tok':>11}{'b8/b1':>7}{'prefill x':>10}{'err':>10}{'mamba_ssm cg':>14}")
    for r in results:
        peer = r.get("mamba_ssm", {}).get("ms_per_token_cg1", float("nan"))
        print(f"{r['model']:<13}{r['decode_ms_b1']:>11.4f}{r['batch8_over_batch1']:>7.2f}"
              f"{r['prefill_speedup']:>10.1f}{r['logits_rel_err']:>10.1e}{peer:>14.3f}")


def _greedy_contract(b8) -> bool:
    """The library's greedy_{8} on logits made to catch the GPU kernels' chunking: a tie of the
    largest value in two chunks (the first index wins), all equal, a NaN, ±inf, and the largest at
    each end of the row; True where the ids equal `kernels.reference.greedy_pick`."""
    from edgemamba.kernels.reference import greedy_pick

    rng = np.random.default_rng(5)
    logits = rng.standard_normal((8, b8.spec.vocab_size)).astype(np.float32)
    logits[1, [3000, 1030, 50000]] = 9.0  # first index 1030, in the second chunk
    logits[2] = -2.5
    logits[3, 40000] = np.nan
    logits[4, 7] = np.inf
    logits[5, -1] = -np.inf
    logits[6, -1] = 50.0
    logits[7, 0] = 50.0
    staged = np.zeros(b8._logits.shape, np.float32)
    staged[:8] = logits
    b8.dev.write(b8._logits.tensor, staged)
    b8._greedy[0]()
    got = np.array(b8.dev.read(b8._ids)[:8])
    return bool(np.array_equal(got, greedy_pick(logits)))


def _kernel_profile(be, torch, steps: int = 20) -> list:
    """Kernel launches of one batch-1 step (uncaptured), by kernel: (name, µs per step, launches)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            be._steps[0]()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if us > 0:
            rows.append((ev.key[:60], us / steps, ev.count / steps))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"  kernels per step: {sum(r[2] for r in rows):.0f}, busy {total:.1f} µs; largest:")
    for name, us, n in rows[:6]:
        print(f"    {us:8.1f} µs  {n:4.0f}×  {name}")
    return [list(r) for r in rows]


def _decode_graph(be, torch, tvm_ffi):
    """One CUDA graph on torch's stream: the TVM step, then the greedy pick written into the ids the
    next replay reads: the library's own `greedy_{B}` kernel (libraries before it: torch's argmax and
    a copy)."""
    ids = torch.from_dlpack(be._ids.tensor)  # the backend's buffers, seen by torch (no copy)
    logits = torch.from_dlpack(be._logits.tensor)

    def token():
        for i, fn in enumerate(be._steps):
            fn()
            if be.can_step_greedy:
                be._greedy[i]()
        if not be.can_step_greedy:
            ids.copy_(logits.argmax(-1).to(torch.int32))

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
        for _ in range(2):  # warm-up: the VM's memory pool fills outside the capture
            token()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream), tvm_ffi.use_torch_stream():
        token()
    return graph


def _graph_decode_ms(be, n_tokens: int, torch, tvm_ffi) -> float:
    """`_decode_graph` replayed n_tokens times; device time per replay from CUDA events (median of 3 runs)."""
    graph = _decode_graph(be, torch, tvm_ffi)
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n_tokens):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n_tokens)
    return float(np.median(times))


def ab(outs: list[Path], models: list[str], n_tokens: int) -> None:
    """Decode of several builds of the same models (see the module's docstring)."""
    os.environ.setdefault("EDGEMAMBA_TVM_RUNTIME", str(outs[0] / "runtime"))
    import torch
    import tvm_ffi

    from edgemamba.artifact import load_artifact
    from edgemamba.runtimes.tvm import TvmBackend, pack_weights

    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; tvm_ffi {tvm_ffi.__version__}")
    rows = []
    for name in models:
        spec = MODELS[name]
        packed = pack_weights(spec, random_weights(spec, seed=0), "fp16")
        ids = np.random.default_rng(1).integers(0, spec.vocab_size, 12)
        rows8 = np.random.default_rng(3).integers(0, spec.vocab_size, (8, 3))
        builds, first, first8 = [], None, None
        for out in outs:
            art = load_artifact(out / f"{name}.em")
            be, plain = TvmBackend(art, 1, weights=packed), TvmBackend(art, 1, weights=packed, cuda_graph=False)
            got = {k: np.stack([b.step(ids[t : t + 1])[0].copy() for t in range(len(ids))])
                   for k, b in (("graph", be), ("plain", plain))}
            del plain
            first = got["graph"] if first is None else first
            be.reset(slice(0, 1))
            b8 = TvmBackend(art, 8, weights=packed)
            for t in range(rows8.shape[1]):  # batch 8: 3 steps of 8 different sequences
                got8 = b8.step(rows8[:, t]).copy()
            b8.reset(slice(0, 8))
            first8 = got8 if first8 is None else first8
            row = {"model": name, "build": str(out), "pdl": art.manifest["tvm"].get("pdl"),
                   "graph_vs_plain": float(np.abs(got["graph"] - got["plain"]).max()),
                   "vs_first_build": float(np.abs(got["graph"] - first).max()),
                   "vs_first_rel": float(np.abs(got["graph"] - first).max() / np.abs(first).max()),
                   "b8_vs_first_rel": float(np.abs(got8 - first8).max() / np.abs(first8).max()), "b1": [], "b8": []}
            builds.append((row, be, b8))
        for order in (builds, builds[::-1]):
            for row, b1, b8 in order:
                row["b1"].append(_graph_decode_ms(b1, n_tokens, torch, tvm_ffi))
                row["b8"].append(_graph_decode_ms(b8, n_tokens, torch, tvm_ffi))
        for row, _, _ in builds:
            print(f"{name:<12} {row['pdl']!s:<17} b1 {' '.join(f'{v:.4f}' for v in row['b1'])} ms  "
                  f"b8 {' '.join(f'{v:.4f}' for v in row['b8'])} ms  graph-vs-plain {row['graph_vs_plain']:.3g}  "
                  f"vs-first {row['vs_first_build']:.3g} ({row['vs_first_rel']:.2g} of max; b8 {row['b8_vs_first_rel']:.2g})")
            rows.append(row)
        del builds
        torch.cuda.empty_cache()
    print("\nAB " + json.dumps(rows))


def profile(outs: list[Path], models: list[str], steps: int = 50) -> None:
    """Per-kernel device time of one decode step (torch profiler over `steps` uncaptured steps), batch
    1 and 8, for each build. Use builds without PDL (`--pdl off`): under PDL a kernel's time includes
    its wait for the previous one."""
    os.environ.setdefault("EDGEMAMBA_TVM_RUNTIME", str(outs[0] / "runtime"))
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from edgemamba.artifact import load_artifact
    from edgemamba.runtimes.tvm import TvmBackend, pack_weights

    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    rows = []
    for name in models:
        spec = MODELS[name]
        packed = pack_weights(spec, random_weights(spec, seed=0), "fp16")
        for out in outs:
            art = load_artifact(out / f"{name}.em")
            for batch in BATCHES:
                be = TvmBackend(art, batch, weights=packed, cuda_graph=False)
                for _ in range(3):
                    be._steps[0]()
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(steps):
                        be._steps[0]()
                    torch.cuda.synchronize()
                kernels = []
                for ev in prof.key_averages():
                    us = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
                    if us > 0:
                        kernels.append((ev.key, us / steps, ev.count / steps))
                kernels.sort(key=lambda r: -r[1])
                busy = sum(r[1] for r in kernels)
                print(f"\n{name} b{batch} {out}: {sum(r[2] for r in kernels):.0f} kernels, busy {busy:.1f} µs/step")
                for key, us, n in kernels:
                    print(f"  {us:8.1f} µs {n:4.0f}x {us / n:7.2f} µs each  {key[:90]}")
                rows.append({"model": name, "build": str(out), "batch": batch, "busy_us": busy,
                             "kernels": [list(r) for r in kernels]})
                del be
        torch.cuda.empty_cache()
    print("\nPROFILE " + json.dumps(rows))


def _layer_kind(kernel: str) -> str:
    """The part of a layer (or of the step) a kernel of the decode step is, from its name."""
    if "gemv" in kernel:
        if "_conv" in kernel:
            return "in_proj"
        if "residual" in kernel:
            return "out_proj"
        return "lm_head" if "rms" in kernel else "x_proj"
    return "ssm" if "ssm" in kernel else kernel.split("(")[0][:40]


def timeline(outs: list[Path], models: list[str]) -> None:
    """Where a batch-1 step's time goes under PDL: CUPTI's start and end of every kernel (torch
    profiler) over 5 replays of the step's CUDA graph (`_decode_graph`, as timed). Per kind of
    kernel: its duration (from its launch, so under PDL its wait too), its start less the previous
    kernel's end (negative: launched before that one ended), and its end less its layer's in_proj end
    (what the chain after in_proj costs)."""
    os.environ.setdefault("EDGEMAMBA_TVM_RUNTIME", str(outs[0] / "runtime"))
    import tempfile

    import torch
    import tvm_ffi
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from edgemamba.artifact import load_artifact
    from edgemamba.runtimes.tvm import TvmBackend, pack_weights

    for name in models:
        spec = MODELS[name]
        packed = pack_weights(spec, random_weights(spec, seed=0), "fp16")
        for out in outs:
            be = TvmBackend(load_artifact(out / f"{name}.em"), 1, weights=packed)
            graph = _decode_graph(be, torch, tvm_ffi)
            for _ in range(10):
                graph.replay()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    graph.replay()
                torch.cuda.synchronize()
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                prof.export_chrome_trace(f.name)
                events = [e for e in json.load(open(f.name))["traceEvents"] if e.get("cat") == "kernel"]
            events.sort(key=lambda e: e["ts"])
            firsts = [i for i, e in enumerate(events) if e["name"].startswith("embed")]
            spans = [events[j]["ts"] - events[i]["ts"] for i, j in zip(firsts, firsts[1:])]
            step = events[firsts[-2]:firsts[-1]]
            rows, prev_end, in_end = {}, events[firsts[-2] - 1]["ts"] + events[firsts[-2] - 1]["dur"], None
            for e in step:
                kind, end = _layer_kind(e["name"]), e["ts"] + e["dur"]
                gap = e["ts"] - prev_end
                in_end = end if kind == "in_proj" else in_end
                after = end - in_end if in_end is not None else 0.0
                rows.setdefault(kind, []).append((e["dur"], gap, after, end - max(prev_end, e["ts"]) + max(gap, 0.0)))
                prev_end = end
            print(f"\n{name} {out}: step {np.median(spans):.1f} µs between replays' first kernels")
            print(f"  {'kernel':<40} {'n':>3} {'µs':>7} {'start-prev end':>15} {'end-in_proj end':>16} {'step µs':>8}")
            for kind, v in rows.items():  # step µs: the step's time from the previous kernel's end to this one's, summed
                med = np.median(np.array(v), axis=0)
                print(f"  {kind:<40} {len(v):3d} {med[0]:7.2f} {med[1]:15.2f} {med[2]:16.2f} "
                      f"{np.sum(np.array(v)[:, 3]):8.1f}")
            del be
        torch.cuda.empty_cache()


def with_weights(out: Path, dest: Path, models: list[str], seed: int = 0) -> None:
    """Complete artifacts: each weightless library of OUT copied to DEST with weights.bin packed from
    the seeded random weights `run` uses, and the manifest's weight index and checksum."""
    from edgemamba.artifact import MANIFEST, sha256_file
    from edgemamba.runtimes.tvm import WEIGHTS, pack_weights, write_packed

    for name in models:
        t = time.perf_counter()
        art = dest / f"{name}.em"
        shutil.copytree(out / f"{name}.em", art, dirs_exist_ok=True)
        manifest = json.loads((art / MANIFEST).read_text())
        packed = pack_weights(MODELS[name], random_weights(MODELS[name], seed), manifest["precision"])
        manifest["tvm"]["params"] = write_packed(packed, art / WEIGHTS)
        manifest["files"][WEIGHTS] = {"sha256": sha256_file(art / WEIGHTS), "bytes": (art / WEIGHTS).stat().st_size}
        (art / MANIFEST).write_text(json.dumps(manifest, indent=2))
        print(f"{art}: weights written in {time.perf_counter() - t:.0f} s")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["build", "run", "weights", "ab", "profile", "timeline"])
    p.add_argument("out", type=Path, nargs="+", help="one build folder (ab: several)")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--peers", action="store_true", help="also run mamba_ssm's decoder (needs MAMBA_SSM_SRC)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--dest", type=Path, help="weights: where the complete artifacts go")
    p.add_argument("--pdl", help="build: programmatic dependent launch mode (off, late, early, ...)")
    p.add_argument("--logits", type=Path, help="run: save the 12-step logits here, or compare with those saved")
    p.add_argument("--decode-only", action="store_true", help="run: graph-vs-plain check and decode timings only")
    a = p.parse_args()
    models = a.models.split(",")
    if a.mode not in ("ab", "profile", "timeline") and len(a.out) != 1:
        p.error(f"{a.mode} takes one folder")
    if a.mode == "ab":
        ab(a.out, models, a.tokens)
        return
    if a.mode == "profile":
        profile(a.out, models)
        return
    if a.mode == "timeline":
        timeline(a.out, models)
        return
    a.out = a.out[0]
    if a.mode == "build":
        build(a.out, a.arch, models, pdl=a.pdl)
    elif a.mode == "weights":
        if a.dest is None:
            p.error("weights needs --dest DIR")
        with_weights(a.out, a.dest, models)
    else:
        run(a.out, models, a.peers, a.tokens, a.logits, a.decode_only)


if __name__ == "__main__":
    main()
