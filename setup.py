"""Builds edgemamba's native CPU engine (edgemamba/kernels/cpu/emcpu.cc) with the package.

It is a plain C library loaded with ctypes (edgemamba/runtimes/native.py), built through setuptools'
extension machinery so `pip install` compiles it on the machine that runs it. The build is optional:
without a C++ compiler the package installs and the ort-cpu target runs on ONNX Runtime alone.
"""

import platform

from setuptools import Extension, setup

FLAGS = ["-O3", "-std=c++17", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # x86-64-v3 (AVX2, FMA, F16C: every x86 CPU since 2015); native.py checks the CPU before loading.
    FLAGS += ["-mavx2", "-mfma", "-mf16c"]

setup(
    ext_modules=[
        Extension(
            "edgemamba.kernels.cpu.libemcpu",
            sources=["edgemamba/kernels/cpu/emcpu.cc"],
            depends=["edgemamba/kernels/cpu/emcpu.h"],
            extra_compile_args=FLAGS,
            extra_link_args=["-pthread"],
            language="c++",
            optional=True,
        )
    ]
)
