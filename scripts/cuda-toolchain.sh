#!/usr/bin/env bash
# Assembles a CUDA 13.0 *build* toolchain (nvcc, headers, link-time libraries) from PyPI wheels, for building
# `--features cuda` on a machine without a GPU or driver. CUDA 13.0 exactly: the GPU machines' driver (580) runs
# PTX from nvcc 13.0 and has the .so.13 libraries that candle links by soname.
# usage: scripts/cuda-toolchain.sh [PREFIX]      (default: target/cuda-13.0, inside the ignored target/ folder)
# Result: PREFIX/{bin/nvcc, include, lib, lib64 -> lib, nvvm, lib/stubs/libcuda.so}. Re-running only re-creates
# the symlinks and the stub. Needs python3 with pip, gcc and network access to PyPI (≈1.3 GB, ≈30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${1:-$PWD/target/cuda-13.0}"
WHEELS="${PREFIX}.wheels"          # pip --target folder (a real directory)
C="$WHEELS/nvidia/cu13"

if [ ! -x "$C/bin/nvcc" ]; then
  # one pip call: pip --target does not merge a second install into an existing nvidia/ folder
  python3 -m pip install --quiet --no-deps --target "$WHEELS" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi

# unversioned names for the linker (the wheels ship only the versioned sonames)
cd "$C/lib"
for f in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13; do
  ln -sf "$f" "${f%%.so.*}.so"
done
ln -sfn lib "$C/lib64"

# libcuda.so comes with the driver, not with a wheel: link against a stub carrying only the driver API's symbol
# names (SONAME libcuda.so.1); the GPU machine's real one is loaded at run time
mkdir -p "$C/lib/stubs"
{
  gcc -E -I"$C/include" "$C/include/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | sed 's/[[:space:](]//g'
  # names cudarc may reference, if its source is in the cargo registry
  cat "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null \
    | grep -oE 'pub unsafe fn cu[A-Z][A-Za-z0-9_]*' | awk '{print $4}' || true
} | sort -u | awk '{print "void " $1 "(void) {}"}' > "$C/lib/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$C/lib/stubs/libcuda.so" "$C/lib/stubs/libcuda_stub.c"

ln -sfn "$C" "$PREFIX"
"$PREFIX/bin/nvcc" --version | tail -2
echo "CUDA 13.0 build toolchain ready at $PREFIX"
