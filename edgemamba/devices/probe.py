"""Describe the machine this runs on as a DeviceProfile, with quick measurements.

Memory bandwidth is measured as a float32 matrix-vector product over a matrix four times the
last-level cache (the access pattern of a decode step: every weight read once) with NumPy's BLAS, and the
fp32 rate as a prefill-shaped matrix product with ONNX Runtime's MLAS (the CPU runtime edgemamba
ships; NumPy's BLAS build may lack the CPU's widest vectors), both on all threads. A CUDA GPU is
described and measured through torch when torch sees one. Measured figures are achievable rates,
so their efficiencies are 1.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from edgemamba.devices.profiles import GiB, MiB, DeviceProfile, Figure, Processor, est

PROBE_NAME = "this"


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pools
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


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
    return w.nbytes / _best_seconds(lambda: w @ x, repeats)


def measure_fp32_flops(m: int = 256, n: int = 2048, repeats: int = 5, threads: int | None = None) -> float:
    """Ops/s of an ONNX Runtime float32 MatMul (m, n) · (n, n): one prefill chunk's projection."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((n, n), 1e-3, np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or _physical_cores()
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.ones((m, n), np.float32)
    return 2.0 * m * n * n / _best_seconds(lambda: sess.run(None, {"x": x}), repeats)


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


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def probe_cpu(threads: int | None = None) -> Processor:
    """`threads`: ONNX Runtime threads for the fp32 rate (default: all physical cores); NumPy's
    BLAS threads are set by its environment (OPENBLAS_NUM_THREADS) before it loads."""
    import psutil

    vm = psutil.virtual_memory()
    bandwidth_bytes = bandwidth_test_bytes()
    bandwidth = measure_read_bandwidth(bandwidth_bytes)
    fp32 = measure_fp32_flops(threads=threads)
    flags = _cpu_flags()
    peak = {"fp32": Figure(fp32, "measured: ONNX Runtime float32 MatMul 256×2048 · 2048×2048, best of 5")}
    if flags & {"avx512_vnni", "avx_vnni", "asimddp"}:
        peak["int8"] = est(4 * fp32, "4× the measured fp32 rate (int8 dot-product instructions present)")
    if flags & {"avx512_fp16", "asimdhp"}:
        peak["fp16"] = est(2 * fp32, "2× the measured fp32 rate (fp16 arithmetic present)")
    memory = Figure(float(vm.total), "measured: psutil total memory")
    return Processor(
        kind="cpu", name=f"{_cpu_model()} ({platform.machine()})", cores=_physical_cores(), memory=memory,
        usable_memory=Figure(float(vm.available), "measured: psutil available memory now"),
        bandwidth=Figure(bandwidth, f"measured: NumPy float32 matrix-vector product over {bandwidth_bytes // MiB} "
                                    "MiB, best of 5"),
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
    del buf, dst
    n = 8192
    a = torch.ones((n, n), dtype=torch.float16, device="cuda")
    fp16 = 2.0 * n**3 / timed(lambda: a @ a)
    a = a.float()
    fp32 = 2.0 * n**3 / timed(lambda: a @ a)
    del a
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


def probe(*, gpu: bool = True, threads: int | None = None) -> DeviceProfile:
    cpu = probe_cpu(threads)
    gpu_proc = probe_gpu() if gpu else None
    cpu_targets = ("ort-cpu", "tvm-aarch64" if platform.machine() in ("aarch64", "arm64") else "tvm-llvm")
    targets = (("tensorrt", "tvm-cuda") if gpu_proc else ()) + cpu_targets
    return DeviceProfile(
        name=PROBE_NAME, title=f"this machine ({platform.node() or 'unnamed'})", cpu=cpu, gpu=gpu_proc,
        targets=targets, precisions=("fp16", "int8", "w8a8", "int4", "fp32") if gpu_proc else
        ("fp32", "int8", "w8a8", "int4", "fp16"),
        notes=f"probed {time.strftime('%Y-%m-%d %H:%M:%S')}; shared machines measure lower under load",
    )
