"""Decode-step kernels on a GPU: edgemamba's CUDA kernels beside mamba_ssm's, in one run.

For each model shape and batch, every layer's kernels are captured into one CUDA graph per
implementation (the way both decoders run a step), and graph replays are timed with CUDA events:

  ours SSU       em_selective_state_update, all layers             (edgemamba/kernels/cuda)
  triton SSU     mamba_ssm.ops.triton.selective_state_update       (mamba_ssm 2.3.2.post1)
  ours conv      em_causal_conv1d_step, all layers
  torch conv     mamba_ssm's step conv when the causal_conv1d package is absent (roll, write, sum, silu)
  ours step      ours conv + ours SSU            mamba_ssm step   torch conv + triton SSU

fp16 activations, fp32 state, A/D/dt_bias fp32, random inputs. Each graph is timed `--rounds` times
in alternating order (the spread between rounds is the noise); the table gives medians in µs per
decode step (all layers), and the state-bandwidth floor (state bytes read + written / copy bandwidth).

  MAMBA_SSM_SRC=benchmarks/.cache/mamba_ssm_src python3 benchmarks/gpu_kernels.py --out DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgemamba.kernels.cuda import KernelLibrary, build_library  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    d_inner: int
    d_state: int
    head_dim: int = 0  # 0: Mamba-1
    n_groups: int = 1
    d_conv: int = 4

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim if self.head_dim else self.d_inner

    @property
    def conv_dim(self) -> int:
        return self.d_inner + (2 * self.n_groups * self.d_state if self.head_dim else 0)


SHAPES = [
    Shape("mamba-130m", n_layer=24, d_inner=1536, d_state=16),
    Shape("mamba-1.4b", n_layer=48, d_inner=4096, d_state=16),
    Shape("mamba2-130m", n_layer=24, d_inner=1536, d_state=128, head_dim=64),
]


def import_triton_ssu(src: Path):
    """mamba_ssm's Triton selective_state_update without running mamba_ssm/__init__.py (which needs
    its compiled CUDA extensions): the packages on the way are created empty, pointing at the source."""
    for pkg in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(src.joinpath(*pkg.split(".")))]
        sys.modules[pkg] = mod
    try:
        import einops  # noqa: F401
    except ImportError:  # imported by the module, unused by selective_state_update
        sys.modules["einops"] = types.SimpleNamespace(rearrange=None, repeat=None)
    return importlib.import_module("mamba_ssm.ops.triton.selective_state_update").selective_state_update


class Layers:
    """Per-layer tensors of one shape and batch: states for each implementation, inputs, weights."""

    def __init__(self, s: Shape, batch: int, gen: torch.Generator, n_layer: int | None = None):
        def randn(*shape, dtype=torch.float16, scale=1.0, shift=0.0):
            return (torch.randn(*shape, generator=gen, device="cuda") * scale + shift).to(dtype)

        b, H, N, G = batch, s.n_heads, s.d_state, s.n_groups
        head = (H,) if not s.head_dim else (H, s.head_dim)
        self.s, self.batch = s, batch
        self.layers = []
        for _ in range(n_layer or s.n_layer):
            state = randn(b, *head, N, dtype=torch.float32)
            conv_state = randn(b, s.conv_dim, s.d_conv - 1, dtype=torch.float32)
            self.layers.append(dict(
                state_ours=state.clone(), state_triton=state.clone(),
                conv_ours=conv_state.clone(),
                # mamba_ssm keeps the last K inputs, of which a step uses the newest K-1
                conv_torch=torch.cat([torch.zeros_like(conv_state[..., :1]), conv_state], -1),
                x=randn(b, *head), z=randn(b, *head) if not s.head_dim else None,
                dt=randn(b, H, scale=1.0, shift=-3.0),
                A=-torch.rand(H, N, generator=gen, device="cuda") * 15 - 0.5 if not s.head_dim
                else -torch.rand(H, generator=gen, device="cuda") * 15 - 0.5,
                B=randn(b, N) if not s.head_dim else randn(b, G, N),
                C=randn(b, N) if not s.head_dim else randn(b, G, N),
                D=randn(H, dtype=torch.float32, scale=0.3, shift=1.0),
                dt_bias=randn(H, dtype=torch.float32, shift=-2.0),
                y_ours=torch.empty(b, *head, dtype=torch.float16, device="cuda"),
                xc=randn(b, s.conv_dim), conv_w=randn(s.conv_dim, s.d_conv, dtype=torch.float32, scale=0.5),
                conv_b=randn(s.conv_dim, dtype=torch.float32),
                yc_ours=torch.empty(b, s.conv_dim, dtype=torch.float16, device="cuda"),
            ))

    def ours_ssu(self, lib: KernelLibrary):
        s, stream = self.s, torch.cuda.current_stream().cuda_stream
        for L in self.layers:
            lib.selective_state_update(
                L["state_ours"].data_ptr(), L["state_ours"].data_ptr(), L["x"].data_ptr(), L["dt"].data_ptr(),
                L["A"].data_ptr(), L["B"].data_ptr(), L["C"].data_ptr(), L["D"].data_ptr(),
                L["z"].data_ptr() if L["z"] is not None else 0, L["dt_bias"].data_ptr(), L["y_ours"].data_ptr(),
                batch=self.batch, n_heads=s.n_heads, head_dim=max(s.head_dim, 1), n_groups=s.n_groups,
                d_state=s.d_state, a_per_state=not s.head_dim, act_dtype="float16", weight_dtype="float32",
                stream=stream)

    def triton_ssu(self, ssu):
        """As mamba_ssm's Mamba.step / Mamba2.step call it (Mamba-2: per-head values broadcast with stride 0)."""
        s = self.s
        out = []
        for L in self.layers:
            if not s.head_dim:
                out.append(ssu(L["state_triton"], L["x"], L["dt"], L["A"], L["B"], L["C"], L["D"], z=L["z"],
                               dt_bias=L["dt_bias"], dt_softplus=True))
            else:
                P, N = s.head_dim, s.d_state
                out.append(ssu(L["state_triton"], L["x"], L["dt"][:, :, None].expand(-1, -1, P),
                               L["A"][:, None, None].expand(-1, P, N), L["B"], L["C"],
                               L["D"][:, None].expand(-1, P), z=None, dt_bias=L["dt_bias"][:, None].expand(-1, P),
                               dt_softplus=True))
        return out

    def ours_conv(self, lib: KernelLibrary):
        s, stream = self.s, torch.cuda.current_stream().cuda_stream
        for L in self.layers:
            lib.causal_conv1d_step(L["xc"].data_ptr(), L["conv_ours"].data_ptr(), L["conv_ours"].data_ptr(),
                                   L["conv_w"].data_ptr(), L["conv_b"].data_ptr(), L["yc_ours"].data_ptr(),
                                   batch=self.batch, channels=s.conv_dim, width=s.d_conv, silu=True,
                                   act_dtype="float16", weight_dtype="float32", stream=stream)

    def torch_conv(self):
        """mamba_ssm's Mamba.step without causal_conv1d: its conv_state is (b, C, K)."""
        out = []
        for L in self.layers:
            cs = L["conv_torch"]
            cs.copy_(torch.roll(cs, shifts=-1, dims=-1))
            cs[:, :, -1] = L["xc"]
            y = torch.sum(cs * L["conv_w"], dim=-1) + L["conv_b"]
            out.append(torch.nn.functional.silu(y).to(torch.float16))
        return out


def capture(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: Triton compiles, caches fill
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_graph(graph: torch.cuda.CUDAGraph, n: int, warmup: int = 20) -> float:
    """Median µs of one replay, each replay bracketed by its own CUDA events."""
    for _ in range(warmup):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * 2**30 * 20 / (start.elapsed_time(end) * 1e-3)


def agreement(layers: Layers, lib, ssu) -> dict:
    """One step of each implementation from identical states: same y and state (relative L2)."""
    for L in layers.layers:
        L["state_triton"].copy_(L["state_ours"])
        L["conv_torch"][..., 1:].copy_(L["conv_ours"])
    layers.ours_ssu(lib)
    ys = layers.triton_ssu(ssu)
    layers.ours_conv(lib)
    ycs = layers.torch_conv()
    torch.cuda.synchronize()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    return {
        "y": max(rel(L["y_ours"], y) for L, y in zip(layers.layers, ys)),
        "state": max(rel(L["state_ours"], L["state_triton"]) for L in layers.layers),
        "conv_y": max(rel(L["yc_ours"], y) for L, y in zip(layers.layers, ycs)),
        "conv_state": max(rel(L["conv_ours"], L["conv_torch"][..., 1:]) for L in layers.layers),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--replays", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true",
                    help="run one layer of each SSU eagerly, 3 times per shape, for ncu (no timing)")
    ap.add_argument("--mamba-ssm-src", type=Path,
                    default=Path(os.environ.get("MAMBA_SSM_SRC", Path(__file__).parent / ".cache/mamba_ssm_src")))
    args = ap.parse_args()

    major, minor = torch.cuda.get_device_capability()
    lib = KernelLibrary(build_library(Path(tempfile.mkdtemp()), arch=f"sm_{major}{minor}"))
    ssu = import_triton_ssu(args.mamba_ssm_src)
    bandwidth = copy_bandwidth()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": importlib.import_module("triton").__version__, "copy_GBps_rw": bandwidth / 1e9}
    print("ENV", json.dumps(env), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.profile:
        for s in SHAPES:
            for batch in args.batches:
                layers = Layers(s, batch, gen, n_layer=1)
                for _ in range(3):
                    layers.ours_ssu(lib)
                    layers.triton_ssu(ssu)
        torch.cuda.synchronize()
        return
    results = []
    for s in SHAPES:
        for batch in args.batches:
            layers = Layers(s, batch, gen)
            agree = agreement(layers, lib, ssu)
            graphs = {
                "ours_ssu": capture(lambda: layers.ours_ssu(lib)),
                "triton_ssu": capture(lambda: layers.triton_ssu(ssu)),
                "ours_conv": capture(lambda: layers.ours_conv(lib)),
                "torch_conv": capture(layers.torch_conv),
                "ours_step": capture(lambda: (layers.ours_conv(lib), layers.ours_ssu(lib))),
                "mamba_ssm_step": capture(lambda: (layers.torch_conv(), layers.triton_ssu(ssu))),
            }
            times = {k: [] for k in graphs}
            for r in range(args.rounds):  # alternate the order between rounds
                for k in (graphs if r % 2 == 0 else reversed(list(graphs))):
                    times[k].append(time_graph(graphs[k], args.replays))
            state_bytes = 2 * 4 * batch * s.d_inner * s.d_state * s.n_layer  # fp32 state read + written
            row = {"model": s.name, "batch": batch, "agreement": agree,
                   "floor_us": state_bytes / bandwidth * 1e6,
                   **{k: statistics.median(v) for k, v in times.items()},
                   "rounds": times}
            results.append(row)
            print("RESULT", json.dumps(row), flush=True)
            graphs.clear()  # the next shape's tensors and graph pools replace these
            torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_kernels.json").write_text(json.dumps({"env": env, "results": results}, indent=1))

    print(f"\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}, copy {bandwidth / 1e9:.0f} GB/s (r+w)")
    print("µs per decode step, all layers, CUDA-graph replay, median of rounds (fp16 act, fp32 state)")
    head = ("model", "b", "ours SSU", "triton SSU", "SSU ratio", "ours conv", "torch conv", "ours step",
            "mamba_ssm step", "ours step/triton SSU", "floor", "max rel diff y/state")
    print(" | ".join(head))
    for r in results:
        a = r["agreement"]
        print(" | ".join([
            r["model"], str(r["batch"]), f"{r['ours_ssu']:.1f}", f"{r['triton_ssu']:.1f}",
            f"{r['triton_ssu'] / r['ours_ssu']:.2f}x", f"{r['ours_conv']:.1f}", f"{r['torch_conv']:.1f}",
            f"{r['ours_step']:.1f}", f"{r['mamba_ssm_step']:.1f}", f"{r['ours_step'] / r['triton_ssu']:.2f}",
            f"{r['floor_us']:.1f}", f"{max(a['y'], a['conv_y']):.1e}/{max(a['state'], a['conv_state']):.1e}"]))


if __name__ == "__main__":
    main()
