#!/usr/bin/env bash
# The GPU machine's one check (no Rust, no network there): GPU parity on the tiny fixtures and sdtune's own kernels
# against their CPU code (ops bench `check`; a failure turns them off, SDTUNE_FUSED=off, for the rest), then sdtune
# against PyTorch on the same card and the same random SD 1.5-size weights (LoRA step, UNet forward, 20-step sampling);
# prints a table last. Carry target/gpu (built here by scripts/build-cuda.sh). Finishes in under 8 minutes: every
# stage's time limit is cut to what is left of 7 minutes, so the table prints in time.
# usage (on the GPU machine, from the repository root): bash scripts/gpu-check.sh
set -u
cd "$(dirname "$0")/.."
# results gather in R; $OUT (the device tool's folder, at most 8 files come back) gets the log and one archive
R=/tmp/gpu-check
mkdir -p "$R"
exec > >(tee -a "$R/gpu-check.log") 2>&1
echo "=== $(date -u +%FT%TZ) $(uname -srm)"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || echo "nvidia-smi failed"

# the CUDA 13 libraries: the torch install's wheels, the driver's folder, the system's
LIBDIRS=""
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  found=""
  for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/*/lib \
           /usr/local/nvidia/lib64 /usr/local/cuda*/lib64 /usr/lib/x86_64-linux-gnu; do
    [ -e "$d/$lib" ] && { found="$d"; break; }
  done
  [ -z "$found" ] && found="$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1==l {print $NF; exit}' | xargs -r dirname)"
  echo "  $lib: ${found:-MISSING}"
  [ -n "$found" ] && case ":$LIBDIRS:" in *":$found:"*) ;; *) LIBDIRS="$LIBDIRS:$found";; esac
done
export LD_LIBRARY_PATH="${LIBDIRS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
PY=python3
[ -x /opt/torch/.venv/bin/python3 ] && PY=/opt/torch/.venv/bin/python3

BIN=/tmp/sdtune-cuda
xz -dc target/gpu/sdtune.xz > "$BIN" && chmod +x "$BIN" || { echo "target/gpu/sdtune.xz missing: run scripts/build-cuda.sh first"; exit 2; }
ldd "$BIN" | grep -E 'not found' && echo "DIAGNOSTIC: a library above is missing"
$PY -m pip install --quiet --no-index --no-deps --target /tmp/site target/gpu/wheels/*.whl || echo "diffusers wheel not installed"

nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits > "$R/mem-idle.txt" 2>/dev/null
sample_memory() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$R/$1" 2>/dev/null & echo $!; }

# seconds for a stage: at most $1, and never past 7 minutes from the start
left() { local l=$((420 - SECONDS - 10)); [ "$l" -lt "$1" ] && echo $((l > 1 ? l : 1)) || echo "$1"; }

echo "=== 1. parity on the GPU: the tiny fixtures' goldens, bf16 vs f32, LoRA steps vs the CPU; sdtune's kernels vs their CPU code"
timeout "$(left 150)" "$BIN" run benches/gpu/parity.rhai cuda
echo $? > "$R/parity.rc"
OPS=/tmp/ops-bench
xz -dc target/gpu/ops-bench.xz > "$OPS" 2>/dev/null && chmod +x "$OPS" || { echo "target/gpu/ops-bench.xz missing"; OPS=false; }
timeout "$(left 60)" "$OPS" cuda f32 check | tee "$R/kernels.md"
echo "${PIPESTATUS[0]}" > "$R/kernels.rc"
if [ "$(cat "$R/kernels.rc")" != 0 ]; then
  # numbers from kernels that disagree with their CPU code would mean nothing
  export SDTUNE_FUSED=off
  echo "SDTUNE_FUSED=off (the kernel check failed)" > "$R/sdtune-fallback.txt"
fi

echo "=== 2. PyTorch (and the shared random SD 1.5-size model)"
m=$(sample_memory mem-torch.txt)
timeout "$(left 200)" $PY benches/gpu/torch_bench.py /tmp/sd15-random --steps 10 | tee "$R/torch.jsonl"
kill "$m" 2>/dev/null

echo "=== 3. sdtune"
m=$(sample_memory mem-sdtune.txt)
timeout "$(left 150)" "$BIN" run benches/gpu/step.rhai /tmp/sd15-random cuda bf16 5 | tee "$R/sdtune.jsonl"
rc=${PIPESTATUS[0]}
echo "sdtune exit code $rc"
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "${SDTUNE_FUSED:-on}" != off ]; then
  echo "=== 3b. sdtune failed: again with SDTUNE_FUSED=off (composed candle ops instead of sdtune's optimizer kernels)"
  SDTUNE_FUSED=off timeout "$(left 150)" "$BIN" run benches/gpu/step.rhai /tmp/sd15-random cuda bf16 5 | tee "$R/sdtune.jsonl"
  echo "SDTUNE_FUSED=off (the default run failed with exit code $rc)" > "$R/sdtune-fallback.txt"
fi
kill "$m" 2>/dev/null

echo "=== 4. convolution and attention alone at SD 1.5's shapes, bf16: candle, sdtune (benches/ops.rs), PyTorch"
timeout "$(left 90)" "$OPS" cuda bf16 sd15 | tee "$R/ops-sdtune.md"
timeout "$(left 60)" $PY benches/ops_reference.py cuda bf16 sd15 | tee "$R/ops-torch.md"

echo "=== 5. sdtune with candle's convolution (the column before sdtune's own)"
SDTUNE_CONV=candle timeout "$(left 120)" "$BIN" run benches/gpu/step.rhai /tmp/sd15-random cuda bf16 3 | tee "$R/sdtune-candle-conv.jsonl"

echo "=== 6. sdtune with the optimizer as composed candle ops (SDTUNE_FUSED=off), if time is left"
SDTUNE_FUSED=off timeout "$(left 120)" "$BIN" run benches/gpu/step.rhai /tmp/sd15-random cuda bf16 3 | tee "$R/sdtune-unfused.jsonl"

echo "=== 7. sdtune with gradient_checkpointing (its peak memory), if time is left"
m=$(sample_memory mem-sdtune-checkpointing.txt)
timeout "$(left 90)" "$BIN" run benches/gpu/step.rhai /tmp/sd15-random cuda bf16 3 checkpointing | tee "$R/sdtune-checkpointing.jsonl"
kill "$m" 2>/dev/null

$PY benches/gpu/table.py "$R"
echo; cat "$R/ops-sdtune.md" "$R/ops-torch.md" 2>/dev/null; tail -1 "$R/kernels.md" 2>/dev/null
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu-check.tgz" -C "$R" . && cp "$R/gpu-check.log" "$OUT/" && echo "results: \$OUT/gpu-check.tgz"
fi
