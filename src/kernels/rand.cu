// Dropout masks from sdtune's random stream (src/rng.rs, the reference): SplitMix64's state after i draws is
// state + i·γ, so draw i of a reserved stretch is computed by its own thread, and the mask is the same as the CPU's.
// out[i] = keep where uniform i ≥ p, else 0. nn/fused/rand.rs launches it.
#include "common.cuh"

__device__ __forceinline__ double uniform_at(unsigned long long state, size_t i) {
  unsigned long long z = state + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return ((double)(z >> 11) + 0.5) / 9007199254740992.0;  // / 2^53
}

template <typename T>
__device__ void keep_mask(T* out, size_t n, unsigned long long state, double p, float keep) {
  FOR_EACH(i, n) put(out, i, uniform_at(state, i) >= p ? keep : 0.0f);
}

#define KERNELS(T, NAME)                                                                                     \
  extern "C" __global__ void keep_mask_##NAME(T* out, size_t n, unsigned long long state, double p,          \
                                              float keep) {                                                \
    keep_mask(out, n, state, p, keep);                                                                       \
  }

KERNELS(float, f32)
KERNELS(__nv_bfloat16, bf16)
KERNELS(__half, f16)
