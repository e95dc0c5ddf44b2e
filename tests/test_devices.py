"""Device profiles, memory fit, latency predictions and the latency-vs-context plot."""

import dataclasses
import json
import math

import numpy as np
import pytest

from edgemamba.artifact import TARGETS, compile_artifact, load_artifact
from edgemamba.checkpoint import load_checkpoint
from edgemamba.devices.context import parse_contexts, plot_context
from edgemamba.devices.fit import check_fit, weight_bytes
from edgemamba.devices.predict import artifact_engine, artifact_workload, predict, workload
from edgemamba.devices.profiles import PROFILES, TARGET_COSTS, DeviceProfile, Figure, GiB, Processor, get_profile
from edgemamba.errors import EdgeMambaError
from edgemamba.spec import ModelSpec
from test_cli import assert_user_error, run_cli

# mamba-2.8b's shape: d_model 2560, 64 layers, vocab 50280, d_inner 5120, d_state 16, dt_rank 160.
MAMBA_2P8B = ModelSpec("mamba1", d_model=2560, n_layer=64, vocab_size=50280, d_inner=5120, d_state=16, d_conv=4,
                       dt_rank=160)


@pytest.fixture(scope="module")
def tiny_artifact(hf_dirs, tmp_path_factory):
    _, d = hf_dirs("mamba")
    return compile_artifact(load_checkpoint(d), tmp_path_factory.mktemp("dev") / "tiny.em")


def _param_counts(spec):
    """(matrix parameters incl. the tied embedding, other parameters), counted by hand from the shapes."""
    d, e, n, r, L = spec.d_model, spec.d_inner, spec.d_state, spec.dt_rank, spec.n_layer
    matrices = L * (2 * e * d + (r + 2 * n) * e + e * r + d * e) + spec.vocab_size * d
    return matrices, spec.n_params - matrices


def test_2p8b_fp16_refused_on_orin_nano_with_the_numbers_and_fits_in_int4():
    nano = get_profile("orin-nano-8gb")
    matrices, small = _param_counts(MAMBA_2P8B)
    assert 2.7e9 < MAMBA_2P8B.n_params < 2.8e9
    fit = check_fit(MAMBA_2P8B, nano, "tensorrt", "fp16")
    assert fit.weight_bytes == 2 * matrices + 4 * small  # fp16 matrices, float32 norms/conv/A/D
    assert fit.state_bytes == 64 * (5120 * 3 + 5120 * 16) * 4  # conv (d_inner, 3) + ssm (d_inner, 16), fp32
    assert fit.usable_bytes == 5.5 * GiB
    assert not fit.fits
    assert fit.shortfall_bytes == fit.weight_bytes + fit.state_bytes + fit.workspace_bytes - fit.usable_bytes
    msg = fit.message()
    assert f"{fit.weight_bytes / GiB:.2f} GiB" in msg and "5.50 GiB is usable" in msg
    assert f"{fit.shortfall_bytes / GiB:.2f} GiB short" in msg
    assert "would fit: int8" in msg and "int4" in msg and "fp32" not in msg.split("short")[1]

    int4 = check_fit(MAMBA_2P8B, nano, "tensorrt", "int4")
    assert int4.fits
    # int4: 4-bit codes with a float32 scale per 64 weights, ~4.5 bits per layer weight (plus the
    # padding of dt_proj's 160 inputs to three blocks); the tied table as int8, 8.5 bits
    table = MAMBA_2P8B.vocab_size * MAMBA_2P8B.d_model
    assert int4.weight_bytes == pytest.approx((matrices - table) * 4.5 / 8 + table * 8.5 / 8 + 4 * small, rel=0.01)
    # the same model fp16 on the AGX Orin 64GB fits
    assert check_fit(MAMBA_2P8B, get_profile("agx-orin-64gb"), "tensorrt", "fp16").fits


@pytest.mark.parametrize("precision", TARGETS["ort-cpu"])
def test_weight_estimate_matches_the_compiled_artifact(precision, hf_dirs, tmp_path):
    """The fit check's per-precision bytes against the weight file the compiler really writes (on a
    tiny model, where the fixed terms the estimate leaves out weigh most: alignment, w8a8's extras)."""
    _, d = hf_dirs("mamba-untied-bias")
    art = compile_artifact(load_checkpoint(d), tmp_path / "a.em", "ort-cpu", precision,
                           calib_ids=np.arange(64) % 96)  # w8a8 calibrates activations on these
    real = art.manifest["files"]["weights.bin"]["bytes"]
    assert weight_bytes(art.spec, precision) == pytest.approx(real, rel=0.08 if precision == "w8a8" else 0.02)


def _synthetic(bandwidth: float, ops: float, usable: float = 4 * GiB) -> DeviceProfile:
    def fig(v):
        return Figure(v, "synthetic")

    cpu = Processor(kind="cpu", name="synthetic", cores=4, memory=fig(8 * GiB), usable_memory=fig(usable),
                    bandwidth=fig(bandwidth), bandwidth_efficiency=fig(1.0), peak_ops={"fp32": fig(ops)},
                    compute_efficiency=fig(1.0))
    return DeviceProfile("synthetic", "synthetic", cpu, None, targets=("ort-cpu",), precisions=("fp32", "int4"))


def test_prediction_roofline_and_overhead_on_synthetic_profiles():
    spec = dataclasses.replace(MAMBA_2P8B, n_layer=8)
    cost = TARGET_COSTS["ort-cpu"]
    work = workload(spec, "ort-cpu", "fp32")
    slow, fast = (predict(work, _synthetic(bw, 1e15)) for bw in (10e9, 20e9))
    assert slow.decode_bound == fast.decode_bound == "bandwidth"
    # doubling the bandwidth halves the bandwidth term; the overhead term stays
    assert fast.decode_memory_ms == pytest.approx(slow.decode_memory_ms / 2)
    assert fast.decode_ms - fast.decode_overhead_ms == pytest.approx((slow.decode_ms - slow.decode_overhead_ms) / 2)
    assert fast.decode_overhead_ms == slow.decode_overhead_ms > 0
    # the bytes a step streams: every fp32 weight (the tied embedding is the head) and the state twice
    head = 4 * spec.vocab_size * spec.d_model
    assert work.step_bytes == 4 * spec.n_params + 2 * spec.state_bytes(1) and work.head_bytes == head
    assert slow.decode_memory_ms == pytest.approx(
        1e3 * ((work.step_bytes - head) / (10e9 * cost.weight_read_efficiency.value)
               + head / (10e9 * cost.head_read_efficiency.value)))

    # compute-bound: more bandwidth changes nothing, more compute does
    weak = predict(work, _synthetic(1e15, 1e9))
    assert weak.decode_bound == "compute"
    assert predict(work, _synthetic(2e15, 1e9)).decode_ms == pytest.approx(weak.decode_ms)
    assert predict(work, _synthetic(1e15, 2e9)).decode_compute_ms == pytest.approx(weak.decode_compute_ms / 2)

    # the overhead term: launches × per-launch cost + one call + the unfused state update
    assert slow.decode_overhead_ms == pytest.approx(1e3 * (
        work.step_launches * cost.launch_s.value + cost.call_s.value
        + spec.n_layer * spec.d_inner * spec.d_state * cost.state_element_s.value))
    more = workload(spec, "ort-cpu", "fp32", step_launches=work.step_launches + 1000)
    extra = predict(more, _synthetic(10e9, 1e15)).decode_ms - slow.decode_ms
    assert extra == pytest.approx(1000 * cost.launch_s.value * 1e3)
    # an untied model's embedding contributes one row per step, not the table
    untied = dataclasses.replace(spec, tie_embeddings=False)
    assert workload(untied, "ort-cpu", "fp32").step_bytes == work.step_bytes + 4 * spec.d_model
    assert weight_bytes(untied, "fp32") == weight_bytes(spec, "fp32") + head
    # costs measured on a device replace the target's defaults
    measured = dataclasses.replace(_synthetic(10e9, 1e15), measured_costs={"ort-cpu": {
        "launch_s": Figure(0.0, "measured"), "call_s": Figure(0.0, "measured"), "state_element_s": Figure(0.0, "m")}})
    assert predict(work, measured).decode_overhead_ms == 0
    assert predict(work, measured).decode_memory_ms == slow.decode_memory_ms
    # prefill: a bandwidth-starved device reads the weights once per chunk, so throughput scales with it
    p1, p2 = (predict(work, _synthetic(bw, 1e15), prompt_len=512) for bw in (1e8, 2e8))
    assert p2.prefill_tokens_per_s == pytest.approx(2 * p1.prefill_tokens_per_s, rel=0.05)


def _synthetic_gpu(costs: dict[str, float], bandwidth: float = 1e18, ops: float = 1e21) -> DeviceProfile:
    """A GPU whose rooflines vanish (by default), with the tvm-cuda costs given (seconds)."""
    def fig(v):
        return Figure(v, "synthetic")

    gpu = Processor(kind="gpu", name="synthetic", cores=100, memory=fig(80 * GiB), usable_memory=fig(78 * GiB),
                    bandwidth=fig(bandwidth), bandwidth_efficiency=fig(1.0), peak_ops={"fp16": fig(ops)},
                    compute_efficiency=fig(1.0))
    base = _synthetic(1e11, 1e12)
    return dataclasses.replace(base, gpu=gpu, targets=("tvm-cuda",), precisions=("fp16",),
                               measured_costs={"tvm-cuda": {k: fig(v) for k, v in costs.items()}})


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_tvm_cuda_prefill_prediction_on_a_synthetic_profile(arch):
    """tvm-cuda prefill: per chunk its matrix products' K-tile steps, its kernels and the call; per chunk and
    layer the scan in time pieces (at most 32, multiples of 16 tokens), two passes of one piece length over
    d_inner channels; a token-sequential scan_step_s (0 by default since git 0862449) per token and layer.
    Expected time computed by hand from the spec's sizes."""
    sizes = {"d_state": 16} if arch == "mamba1" else {"d_state": 64, "n_heads": 32, "head_dim": 64}
    spec = ModelSpec(arch, d_model=1024, n_layer=6, vocab_size=4096, d_inner=2048, d_conv=4, dt_rank=70, **sizes)
    costs = {"scan_piece_step_s": 1e-9, "conv_group_step_s": 0.25e-6, "kloop_step_s": 0.5e-6, "launch_s": 3e-6, "chunk_launch_extra_s": 7e-6,
             "call_s": 50e-6}
    work = workload(spec, "tvm-cuda", "fp16")
    assert TARGET_COSTS["tvm-cuda"].scan_step_s.value == 0.0 and TARGET_COSTS["tvm-cuda"].scan_pieces == 32
    # K-tile steps a chunk: in_proj (K = d_model), out_proj and Mamba-1's x_proj (K = d_inner) in 32-deep
    # tiles; dt_proj (K = dt_rank, 70 -> 5 tiles) in 16-deep ones
    per_layer = 1024 // 32 + 2048 // 32 + (2048 // 32 + 5 if arch == "mamba1" else 0)
    assert work.chunk_ksteps == 6 * per_layer
    kernels = 6 * (8 if arch == "mamba1" else 7) + 3  # the layers' kernels, embedding, last row, lm_head
    assert work.chunk_launches == kernels
    chunk_s = 6 * per_layer * 0.5e-6 + kernels * (3e-6 + 7e-6) + 50e-6

    def scan_s(t):  # ScanChunkSpec.pieces: 256 -> 16 pieces of 16; 44 -> 3 of 16; 2048 -> 32 of 64; 2000 -> 32 of 64
        length = {256: 16, 44: 16, 2048: 64, 2000: 64}[t]
        return 6 * 2 * length * 2048 * 1e-9 + 6 * -(-t // 32) * 0.25e-6  # and the conv: ceil(t / 32) steps

    for tokens, chunks in (((256, 256), 2), ((256, 44), 2), ((256,), 1)):
        pred = predict(work, _synthetic_gpu(costs), prompt_len=sum(tokens))
        expected = chunks * chunk_s + sum(scan_s(t) for t in tokens)
        assert pred.prefill_tokens_per_s == pytest.approx(sum(tokens) / expected, rel=1e-9)
    # one call of 2,048 (2,000) tokens: 32 pieces of 64; the WMMA products' 64 x 64 output tiles exceed one
    # wave (3 a core x 100 cores = 300): in_proj's K steps are walked tiles / 300 times
    n_in = 4096 if arch == "mamba1" else 2 * 2048 + 2 * 64 + 32
    x_tiles = 32 * 2  # x_proj: N = dt_rank + 2 d_state = 102 -> 2 columns of tiles
    for tokens in (2048, 2000):
        one = predict(work, _synthetic_gpu(costs), prompt_len=tokens, chunk=tokens)
        waves = {"in": 32 * -(-n_in // 64) / 300, "out": max(1.0, 32 * 16 / 300), "x": max(1.0, x_tiles / 300)}
        ksteps = 6 * (1024 // 32 * waves["in"] + 2048 // 32 * waves["out"]
                      + ((2048 // 32) * waves["x"] + 5 if arch == "mamba1" else 0))
        assert tokens / one.prefill_tokens_per_s == pytest.approx(
            ksteps * 0.5e-6 + kernels * 10e-6 + 50e-6 + scan_s(tokens), rel=1e-9)
    pred = predict(work, _synthetic_gpu(costs), prompt_len=512)
    # a token-sequential scan step (a library before 0862449, set by a profile) adds to every token of every layer
    slower = predict(work, _synthetic_gpu({**costs, "scan_step_s": 1e-6}), prompt_len=512)
    assert 512 / slower.prefill_tokens_per_s - 512 / pred.prefill_tokens_per_s == pytest.approx(512 * 6 * 1e-6)
    # where the weights take longer to stream than the K loop, the bandwidth roofline sets the chunk
    starved = predict(work, _synthetic_gpu(costs, bandwidth=1e9), prompt_len=256)
    assert 256 / starved.prefill_tokens_per_s == pytest.approx(
        work.weight_bytes / (1e9 * TARGET_COSTS["tvm-cuda"].weight_read_efficiency.value)
        + kernels * 10e-6 + 50e-6 + scan_s(256), rel=1e-6)
    # targets without latency-bound products keep the roofline alone
    assert workload(spec, "ort-cpu", "fp32").chunk_ksteps == 0


def test_artifact_workload_uses_real_file_sizes_and_graph_nodes(tiny_artifact):
    work = artifact_workload(tiny_artifact, "ort")  # ONNX Runtime: one launch per graph node
    assert work.engine == "ort"
    assert work.weight_bytes == (tiny_artifact.path / "weights.bin").stat().st_size
    assert work.step_bytes == work.weight_bytes + 2 * tiny_artifact.spec.state_bytes(1)
    import onnx

    step = onnx.load(str(tiny_artifact.file("step")), load_external_data=False)
    assert work.step_launches == sum(n.op_type != "Constant" for n in step.graph.node)
    assert work.step_launches > 10 * tiny_artifact.spec.n_layer

    # the default engine runs the same bytes in a few thread-pool jobs a layer, not the graph's nodes
    native = artifact_workload(tiny_artifact)
    assert native.engine == "native" == artifact_engine(tiny_artifact)
    assert native.step_bytes == work.step_bytes
    spec = tiny_artifact.spec  # every matrix under 256 a side: one job each (_linear_jobs), conv, scan, head
    assert native.step_launches == (2 + 4) * spec.n_layer + 1


def _linear_jobs(fmt: str, shape) -> int:
    """Thread-pool jobs of one linear layer in a native decode step (emcpu.cc `linear`, one row): float
    weights with both sides at least 256 are split by input rows, then the threads' partial sums are
    added (2 jobs); smaller float weights are split by columns, MatMulNBits weights by output rows (1)."""
    return 2 if fmt in ("f32", "f16") and min(shape) >= 256 else 1


def test_native_engine_prediction_structure_on_synthetic_profiles():
    """ort-cpu's default engine: jobs counted from the engine's structure, efficiencies by storage
    format, the state update per element by architecture, prefill in 128-row pieces."""
    spec = dataclasses.replace(MAMBA_2P8B, n_layer=8)
    mamba2 = ModelSpec("mamba2", 768, 8, 50280, 1536, 128, 4, n_heads=24, head_dim=64)
    # decode jobs: conv and scan, the linear layers (Mamba-1: in, x, dt, out; Mamba-2: in, out), the head
    d, e, n, r = spec.d_model, spec.d_inner, spec.d_state, spec.dt_rank
    shapes = {spec: [(2 * e, d), (r + 2 * n, e), (e, r), (d, e)],  # (out, in)
              mamba2: [(mamba2.in_proj_dim, 768), (768, 1536)]}
    for s, mats in shapes.items():
        for precision, fmt in (("fp32", "f32"), ("fp16", "f16"), ("int8", "q8"), ("int4", "q4")):
            w = workload(s, "ort-cpu", precision)
            assert w.engine == "native" and w.layer_format == fmt
            assert w.step_launches == s.n_layer * (2 + sum(_linear_jobs(fmt, m) for m in mats)) + 1
    # per-format efficiencies measured on a device apply to that format only (int4 keeps an 8-bit head)
    base = _synthetic(10e9, 1e15)
    fast_q8 = dataclasses.replace(base, measured_costs={"ort-cpu": {
        "weight_read_efficiency.q8": Figure(1.0, "m"), "head_read_efficiency.q8": Figure(1.0, "m"),
        "weight_read_efficiency.q4": Figure(0.8, "m"), "head_read_efficiency.q4": Figure(0.1, "m"),
        "weight_read_efficiency": Figure(0.5, "m"), "head_read_efficiency": Figure(0.25, "m")}})
    for precision in ("fp32", "int8", "int4"):
        w = workload(spec, "ort-cpu", precision)
        layer_eff = {"fp32": 0.5, "int8": 1.0, "int4": 0.8}[precision]
        head_eff = {"fp32": 0.25, "int8": 1.0, "int4": 1.0}[precision]
        assert predict(w, fast_q8).decode_memory_ms == pytest.approx(
            1e3 * (w.body_bytes / (10e9 * layer_eff) + w.head_bytes / (10e9 * head_eff)))
    # the state update: per state element, Mamba-2's (one exp a head) apart from Mamba-1's (one an element)
    zero = {k: Figure(0.0, "m") for k in ("launch_s", "call_s")}
    states = dataclasses.replace(base, measured_costs={"ort-cpu": {
        **zero, "state_element_s": Figure(2e-9, "m"), "state_element_s.mamba2": Figure(5e-10, "m")}})
    for s, per in ((spec, 2e-9), (mamba2, 5e-10)):
        pred = predict(workload(s, "ort-cpu", "fp32"), states)
        assert pred.decode_overhead_ms == pytest.approx(1e3 * s.n_layer * s.d_inner * s.d_state * per)
    # prefill on a bandwidth-starved device: the engine reads the layer weights once per piece of a
    # Session chunk (256 tokens; pieces of 128 rows in every format: NativeBackend's max_rows) and the
    # head once per Session chunk: 512 tokens read the layers 4 times, the head twice
    starved = dataclasses.replace(_synthetic(1e7, 1e18), measured_costs={"ort-cpu": {
        **zero, "state_element_s": Figure(0.0, "m"), **{f"{k}{v}": Figure(1.0, "m") for k in (
            "weight_read_efficiency", "head_read_efficiency") for v in ("", ".q8", ".q4")}}})
    for precision, pieces in (("fp32", 4), ("int8", 4), ("int4", 4)):
        w = workload(spec, "ort-cpu", precision)
        pred = predict(w, starved, prompt_len=512, chunk=256)
        layers = w.weight_bytes - w.head_bytes
        assert 512 / pred.prefill_tokens_per_s == pytest.approx((pieces * layers + 2 * w.head_bytes) / 1e7, rel=1e-6)
    # compute-bound: the rate is the processor's fp32 rate times the engine's GEMM efficiency for the format
    slow_cpu = dataclasses.replace(_synthetic(1e15, 1e9), measured_costs={"ort-cpu": {
        **zero, "state_element_s": Figure(0.0, "m"), "gemm_efficiency.q8": Figure(0.5, "m"),
        "gemm_efficiency": Figure(1.0, "m")}})
    f32, q8 = (predict(workload(spec, "ort-cpu", p), slow_cpu, prompt_len=512) for p in ("fp32", "int8"))
    assert q8.prefill_tokens_per_s == pytest.approx(f32.prefill_tokens_per_s / 2, rel=1e-3)

    # ONNX Runtime (`--engine ort`) keeps its own costs: node launches, the ONNX Scan's step
    ort = workload(spec, "ort-cpu", "fp32", engine="ort")
    cost = TARGET_COSTS["ort-cpu/ort"]
    assert ort.engine == "ort" and ort.step_launches == 47 * spec.n_layer + 8
    assert predict(ort, base).decode_overhead_ms == pytest.approx(1e3 * (
        ort.step_launches * cost.launch_s.value + cost.call_s.value
        + spec.n_layer * spec.d_inner * spec.d_state * cost.state_element_s.value))
    with pytest.raises(EdgeMambaError, match="engine 'tensorrt' does not run ort-cpu"):
        workload(spec, "ort-cpu", "fp32", engine="tensorrt")


def test_profiles_round_trip_engine_and_format_costs():
    """Measured costs of both ort-cpu engines and per-format variants survive JSON; unknown ones are refused."""
    p = dataclasses.replace(_synthetic(10e9, 1e12), measured_costs={
        "ort-cpu": {"launch_s": Figure(2e-6, "m"), "weight_read_efficiency.q4": Figure(0.6, "m"),
                    "state_element_s.mamba2": Figure(1e-10, "m")},
        "ort-cpu/ort": {"launch_s": Figure(1e-6, "m")}})
    back = DeviceProfile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p
    assert back.cost("ort-cpu").figure("weight_read_efficiency", "q4").value == 0.6
    default = TARGET_COSTS["ort-cpu"]  # what was not measured stays the default: its variant, else its field
    assert back.cost("ort-cpu").figure("weight_read_efficiency", "q8") == default.variants["weight_read_efficiency.q8"]
    assert back.cost("ort-cpu").figure("weight_read_efficiency", "w8") == default.weight_read_efficiency
    assert back.cost("ort-cpu", "ort").launch_s.value == 1e-6 and back.cost("ort-cpu").launch_s.value == 2e-6
    for bad in ({"ort-cpu": {"weight_read_efficiency.q3": 1.0}}, {"ort-cpu/tvm": {"launch_s": 1.0}},
                {"ort-cpu": {"launches_per_layer": 1.0}}):
        with pytest.raises(EdgeMambaError, match="unknown measured cost"):
            DeviceProfile.from_dict({**p.to_dict(), "measured_costs": bad})


def test_every_profile_has_sourced_figures_and_the_issue_devices():
    for name in ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "rpi5-8gb", "x86-laptop", "rtx-4090",
                 "h100-sxm-80gb"):
        p = PROFILES[name]
        assert DeviceProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p  # JSON round trip
        for proc in filter(None, (p.cpu, p.gpu)):
            figures = [proc.memory, proc.usable_memory, proc.bandwidth, *proc.peak_ops.values()]
            assert all(f.source and f.value > 0 for f in figures), name
            assert proc.usable_memory.value < proc.memory.value, name
        assert set(p.precisions) <= {"fp32", "fp16", "int8", "int4", "w8a8"}
    with pytest.raises(EdgeMambaError, match="unknown device 'orin-nanoo'"):
        get_profile("orin-nanoo")


def test_cli_devices_probe_and_predict_beside_measurement(tiny_artifact, tmp_path):
    import psutil

    r = run_cli("devices")
    assert r.returncode == 0 and "orin-nano-8gb" in r.stdout and "h100-sxm-80gb" in r.stdout
    r = run_cli("devices", "rpi5-8gb")
    assert r.returncode == 0 and "Raspberry Pi 5 product brief" in r.stdout and "estimate:" in r.stdout
    r = run_cli("devices", "--probe", "--json")
    assert r.returncode == 0, r.stderr
    probed = json.loads(r.stdout)
    assert probed["cpu"]["cores"] == psutil.cpu_count(logical=False)
    assert probed["cpu"]["memory_bytes"]["value"] == psutil.virtual_memory().total
    assert probed["cpu"]["bandwidth_bytes_per_s"]["value"] > 1e8
    assert probed["cpu"]["bandwidth_bytes_per_s"]["source"].startswith("measured")
    ort_costs = probed["measured_costs"]["ort-cpu/ort"]  # ONNX Runtime's own costs, measured here
    assert set(ort_costs) == {"launch_s", "call_s", "weight_read_efficiency", "head_read_efficiency",
                              "state_element_s", "scan_step_s"}
    assert all(c["source"].startswith("measured") and c["value"] >= 0 for c in ort_costs.values())
    native = probed["measured_costs"]["ort-cpu"]  # the native engine's, from synthetic models
    formats = {f"{name}.{f}" for name, fs in (("weight_read_efficiency", "f16 q8 q4"), ("gemm_efficiency", "f16 q8 q4"),
                                               ("head_read_efficiency", "f16 q8")) for f in fs.split()}
    assert set(native) == {"launch_s", "call_s", "state_element_s", "state_element_s.mamba2", "weight_read_efficiency",
                           "head_read_efficiency", "gemm_efficiency"} | formats
    assert all(c["source"].startswith("measured") and c["value"] >= 0 for c in native.values())
    assert all(0.05 < native[k]["value"] < 5 for k in native if "efficiency" in k)
    profile = tmp_path / "this.json"
    profile.write_text(r.stdout)

    r = run_cli("bench", tiny_artifact.path, "--predict", profile, "--tokens", 16, "--prompt-len", 32,
                "--repeats", 1, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    pred = out["prediction"]
    assert out["decode_ms"]["p50"] > 0 and pred["decode_ms"] > 0 and pred["prefill_tokens_per_s"] > 0
    assert pred["error_vs_measured"]["decode"] == pytest.approx(pred["decode_ms"] / out["decode_ms"]["p50"] - 1)

    # --tvm-library: with --probe only, and a tvm-cuda artifact, refused before anything is measured
    assert run_cli("devices", "--tvm-library", tiny_artifact.path).returncode == 2
    assert_user_error(run_cli("devices", "--probe", "--tvm-library", tiny_artifact.path),
                      "--tvm-library needs a tvm-cuda artifact")

    r = run_cli("bench", tiny_artifact.path, "--predict", "orin-nano-8gb", "--no-measure")
    assert r.returncode == 0 and "predicted   decode" in r.stdout and "p50" not in r.stdout
    assert_user_error(run_cli("bench", tiny_artifact.path, "--predict", "orin-nanoo", "--no-measure"),
                      "unknown device 'orin-nanoo'")


def test_compile_device_defaults_and_refusal(hf_dirs, tmp_path):
    _, d = hf_dirs("mamba")
    r = run_cli("compile", d, "--device", "x86-laptop", "-o", tmp_path / "ok.em")
    assert r.returncode == 0, r.stderr
    art = load_artifact(tmp_path / "ok.em")
    assert (art.target, art.precision) == ("ort-cpu", "fp32")  # the laptop's first target and precision
    assert "fits with" in r.stdout

    # a device with room for the int4 model but not the fp32 one
    spec = art.spec
    need = {p: check_fit(spec, _synthetic(1e10, 1e11), "ort-cpu", p).total_bytes for p in ("fp32", "int4")}
    small = _synthetic(1e10, 1e11, usable=(need["fp32"] + need["int4"]) / 2)
    profile = tmp_path / "small.json"
    profile.write_text(json.dumps(small.to_dict()))
    r = run_cli("compile", d, "--device", profile, "--precision", "fp32", "-o", tmp_path / "no.em")
    short = need["fp32"] - int(small.cpu.usable_memory.value)
    assert_user_error(r, "in fp32 needs", f"{short / 2**20:.1f} MiB short", "would fit: int4")
    assert not (tmp_path / "no.em").exists()


def test_parse_contexts():
    assert parse_contexts("64,1k,8k,64k") == [64, 1024, 8192, 65536]
    assert parse_contexts(" 8k, 64 ,64") == [64, 8192]
    with pytest.raises(EdgeMambaError, match="'1q'"):
        parse_contexts("64,1q")


def test_context_plot_is_a_png_of_the_json_points(tiny_artifact, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    png = tmp_path / "ctx.png"
    r = run_cli("bench", tiny_artifact.path, "--contexts", "16,64,256", "--tokens", 16, "--plot", png, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "ctx.json").read_text())
    assert json.loads(r.stdout)["points"] == result["points"]
    spec = tiny_artifact.spec
    assert [p["context"] for p in result["points"]] == [16, 64, 256]
    for p in result["points"]:
        assert p["decode_ms_p50"] > 0 and p["rss_bytes"] > 0
        assert p["state_bytes"] == spec.state_bytes(1) == tiny_artifact.manifest["state_bytes_per_sequence"]
        # a Transformer of the same width and half the layers, fp32 K and V per position
        assert p["transformer_kv_bytes"] == 2 * (spec.n_layer // 2) * spec.d_model * p["context"] * 4
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
        im.load()

    # the figure draws exactly the JSON's points: its lines hold them, and redrawing gives the same bytes
    again = tmp_path / "again.png"
    fig = plot_context(result, again)
    latency, memory = fig.axes
    assert list(latency.lines[0].get_xdata()) == [16, 64, 256]
    assert list(latency.lines[0].get_ydata()) == [p["decode_ms_p50"] for p in result["points"]]
    assert [y * 2**20 for y in memory.lines[2].get_ydata()] == pytest.approx(
        [p["transformer_kv_bytes"] for p in result["points"]])
    assert again.read_bytes() == png.read_bytes()
    assert math.isfinite(result["points"][-1]["transformer_decode_ms_scaled"])
