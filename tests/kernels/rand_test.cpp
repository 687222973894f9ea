// src/kernels/rand.cu under the CPU emulation of CUDA (emulation.h) against SplitMix64 drawn one after another, as
// src/rng.rs draws it: every mask element must be exactly `keep` where the stream's draw i is ≥ p, else 0. Several
// states (one wrapping past 2^64), a grid smaller than the mask, f32, bf16 and f16. Exit status 1 on any mismatch.
// Built and run by tests/suite/cuda_emulated.rs.
#define SDTUNE_EMULATION
#include "emulation.h"
#include "../../src/kernels/rand.cu"

#include <cstdint>
#include <cstdio>

// src/rng.rs's Rng: state += γ, then SplitMix64's mix; the top 53 bits as a uniform in (0, 1)
struct Stream {
  uint64_t state;
  double uniform() {
    state += 0x9E3779B97F4A7C15ull;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((double)(z >> 11) + 0.5) / 9007199254740992.0;
  }
};

static float f(float x) { return x; }
static float f(__nv_bfloat16 x) { return __bfloat162float(x); }
static float f(__half x) { return __half2float(x); }

template <typename T>
static bool run(const char* dtype, uint64_t state, double p, float keep) {
  const size_t n = 1000;
  std::vector<T> out(n);
  emu_launch({3, 1, 1}, 256, 0, [&] {  // 768 threads for 1000 elements: the grid-stride loop goes round
    if constexpr (std::is_same<T, float>::value) {
      keep_mask_f32(out.data(), n, state, p, keep);
    } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      keep_mask_bf16(out.data(), n, state, p, keep);
    } else {
      keep_mask_f16(out.data(), n, state, p, keep);
    }
  });
  Stream s{state};
  T kept_value;
  put(&kept_value, 0, keep);
  size_t bad = 0, kept = 0;
  for (size_t i = 0; i < n; i++) {
    const bool k = s.uniform() >= p;
    kept += k;
    bad += f(out[i]) != (k ? f(kept_value) : 0.0f);
  }
  const bool ok = bad == 0 && kept > 0 && kept < n;
  std::printf("keep_mask %s state %016llx p %.2f: %zu of %zu kept, %zu wrong%s\n", dtype, (unsigned long long)state,
              p, kept, n, bad, ok ? "" : "  FAIL");
  return ok;
}

int main() {
  bool ok = true;
  // SplitMix64's published first output for seed 0
  Stream zero{0};
  zero.uniform();
  ok &= zero.state == 0x9E3779B97F4A7C15ull;
  uint64_t z = zero.state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  ok &= z == 0xE220A8397B1DCDAFull;
  std::printf("SplitMix64, seed 0: first output %016llx (published: e220a8397b1dcdaf)%s\n", (unsigned long long)z,
              ok ? "" : "  FAIL");
  for (uint64_t state : {0ull, 42ull ^ 0x5EEDull, 0xFFFFFFFFFFFFFF00ull}) {
    ok &= run<float>("f32", state, 0.5, 2.0f);
    ok &= run<__nv_bfloat16>("bf16", state, 0.1, 1.0f / 0.9f);
    ok &= run<__half>("f16", state, 0.25, 1.0f);
  }
  std::printf(ok ? "keep_mask kernel: all cases match\n" : "keep_mask kernel: MISMATCH\n");
  return ok ? 0 : 1;
}
