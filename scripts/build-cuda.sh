#!/usr/bin/env bash
# Builds sdtune with `--features cuda` on this machine (no GPU needed) and packs what the GPU machine needs into
# target/gpu/: sdtune.xz (the stripped binary), ops-bench.xz (benches/ops.rs) and wheels/ (diffusers, for the PyTorch side of the benchmark).
# usage: scripts/build-cuda.sh          then, on the GPU machine: bash scripts/gpu-check.sh
# A first build takes ≈15 min on 2 cores (candle's CUDA kernels are compiled with nvcc; cached in target/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${CUDA_PREFIX:-$PWD/target/cuda-13.0}"
[ -x "$PREFIX/bin/nvcc" ] && [ -e "$PREFIX/lib/stubs/libcuda.so" ] || bash scripts/cuda-toolchain.sh "$PREFIX"
export CUDA_ROOT="$PREFIX" CUDA_PATH="$PREFIX" CUDA_HOME="$PREFIX" PATH="$PREFIX/bin:$PATH"
export CUDA_COMPUTE_CAP=90         # H100/H200 (no nvidia-smi here to ask)
export CUDARC_CUDA_VERSION=13000   # the driver API of the GPU machines
export LIBRARY_PATH="$PREFIX/lib/stubs:$PREFIX/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
cargo build --release --features cuda --target-dir target/cuda --bin sdtune
# the ops bench (convolution and attention alone, candle vs sdtune) for the GPU check
ops=$(cargo bench --no-run --features cuda --target-dir target/cuda --bench ops 2>&1 | tee /dev/stderr \
  | sed -n 's/.*Executable benches\/ops.rs (\(.*\))/\1/p')
mkdir -p target/gpu/wheels
strip -o target/gpu/sdtune target/cuda/release/sdtune
strip -o target/gpu/ops-bench "$ops"
xz -6 -T0 -f target/gpu/sdtune target/gpu/ops-bench
ls target/gpu/wheels/diffusers-*.whl >/dev/null 2>&1 || python3 -m pip download --quiet --no-deps diffusers -d target/gpu/wheels
ls -la target/gpu target/gpu/wheels
echo "carry target/gpu (and run scripts/gpu-check.sh there)"
