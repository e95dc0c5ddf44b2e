"""Soak: stream a million tokens through the ort-cpu step and check that nothing drifts.

    python benchmarks/soak.py --tokens 1000000 --every 10000 --threads 1 --json soak.json

For each model (a random 2-layer d_model 64 Mamba-1, and the trained demo model in
edgemamba/data/demo-mamba/ when present), one Session generates `--tokens` tokens from a short
prompt with temperature sampling (so the state keeps moving; no stop token), through the public
`Session.generate` path. Every `--every` tokens it records the process RSS and the state's norms.
It checks, and prints PASS/FAIL for:
- memory: RSS after warm-up stays within 2% (max vs min of the samples after the first 5%);
- numerics: no NaN/inf in logits (the sampler refuses them, which would stop the run) or state;
- bounded state: the largest |state| seen in the last 10% is within 2x of that seen between warm-up
  and 50%, and finite (a slow blow-up would show as growth);
- latency: per-token time does not drift: measured against a peer. The CPU here is shared with
  other work whose load moves both wall and CPU time by tens of percent over minutes, more than
  any drift we look for. So a second Session on the same artifact (the peer, which streams only
  20 tokens every `--every`/10 tokens and so stays young) is timed beside the soak in the same
  thread; per window, the soak's median per-token CPU time over the peer's. The check: that ratio
  in the last 10% within 10% of the first 10% (after warm-up). Raw wall and CPU medians of the
  first and last 10% are reported too.
Per-token time is measured between two yielded tokens (sampling + step), as wall time and as this
thread's CPU time (with --threads 1 ONNX Runtime runs in the calling thread).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgemamba import load_checkpoint  # noqa: E402
from edgemamba.artifact import compile_artifact  # noqa: E402
from edgemamba.checkpoint import Checkpoint  # noqa: E402
from edgemamba.sampling import SamplingParams  # noqa: E402
from edgemamba.session import Session  # noqa: E402
from edgemamba.spec import ModelSpec  # noqa: E402

DEMO = ROOT / "edgemamba" / "data" / "demo-mamba"


def random_mamba1(seed: int = 0) -> Checkpoint:
    """A 2-layer d_model 64 Mamba-1 with the usual initialisation (S4D-real A, Δ in [1e-3, 0.1])."""
    spec = ModelSpec(arch="mamba1", d_model=64, n_layer=2, vocab_size=512, d_inner=128, d_state=16, d_conv=4,
                     dt_rank=4, source="random")
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in spec.weight_shapes().items():
        kind = name.rsplit(".", 1)[-1]
        if kind in ("norm", "norm_f"):
            w = np.ones(shape)
        elif kind == "A_log":
            w = np.log(np.broadcast_to(np.arange(1, spec.d_state + 1), shape))
        elif kind == "D":
            w = np.ones(shape)
        elif kind == "dt_bias":
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), shape))
            w = dt + np.log(-np.expm1(-dt))  # inverse softplus
        elif kind == "conv_bias":
            w = np.zeros(shape)
        else:  # projections, conv and embedding: fan-in scaled
            w = rng.normal(0, 1 / math.sqrt(shape[-1]), shape)
        weights[name] = np.asarray(w, np.float32)
    return Checkpoint(spec, weights)


def soak(artifact, tokens: int, every: int, threads: int, temperature: float, seed: int) -> dict:
    proc = psutil.Process()
    session = Session(artifact, threads=threads)
    n_samples = tokens // every
    # Everything the loop writes is allocated before it starts, so RSS reflects the runtime only.
    latency = np.full(tokens, np.nan)  # wall seconds per token (full, not empty: pages touched now)
    cpu = np.full(tokens, np.nan)  # this thread's CPU seconds per token
    rss = np.zeros(n_samples, np.int64)
    state_max = np.full(n_samples, np.nan)  # max |x| over every state tensor
    state_l2 = np.full(n_samples, np.nan)  # L2 norm of all state tensors together
    params = SamplingParams(temperature=temperature, seed=seed)
    prompt = [1, 2, 3, 4]
    gen = session.generate(prompt, tokens, sampling=params, stop=[])
    peer = Session(artifact, threads=threads)
    peer_gen = peer.generate(prompt, 1 << 40, sampling=SamplingParams(temperature=temperature, seed=seed + 1), stop=[])
    probe_every, probe_len = max(1, every // 10), 20
    peer_cpu = np.full((n_samples, (every // probe_every) * probe_len), np.nan)  # per window
    start = time.perf_counter()
    last, last_cpu = start, time.thread_time()
    for i, _token in enumerate(gen):
        now, now_cpu = time.perf_counter(), time.thread_time()
        latency[i], cpu[i] = now - last, now_cpu - last_cpu
        if (i + 1) % probe_every == 0:
            k, j = i // every, (i % every) // probe_every
            for p in range(probe_len):
                c0 = time.thread_time()
                next(peer_gen)
                peer_cpu[k, j * probe_len + p] = time.thread_time() - c0
        if (i + 1) % every == 0:
            k = (i + 1) // every - 1
            state = session.get_state()
            flat = np.concatenate([v.ravel() for v in state.values()])
            if not np.all(np.isfinite(flat)):
                raise SystemExit(f"non-finite state after {i + 1} tokens")
            rss[k], state_max[k], state_l2[k] = proc.memory_info().rss, np.abs(flat).max(), np.linalg.norm(flat)
            if (k + 1) % max(1, n_samples // 20) == 0:
                recent = slice(max(0, i + 1 - every), i + 1)
                print(f"  {i + 1:>9,} tokens  rss {rss[k] / 2**20:7.1f} MiB  |state|max {state_max[k]:8.3f}  "
                      f"median {np.median(latency[recent]) * 1e6:6.1f} us/token wall, "
                      f"{np.median(cpu[recent]) * 1e6:6.1f} CPU, peer {np.median(peer_cpu[k]) * 1e6:6.1f} CPU",
                      flush=True)
        last, last_cpu = time.perf_counter(), time.thread_time()  # probes and samples are not token time
    elapsed = time.perf_counter() - start
    assert session.positions[0] == len(prompt) + tokens

    warm = max(1, n_samples // 20)  # the first 5% of samples are warm-up
    rss_after = rss[warm:]
    tenth = tokens // 10
    warm_tokens = warm * every
    def first_last(x):  # medians of the first 10% after warm-up and of the last 10%
        return float(np.median(x[warm_tokens : warm_tokens + tenth]) * 1e6), float(np.median(x[-tenth:]) * 1e6)

    wall_first, wall_last = first_last(latency)
    cpu_first, cpu_last = first_last(cpu)
    # per window: the soak's median per-token CPU time over the peer's, measured in the same window
    ratio = np.median(cpu.reshape(n_samples, every), axis=1) / np.median(peer_cpu, axis=1)
    ratio_first = float(np.median(ratio[warm : warm + max(1, n_samples // 10)]))
    ratio_last = float(np.median(ratio[-max(1, n_samples // 10):]))
    mid = state_max[warm : n_samples // 2]
    tail = state_max[-max(1, n_samples // 10):]
    result = {
        "artifact": str(session.artifact.path),
        "model": session.spec.source or "random",
        "n_params": session.spec.n_params,
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "rss_mib": {"first_sample": rss[0] / 2**20, "after_warmup_min": rss_after.min() / 2**20,
                    "after_warmup_max": rss_after.max() / 2**20, "last": rss[-1] / 2**20},
        "rss_spread_after_warmup": float((rss_after.max() - rss_after.min()) / rss_after.min()),
        "wall_us": {"first10_median": wall_first, "last10_median": wall_last,
                    "p99": float(np.percentile(latency[warm_tokens:], 99) * 1e6)},
        "cpu_us": {"first10_median": cpu_first, "last10_median": cpu_last,
                   "p99": float(np.percentile(cpu[warm_tokens:], 99) * 1e6)},
        "cpu_last_over_first": cpu_last / cpu_first,
        "wall_last_over_first": wall_last / wall_first,
        "soak_over_peer": {"first10": ratio_first, "last10": ratio_last},
        "drift_vs_peer": ratio_last / ratio_first,
        "peer_tokens": int(peer.positions[0] - len(prompt)),
        "state_max_abs": {"warmup_to_half": float(mid.max()), "last10": float(tail.max()), "overall": float(state_max.max())},
        "state_l2": {"median": float(np.median(state_l2)), "max": float(state_l2.max())},
        "state_bytes": session.spec.state_bytes(1),
    }
    result["checks"] = {
        "rss_flat_2pct": result["rss_spread_after_warmup"] <= 0.02,
        "finite": True,  # reaching here: the sampler saw finite logits, every state sample was finite
        "state_bounded": bool(np.isfinite(tail).all() and tail.max() <= 2 * mid.max()),
        "latency_flat_vs_peer_10pct": abs(result["drift_vs_peer"] - 1) <= 0.10,
    }
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=10_000, help="Sample RSS and state norms every N tokens.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="random,demo", help="random, demo (if present), or both.")
    ap.add_argument("--json", type=Path, help="Write the results here.")
    args = ap.parse_args(argv)
    if args.tokens < 20 * args.every or args.tokens % args.every or args.every % 10:
        ap.error("--tokens must be a multiple of --every, at least 20 x (warm-up is the first 5% of samples), "
                 "and --every a multiple of 10 (the peer is probed every --every/10 tokens)")

    results = []
    with tempfile.TemporaryDirectory(prefix="edgemamba-soak-") as tmp:
        for name in args.models.split(","):
            if name == "demo" and not (DEMO / "config.json").exists():
                print(f"demo model not found at {DEMO}: skipped")
                continue
            ckpt = random_mamba1(args.seed) if name == "random" else load_checkpoint(DEMO)
            art = compile_artifact(ckpt, Path(tmp) / f"{name}.em")
            print(f"{name}: {ckpt.spec.n_params:,} parameters, {args.tokens:,} tokens, "
                  f"temperature {args.temperature}, {args.threads} thread(s)", flush=True)
            r = soak(art, args.tokens, args.every, args.threads, args.temperature, args.seed)
            r["name"] = name
            results.append(r)
            verdict = ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in r["checks"].items())
            print(f"{name}: {r['tokens_per_s']:.0f} tokens/s; RSS spread {r['rss_spread_after_warmup'] * 100:.2f}% "
                  f"({r['rss_mib']['after_warmup_min']:.1f}-{r['rss_mib']['after_warmup_max']:.1f} MiB); "
                  f"per-token CPU last/first 10% {r['cpu_last_over_first']:.3f} "
                  f"({r['cpu_us']['first10_median']:.1f} -> {r['cpu_us']['last10_median']:.1f} us), "
                  f"wall {r['wall_last_over_first']:.3f} "
                  f"({r['wall_us']['first10_median']:.1f} -> {r['wall_us']['last10_median']:.1f} us), "
                  f"vs peer {r['drift_vs_peer']:.3f} ({r['soak_over_peer']['first10']:.3f} -> "
                  f"{r['soak_over_peer']['last10']:.3f}); "
                  f"|state| max {r['state_max_abs']['warmup_to_half']:.3g} -> {r['state_max_abs']['last10']:.3g}; "
                  f"{verdict}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))
    return 0 if all(all(r["checks"].values()) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
