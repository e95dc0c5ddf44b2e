"""Describe the machine this runs on as a DeviceProfile, with quick measurements.

Memory bandwidth is measured as a float32 matrix-vector product over a matrix four times the
last-level cache (the access pattern of a decode step: every weight read once) with NumPy's BLAS, and the
fp32 rate as a prefill-shaped matrix product with ONNX Runtime's MLAS (the CPU runtime edgemamba
ships; NumPy's BLAS build may lack the CPU's widest vectors), both on all threads. A CUDA GPU is
described and measured through torch when torch sees one. Measured figures are achievable rates,
so their efficiencies are 1.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from edgemamba.devices.profiles import GiB, MiB, DeviceProfile, Figure, Processor, est
from edgemamba.errors import EdgeMambaError
from edgemamba.runtimes import physical_cores

PROBE_NAME = "this"


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time after one warm-up call (page faults, thread pools): the typical state of a
    shared machine, as `edgemamba bench` reports p50."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs); 0 when unknown."""
    sizes = [0]
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError):
            pass
    return max(sizes)


def bandwidth_test_bytes() -> int:
    """Four times the last-level cache (so the matrix streams from memory), at least 256 MiB, at
    most a quarter of the memory available now."""
    import psutil

    want = max(256 * MiB, 4 * last_level_cache_bytes())
    return int(min(want, psutil.virtual_memory().available // 4))


def measure_read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s streamed by a float32 matrix-vector product over an `nbytes` matrix."""
    cols = 4096
    w = np.ones((max(1, nbytes // (4 * cols)), cols), np.float32)  # (rows, cols)
    x = np.ones(cols, np.float32)
    return w.nbytes / _median_seconds(lambda: w @ x, repeats)


def measure_fp32_flops(m: int = 256, n: int = 2048, repeats: int = 9, threads: int | None = None) -> float:
    """Ops/s of an ONNX Runtime float32 MatMul (m, n) · (n, n): one prefill chunk's projection."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((n, n), 1e-3, np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or physical_cores()
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.ones((m, n), np.float32)
    return 2.0 * m * n * n / _median_seconds(lambda: sess.run(None, {"x": x}), repeats)


# ---- ONNX Runtime's own costs here (the ort-cpu target) --------------------------------------------
def _ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.disable_prepacking", "1")  # as the ORT backend runs float weights
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def measure_ort_costs(read_bandwidth: float, nbytes: int, threads: int | None = None) -> dict[str, Figure]:
    """The ort-cpu TargetCost fields, from ONNX Runtime micro-graphs (never a model):

    launch_s, call_s      chains of 1 and 401 elementwise nodes on a d_inner-sized row (medians)
    weight_read_eff.      a chain of layer-sized (1024², 4 MiB) MatMuls, `nbytes` in all, each
                          streaming from memory and paying its own dispatch, against `read_bandwidth`
    head_read_eff.        the head's Gemm(transB=1) over an `nbytes` table
    state_element_s,      an ONNX Scan of the Mamba state update (6 nodes) over 128 steps at two
    scan_step_s           state sizes: per-step time = scan_step_s + elements · state_element_s
    """
    from onnx import TensorProto, helper, numpy_helper

    threads = threads or physical_cores()
    f32, vi = TensorProto.FLOAT, helper.make_tensor_value_info

    def model(nodes, inputs, outputs, inits=()):
        graph = helper.make_graph(nodes, "probe", inputs, outputs, list(inits))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)

    def chain(count, width=1536):
        nodes = [helper.make_node("Mul" if i % 2 else "Add", ["x" if i == 0 else f"y{i - 1}", "c"], [f"y{i}"])
                 for i in range(count)]
        c = numpy_helper.from_array(np.ones((1, width), np.float32), "c")
        return _ort_session(model(nodes, [vi("x", f32, [1, width])], [vi(f"y{count - 1}", f32, [1, width])], [c]),
                            threads)

    row = {"x": np.ones((1, 1536), np.float32)}
    one, many = chain(1), chain(401)
    t1 = _median_seconds(lambda: one.run(None, row), 500)
    t401 = _median_seconds(lambda: many.run(None, row), 100)
    launch = max(0.0, (t401 - t1) / 400)

    k = 1024
    count = max(1, nbytes // (4 * k * k))
    names = [f"w{i}" for i in range(count)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"y{i - 1}", w], [f"y{i}"]) for i, w in enumerate(names)]
    sess = _ort_session(model(nodes, [vi("x", f32, [1, k])] + [vi(w, f32, [k, k]) for w in names],
                              [vi(f"y{count - 1}", f32, [1, k])]), threads)
    feeds = {w: np.full((k, k), 1.0 / k, np.float32) for w in names}  # weights as inputs: never prepacked
    feeds["x"] = np.ones((1, k), np.float32)
    matmul_bw = count * 4 * k * k / _median_seconds(lambda: sess.run(None, feeds), 5)
    del sess, feeds

    k = 4096
    n = max(1, nbytes // (4 * k))
    table = numpy_helper.from_array(np.full((n, k), 1e-3, np.float32), "table")
    sess = _ort_session(model([helper.make_node("Gemm", ["x", "table"], ["y"], transB=1)], [vi("x", f32, [1, k])],
                              [vi("y", f32, [1, n])], [table]), threads)
    x = {"x": np.ones((1, k), np.float32)}
    head_bw = n * k * 4 / _median_seconds(lambda: sess.run(None, x), 5)
    del sess, table

    per_step = {}
    steps, ns = 128, 16
    for e in (512, 2048):
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
        sess = _ort_session(model([scan], [vi("h0", f32, [1, e, ns]), vi("dt", f32, [1, steps, e, 1]),
                                           vi("dtx", f32, [1, steps, e, 1]), vi("B", f32, [1, steps, 1, ns]),
                                           vi("C", f32, [1, steps, ns, 1])],
                                  [vi("h", f32, [1, e, ns]), vi("y", f32, [1, steps, e, 1])], [a]), threads)
        feeds = {"h0": np.zeros((1, e, ns), np.float32), "dt": np.full((1, steps, e, 1), 0.01, np.float32),
                 "dtx": np.full((1, steps, e, 1), 0.01, np.float32), "B": np.ones((1, steps, 1, ns), np.float32),
                 "C": np.ones((1, steps, ns, 1), np.float32)}
        per_step[e * ns] = _median_seconds(lambda: sess.run(None, feeds), 5) / steps
    (s1, t1), (s2, t2) = sorted(per_step.items())
    element = max(0.0, (t2 - t1) / (s2 - s1))

    how = f"measured: ONNX Runtime micro-graph, {threads} threads"
    return {
        "launch_s": Figure(launch, f"{how}: chain of 401 elementwise nodes"),
        "call_s": Figure(max(0.0, t1 - launch), f"{how}: one-node graph call"),
        "weight_read_efficiency": Figure(matmul_bw / read_bandwidth, f"{how}: chain of 4 MiB MatMuls, "
                                         f"{matmul_bw / 1e9:.1f} GB/s against {read_bandwidth / 1e9:.1f}"),
        "head_read_efficiency": Figure(head_bw / read_bandwidth, f"{how}: Gemm(transB=1), {head_bw / 1e9:.1f} GB/s"),
        "state_element_s": Figure(element, f"{how}: ONNX Scan of the state update at two sizes"),
        "scan_step_s": Figure(max(0.0, t1 - s1 * element), f"{how}: ONNX Scan of the state update at two sizes"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def probe_cpu(threads: int | None = None) -> Processor:
    """`threads`: ONNX Runtime threads for the fp32 rate (default: all physical cores); NumPy's
    BLAS threads are set by its environment (OPENBLAS_NUM_THREADS) before it loads."""
    import psutil

    vm = psutil.virtual_memory()
    bandwidth_bytes = bandwidth_test_bytes()
    bandwidth = measure_read_bandwidth(bandwidth_bytes)
    fp32 = measure_fp32_flops(threads=threads)
    flags = _cpu_flags()
    peak = {"fp32": Figure(fp32, "measured: ONNX Runtime float32 MatMul 256×2048 · 2048×2048, median of 9")}
    if flags & {"avx512_vnni", "avx_vnni", "asimddp"}:
        peak["int8"] = est(4 * fp32, "4× the measured fp32 rate (int8 dot-product instructions present)")
    if flags & {"avx512_fp16", "asimdhp"}:
        peak["fp16"] = est(2 * fp32, "2× the measured fp32 rate (fp16 arithmetic present)")
    memory = Figure(float(vm.total), "measured: psutil total memory")
    return Processor(
        kind="cpu", name=f"{_cpu_model()} ({platform.machine()})", cores=physical_cores(), memory=memory,
        usable_memory=Figure(float(vm.available), "measured: psutil available memory now"),
        bandwidth=Figure(bandwidth, f"measured: NumPy float32 matrix-vector product over {bandwidth_bytes // MiB} "
                                    "MiB, median of 5"),
        bandwidth_efficiency=Figure(1.0, "measured bandwidth is already achievable"),
        peak_ops=peak, compute_efficiency=Figure(1.0, "measured rate is already achievable"),
    )


def probe_gpu() -> Processor | None:
    """The first CUDA device torch sees, measured; None without torch or a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    buf = torch.empty(1 * GiB // 2, dtype=torch.uint8, device="cuda")  # 512 MiB
    dst = torch.empty_like(buf)

    def timed(fn, repeats=10) -> float:
        fn()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3 / repeats

    bandwidth = 2 * buf.numel() / timed(lambda: dst.copy_(buf))  # read + write
    n = 8192
    half = torch.ones((n, n), dtype=torch.float16, device="cuda")
    fp16 = 2.0 * n**3 / timed(lambda: half @ half)
    single = half.float()
    fp32 = 2.0 * n**3 / timed(lambda: single @ single)
    measured = "measured: torch on the GPU"
    memory = Figure(float(total), "measured: cudaMemGetInfo total")
    return Processor(
        kind="gpu", name=f"{props.name}, {props.multi_processor_count} SMs", cores=props.multi_processor_count,
        memory=memory, usable_memory=Figure(float(free), "measured: cudaMemGetInfo free now"),
        bandwidth=Figure(bandwidth, f"{measured}: device-to-device copy of 512 MiB (read + write)"),
        bandwidth_efficiency=Figure(1.0, "measured bandwidth is already achievable"),
        peak_ops={"fp32": Figure(fp32, f"{measured}: 8192² float32 matrix product (TF32 off unless enabled)"),
                  "fp16": Figure(fp16, f"{measured}: 8192² float16 matrix product")},
        compute_efficiency=Figure(1.0, "measured rate is already achievable"),
    )


# ---- a CUDA GPU's per-kernel and per-call costs (the tvm-cuda and tensorrt targets) ----------------
GPU_LOGITS = 50280  # floats read back per call: the GPT-NeoX vocabulary of the released Mamba checkpoints


def _kernels_per_call(torch, fn) -> int:
    """GPU kernels one call of fn launches (cuBLAS may split a product in two), from torch's profiler."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return max(1, sum(1 for e in prof.events() if e.device_type.name == "CUDA"))
    except Exception:  # noqa: BLE001 (a profiler that cannot run here: one kernel a call)
        return 1


def _cudart():
    """The CUDA runtime (the one the runtimes call for copies and graph launches), or None."""
    from edgemamba.runtimes.tvm import _cudart as load

    try:
        return load()
    except EdgeMambaError:
        return None


def measure_gpu_costs(copy_bandwidth: float) -> dict[str, Figure]:
    """The GPU targets' per-kernel and per-call costs, from torch micro-graphs (never a model):

    launch_s   CUDA graphs of cuBLAS fp16 matrix-vector products (torch.mv), each over its own
               matrix, the whole chain at least 3x the L2 cache so the weights stream from memory as
               a decode step's do, at two sizes: per product t = kernels · launch_s + bytes / bandwidth,
               solved for both. launch_s is what a small matrix-vector kernel costs in graph replay
               beyond its bytes (node launch, the memory round trip, the reduction, the drain): the
               floor of every decode kernel. (The bandwidth found is cuBLAS's, reported in the source
               text; how fast a target's own kernels stream stays the target's figure.)
    call_s     one host call of a step as the runtimes make it (CUDA runtime calls): 4 bytes of ids
               up, a one-kernel graph replay, GPU_LOGITS float32 logits down into pageable host
               memory (cudaMemcpy, which waits for the graph).
    """
    import ctypes

    import torch

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * MiB) or 50 * MiB

    def per_replay(graph, replays: int = 20) -> float:
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graph.replay()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3 / replays)
        return float(np.median(times))

    def gemv_chain(rows: int, cols: int) -> tuple[float, int, int]:
        """(seconds per product, bytes, kernels per product) of a graph of matrix-vector products over
        distinct (rows, cols) fp16 matrices."""
        count = max(8, -(-3 * l2 // (rows * cols * 2)))
        mats = [torch.full((rows, cols), 1e-3, dtype=torch.float16, device="cuda") for _ in range(count)]
        x = torch.ones(cols, dtype=torch.float16, device="cuda")
        y = torch.empty(rows, dtype=torch.float16, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: cuBLAS picks and loads its kernel
            torch.mv(mats[0], x, out=y)
        torch.cuda.current_stream().wait_stream(side)
        kernels = _kernels_per_call(torch, lambda: torch.mv(mats[-1], x, out=y))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for m in mats:
                torch.mv(m, x, out=y)
        t = per_replay(graph) / count
        graph.reset()
        mats.clear()  # (not del: the profiled lambda above closes over the name)
        torch.cuda.empty_cache()
        return t, rows * cols * 2, kernels

    # ~ a 130m-class projection (1.5 MiB) and a 1.4b-class one (in_proj, 32 MiB)
    (t_s, b_s, k_s), (t_l, b_l, k_l) = gemv_chain(1024, 768), gemv_chain(8192, 2048)
    # t = k·launch + b/bw at both sizes: two equations, two unknowns
    det = k_s * b_l - k_l * b_s
    inv_bw = (k_s * t_l - k_l * t_s) / det
    launch = max(0.0, (t_s * b_l - t_l * b_s) / det)
    gemv_bw = 1.0 / inv_bw if inv_bw > 0 else copy_bandwidth

    ids_host, ids = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32, device="cuda")
    logits = torch.zeros((1, GPU_LOGITS), dtype=torch.float32, device="cuda")
    logits_host = np.empty((1, GPU_LOGITS), np.float32)  # pageable, as the runtimes' NumPy arrays
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits.add_(1.0)
    torch.cuda.synchronize()
    rt = _cudart()
    if rt is not None:
        host_ids = ctypes.c_void_p(ids_host.data_ptr())
        dev_ids, dev_logits = ctypes.c_void_p(ids.data_ptr()), ctypes.c_void_p(logits.data_ptr())
        host_logits = ctypes.c_void_p(logits_host.ctypes.data)

        def call():
            rt.cudaMemcpy(dev_ids, host_ids, 4, 1)  # host to device
            graph.replay()
            rt.cudaMemcpy(host_logits, dev_logits, logits_host.nbytes, 2)  # device to host: waits for the graph
        how_call = "CUDA runtime copies"
    else:
        def call():
            ids.copy_(ids_host)
            graph.replay()
            logits_host[...] = logits.cpu().numpy()
        how_call = "torch copies"
    call_s = _median_seconds(call, 200)
    how = "measured: torch CUDA-graph micro-benchmark"
    return {
        "launch_s": Figure(launch, f"{how}: cuBLAS fp16 matrix-vector kernels over distinct matrices (1024x768 and "
                                   f"8192x2048, {k_s} and {k_l} kernels a product, streamed from memory at "
                                   f"{gemv_bw / 1e9:.0f} GB/s; copy {copy_bandwidth / 1e9:.0f}), per kernel beyond "
                                   "its bytes"),
        "call_s": Figure(call_s, f"{how}: ids up, one-kernel graph replay, {GPU_LOGITS} float32 logits down "
                                 f"({how_call})"),
    }


# ---- the tvm-cuda prefill's token-sequential kernels ---------------------------------------------
def sequential_shape(spec) -> dict:
    """What the token-sequential kernels of a spec's tvm-cuda prefill work on: proj (t, cols) with the
    conv channels at [lo, lo + conv), Mamba-1's dbc (t, r + 2n) and dt (t, e); y's dtype per precision."""
    e, n = spec.d_inner, spec.d_state
    s = {"arch": spec.arch, "e": e, "n": n, "conv": spec.conv_dim, "cols": spec.in_proj_dim,
         "lo": 0 if spec.arch == "mamba1" else e, "r": spec.dt_rank if spec.arch == "mamba1" else 0,
         "heads": spec.n_heads or 1, "head_dim": spec.head_dim or 1, "groups": spec.n_groups,
         "conv_bias": spec.use_conv_bias}
    per_lane = 4 if spec.arch == "mamba1" else 8  # tvm_prefill.ScanSpec.lanes on a GPU
    s["lanes"] = max(1, min(32, n // per_lane)) if n % per_lane == 0 else 1
    return s


def tvm_prefill_kernel_names(spec, precision: str) -> dict[str, str]:
    """The global symbols of a tvm-cuda library's prefill conv and scan (tvm_prefill.ConvChunkSpec.name,
    ScanSpec.name through tvm_common.c_name), derived without TVM's compiler; y is fp16 where the
    prefill's products take fp16 inputs (Mamba-1 at fp16 or int8), else float32."""
    import re

    s = sequential_shape(spec)
    bias = "_bias" if spec.use_conv_bias else ""
    conv = f"conv_chunk_{s['cols']}_c{s['lo']}-{s['lo'] + s['conv']}k{spec.d_conv}{bias}"
    dims = (f"{spec.d_inner}x{spec.d_state}r{spec.dt_rank}" if spec.arch == "mamba1"
            else f"h{spec.n_heads}p{spec.head_dim}n{spec.d_state}g{spec.n_groups}")
    lo, hi = spec.dt_limit
    lim = "" if (lo, hi) == (0.0, np.inf) else f"_lim{lo:g}-{hi:g}"
    y = "float16" if spec.arch == "mamba1" and precision in ("fp16", "int8") else "float32"
    return {name: re.sub(r"[^0-9A-Za-z_]", "_", sym)
            for name, sym in (("conv", conv), ("scan", f"scan_{spec.arch}_{dims}{lim}_{y}"), ("y", y))}


def measure_sequential_kernels(torch, shape: dict, kernels, lengths: tuple[int, int] = (64, 256),
                               y_dtype: str = "float16") -> dict[str, float]:
    """Seconds per token of a prefill layer's conv and scan, `kernels` = (conv, scan): callables
    (buffers, t) that launch them on torch's stream over the first t rows of the buffers. As a
    prefill runs them: each call's inputs written just before by another kernel (as in_proj, x_proj
    and dt_proj leave them), random values. Three launch sequences, [writes], [writes, conv],
    [writes, conv, scan], timed at two chunk lengths, interleaved, after 100 ms of warm-up (clocks
    up): the differences give each kernel, the slope the cost of a token."""
    s = shape
    e, n, heads, conv, cols = s["e"], s["n"], s["heads"], s["conv"], s["cols"]
    t_max = max(lengths)
    f32 = {"device": "cuda", "dtype": torch.float32}
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*size, scale=1.0, shift=0.0):
        return torch.randn(*size, generator=gen, **f32) * scale + shift

    # what the earlier kernels of a layer write: proj (in_proj), dbc (x_proj), dt (dt_proj); and the layer's own
    proj_in = rand(t_max, cols, scale=0.5)
    if s["arch"] == "mamba2":
        proj_in[:, e + conv:] = rand(t_max, heads, scale=0.5, shift=-2.0)  # dt before bias and softplus
    b = {"proj": torch.empty(t_max, cols, **f32), "conv_w": rand(conv, 4, scale=0.3), "conv_b": rand(conv, scale=0.1),
         "conv_state": torch.zeros(conv, 3, **f32), "ssm_state": torch.zeros(e * n, **f32),
         "y": torch.empty((t_max, e), dtype=getattr(torch, y_dtype), device="cuda")}
    written = [(b["proj"], proj_in)]
    if s["arch"] == "mamba1":
        b |= {"dbc": torch.empty(t_max, s["r"] + 2 * n, **f32), "dt": torch.empty(t_max, e, **f32),
              "dt_bias": rand(e, scale=0.5, shift=-4.0), "A": -torch.arange(1, n + 1, **f32).repeat(e),
              "D": torch.ones(e, **f32)}
        written += [(b["dbc"], rand(t_max, s["r"] + 2 * n, scale=0.5)), (b["dt"], rand(t_max, e, scale=0.5))]
    else:
        b |= {"dt_bias": rand(heads, scale=0.5, shift=-2.0), "A": -torch.linspace(1, 16, heads, **f32),
              "D": torch.ones(heads, **f32)}

    def run(t: int, depth: int) -> None:  # depth 0: the writes; 1: + conv; 2: + scan
        for dst, src in written:
            torch.mul(src[:t], 1.0, out=dst[:t])  # an elementwise kernel writes the inputs, as a matmul would
        for kernel in kernels[:depth]:
            kernel(b, t)

    def timed(t: int, depth: int, repeats: int = 10) -> float:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            run(t, depth)
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3 / repeats

    warm = time.perf_counter()
    while time.perf_counter() - warm < 0.1:
        run(t_max, 2)
        torch.cuda.synchronize()
    samples = {(t, d): [] for t in lengths for d in range(3)}
    for _ in range(7):
        for t in lengths:
            for d in range(3):
                samples[t, d].append(timed(t, d))
    med = {k: float(np.median(v)) for k, v in samples.items()}
    t1, t2 = sorted(lengths)

    def slope(d):
        return ((med[t2, d] - med[t2, d - 1]) - (med[t1, d] - med[t1, d - 1])) / (t2 - t1)

    return {"conv": slope(1), "scan": slope(2)}


def tvm_sequential_kernels(lib, names: dict, shape: dict, tvm_ffi):
    """A tvm-cuda library's own prefill conv and scan (its compiled functions, found by name among
    the library's imports) as `measure_sequential_kernels` callables, with its buffers' layouts."""
    try:
        conv_fn = lib.get_function(names["conv"], query_imports=True)
        scan_fn = lib.get_function(names["scan"], query_imports=True)
    except Exception:  # tvm_ffi raises or returns None for a missing symbol, by version
        conv_fn = scan_fn = None
    if conv_fn is None or scan_fn is None:
        # Libraries built since issue 7's parallel prefill (conv_out, scan_states/scan_pieces) have no
        # token-walking GPU kernels: scan_step_s (a per-token cost) does not describe them.
        raise EdgeMambaError(f"--tvm-library: the library has no token-sequential prefill kernels ({names['conv']}, "
                             f"{names['scan']}): it scans in parallel time pieces, which scan_step_s does not model; "
                             "probe without --tvm-library (the profile's default stands)")
    e, n = shape["e"], shape["n"]
    state = (1, e, n) if shape["arch"] == "mamba1" else (1, shape["heads"], shape["head_dim"], n)
    cache = {}

    def args(b, t, which):
        if (which, t) not in cache:  # converted once per length: the timed loop pays only the call
            if which == "conv":
                ts = [b["proj"][:t], b["conv_w"], *([b["conv_b"]] if shape["conv_bias"] else []),
                      b["conv_state"].view(1, *b["conv_state"].shape)]
            elif shape["arch"] == "mamba1":
                ts = [b["proj"][:t], b["dbc"][:t], b["dt"][:t], b["dt_bias"], b["A"].view(e, n), b["D"],
                      b["ssm_state"].view(state), b["y"][:t]]
            else:
                ts = [b["proj"][:t], b["dt_bias"], b["A"], b["D"], b["ssm_state"].view(state), b["y"][:t]]
            cache[which, t] = [tvm_ffi.from_dlpack(x) for x in ts]
        return cache[which, t]

    return (lambda b, t: conv_fn(*args(b, t, "conv")), lambda b, t: scan_fn(*args(b, t, "scan")))


def tvm_cuda_artifact(path):
    """The artifact `--tvm-library` names, refused unless it is tvm-cuda and torch sees a GPU."""
    from edgemamba.artifact import load_artifact

    art = load_artifact(path, verify=False)
    if art.target != "tvm-cuda":
        raise EdgeMambaError(f"--tvm-library needs a tvm-cuda artifact; {path} is {art.target}")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        raise EdgeMambaError("--tvm-library needs a CUDA GPU, and torch sees none here")
    return art


def measure_scan_step(torch, art) -> Figure:
    """tvm-cuda's scan_step_s: seconds per token and layer of the prefill's token-sequential kernels,
    the conv and the scan of a tvm-cuda artifact's library (weights not needed), timed alone
    (`measure_sequential_kernels`) at its own layer shape."""
    import tvm_ffi

    from edgemamba.runtimes.tvm import load_library

    shape, names = sequential_shape(art.spec), tvm_prefill_kernel_names(art.spec, art.precision)
    lib = load_library(art)
    with tvm_ffi.use_torch_stream():
        per = measure_sequential_kernels(torch, shape, tvm_sequential_kernels(lib, names, shape, tvm_ffi),
                                         y_dtype=names["y"])
    return Figure(per["conv"] + per["scan"],
                  f"measured: the tvm-cuda library {art.path.name}'s own prefill conv and scan kernels alone "
                  f"({art.spec.arch}, d_inner {shape['e']}, d_state {shape['n']}), inputs freshly written, chunks "
                  f"of 64 and 256 tokens: conv {per['conv'] * 1e9:.0f} ns + scan {per['scan'] * 1e9:.0f} ns a token")


def probe(*, gpu: bool = True, threads: int | None = None, costs: bool = True, tvm_library=None) -> DeviceProfile:
    """This machine; `costs`: also measure the CPU engines' (native, ONNX Runtime; at `threads` threads,
    default the physical cores) and the GPU's own costs here (some seconds); `tvm_library`: a tvm-cuda
    artifact built for this GPU whose prefill conv and scan give tvm-cuda's scan_step_s (without one,
    the profile's default stands)."""
    library = None if tvm_library is None else tvm_cuda_artifact(tvm_library)  # refused before any measuring
    cpu = probe_cpu(threads)
    measured = {"ort-cpu/ort": measure_ort_costs(cpu.bandwidth.value, bandwidth_test_bytes(), threads)} if costs else {}
    if costs:
        from edgemamba.devices.probe_native import probe_native_costs

        measured.update(probe_native_costs(cpu, threads or physical_cores()))
    gpu_proc = probe_gpu() if gpu else None
    if gpu_proc is not None and costs:
        import torch

        gpu_costs = measure_gpu_costs(gpu_proc.bandwidth.value)
        measured["tensorrt"] = dict(gpu_costs)  # its selective scan is one fused kernel: no scan step
        scan = {"scan_step_s": measure_scan_step(torch, library)} if library is not None else {}
        measured["tvm-cuda"] = {**gpu_costs, **scan}
    cpu_targets = ("ort-cpu", "tvm-aarch64" if platform.machine() in ("aarch64", "arm64") else "tvm-llvm")
    targets = (("tensorrt", "tvm-cuda") if gpu_proc else ()) + cpu_targets
    return DeviceProfile(
        name=PROBE_NAME, title=f"this machine ({platform.node() or 'unnamed'})", cpu=cpu, gpu=gpu_proc,
        targets=targets, precisions=("fp16", "int8", "w8a8", "int4", "fp32") if gpu_proc else
        ("fp32", "int8", "w8a8", "int4", "fp16"),
        notes=f"probed {time.strftime('%Y-%m-%d %H:%M:%S')}; shared machines measure lower under load",
        measured_costs=measured,
    )
