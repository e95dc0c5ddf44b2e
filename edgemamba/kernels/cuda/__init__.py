"""The CUDA kernels (mamba_kernels.cu) as a shared library: build it with nvcc, call it through ctypes.

    path = build_library(out_dir, arch="sm_90")      # or "sm_87" (Jetson Orin), "sm_89", ...
    lib = KernelLibrary(path)
    lib.selective_state_update(state_in, state_out, x, dt, A, B, C, D, z, dt_bias, y, ...)

Tensors are passed as device pointers (int; 0 for an absent optional input) with their sizes and
dtypes; `stream` is a cudaStream_t as an int (0: the default stream). The TensorRT plugins and the
GPU tests drive the kernels through this one class.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from edgemamba.errors import EdgeMambaError

SOURCE = Path(__file__).with_name("mamba_kernels.cu")
HEADER = Path(__file__).with_name("mamba_kernels.h")
ABI_VERSION = 1  # EM_ABI_VERSION in the header

# em_dtype codes of the header
DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}


def dtype_code(dtype) -> int:
    try:
        return DTYPE_CODES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise EdgeMambaError(f"CUDA kernels take float32 or float16 tensors, got {dtype}") from None


def nvcc_command(arch: str, out: Path, nvcc: str = "nvcc") -> list[str]:
    """The one nvcc invocation: a position-independent shared library with cudart linked statically,
    so it loads beside any CUDA runtime (torch's, cupy's, TensorRT's) and in CUDA-graph capture."""
    return [nvcc, "-O3", "-std=c++17", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
            "-o", str(out), str(SOURCE)]


def build_library(out_dir: Path, arch: str = "sm_90", nvcc: str | None = None) -> Path:
    """Compile the kernels for one GPU architecture into out_dir/libedgemamba_kernels_<arch>.so."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise EdgeMambaError("nvcc not found on PATH: the CUDA kernels need the CUDA toolkit to build")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"libedgemamba_kernels_{arch}.so"
    proc = subprocess.run(nvcc_command(arch, out, nvcc), capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgeMambaError(f"nvcc failed building {SOURCE.name} for {arch}: {proc.stderr.strip()[-2000:]}")
    return out


_i64, _int, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class KernelLibrary:
    """ctypes bindings of the C ABI in mamba_kernels.h. Errors raise RuntimeError with the kernel's message."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            raise EdgeMambaError(f"cannot load the CUDA kernel library {self.path}: {e}") from None
        lib = self._lib
        lib.em_abi_version.restype = _int
        lib.em_error_string.restype = ctypes.c_char_p
        lib.em_error_string.argtypes = [_int]
        if lib.em_abi_version() != ABI_VERSION:
            raise EdgeMambaError(f"{self.path} has kernel ABI {lib.em_abi_version()}, expected {ABI_VERSION}: rebuild it")
        ssm_ptrs = [_ptr] * 11  # state_in, state_out, x, dt, A, B, C, D, z, dt_bias, y
        ssm_attrs = [_int, _int, _f32, _f32, _int, _int, _ptr]  # a_per_state .. stream
        lib.em_selective_scan.argtypes = ssm_ptrs + [_i64] * 6 + ssm_attrs
        lib.em_selective_state_update.argtypes = ssm_ptrs + [_i64] * 5 + ssm_attrs
        lib.em_causal_conv1d_step.argtypes = [_ptr] * 6 + [_i64] * 3 + [_int] * 3 + [_ptr]
        for fn in (lib.em_selective_scan, lib.em_selective_state_update, lib.em_causal_conv1d_step):
            fn.restype = _int

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what}: {self._lib.em_error_string(code).decode()} (code {code})")

    def selective_scan(self, state_in, state_out, x, dt, A, B, C, D, z, dt_bias, y, *, batch, seqlen, n_heads,
                       head_dim, n_groups, d_state, a_per_state, act_dtype, weight_dtype, dt_softplus=True,
                       dt_min=0.0, dt_max=float("inf"), stream=0):
        """Pointers as ints; see mamba_kernels.h for layouts. seqlen = 1 is the decode step."""
        code = self._lib.em_selective_scan(
            state_in, state_out, x, dt, A, B, C, D or None, z or None, dt_bias or None, y,
            batch, seqlen, n_heads, head_dim, n_groups, d_state, int(a_per_state), int(dt_softplus), dt_min, dt_max,
            dtype_code(act_dtype), dtype_code(weight_dtype), stream or None)
        self._check(code, "em_selective_scan")

    def selective_state_update(self, state_in, state_out, x, dt, A, B, C, D, z, dt_bias, y, *, batch, n_heads,
                               head_dim, n_groups, d_state, a_per_state, act_dtype, weight_dtype, dt_softplus=True,
                               dt_min=0.0, dt_max=float("inf"), stream=0):
        code = self._lib.em_selective_state_update(
            state_in, state_out, x, dt, A, B, C, D or None, z or None, dt_bias or None, y,
            batch, n_heads, head_dim, n_groups, d_state, int(a_per_state), int(dt_softplus), dt_min, dt_max,
            dtype_code(act_dtype), dtype_code(weight_dtype), stream or None)
        self._check(code, "em_selective_state_update")

    def causal_conv1d_step(self, x, conv_state_in, conv_state_out, weight, bias, y, *, batch, channels, width,
                           silu, act_dtype, weight_dtype, stream=0):
        code = self._lib.em_causal_conv1d_step(
            x, conv_state_in, conv_state_out, weight, bias or None, y, batch, channels, width, int(silu),
            dtype_code(act_dtype), dtype_code(weight_dtype), stream or None)
        self._check(code, "em_causal_conv1d_step")
