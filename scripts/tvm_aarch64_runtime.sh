#!/bin/sh
# TVM's runtime for aarch64 Linux, for the tvm-aarch64 test under qemu-user and for devices:
# libtvm_runtime.so and libtvm_ffi.so taken from the aarch64 manylinux wheels on PyPI (about 100 MB
# downloaded, 5.3 MB kept). Usage: scripts/tvm_aarch64_runtime.sh DIR; then
#   export EDGEMAMBA_TVM_AARCH64_RUNTIME=DIR
set -eu
dir=${1:?usage: tvm_aarch64_runtime.sh DIR}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version 3.11 --implementation cp -d "$tmp" apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.15.post2
mkdir -p "$dir"
unzip -q -o -j "$tmp"/apache_tvm-*.whl 'tvm/lib/libtvm_runtime.so' -d "$dir"
unzip -q -o -j "$tmp"/apache_tvm_ffi-*.whl 'tvm_ffi/lib/libtvm_ffi.so' -d "$dir"
ls -l "$dir"
