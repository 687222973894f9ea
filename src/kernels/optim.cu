// sdtune's fused elementwise kernels (src/nn/fused.rs launches them; its CPU code is their reference): in-place
// updates that would otherwise take a dozen candle ops (a launch and an allocation each) per tensor.
// All arithmetic in f32; tensors are f32, bf16 or f16, contiguous; grid-stride loops over n elements.
#include "common.cuh"

// s ← β·s + (1 − β)·x, x = scale·g (square = 0) or (scale·g)² (square = 1): Adam's moments. 1 − β comes rounded
// from double (as torch's scalar arguments): 1 − (float)0.999 would be off by 5e-5.
template <typename T>
__device__ void ema(T* s, const T* g, size_t n, float beta, float one_minus_beta, float scale, int square) {
  FOR_EACH(i, n) {
    float x = scale * get(g, i);
    if (square) x = x * x;
    put(s, i, beta * get(s, i) + one_minus_beta * x);
  }
}

// AdamW's decoupled update from the new moments: w ← w·decay − step·m / (√v / sqrt_bc2 + eps)
template <typename T>
__device__ void adamw(T* w, const T* m, const T* v, size_t n, float decay, float step, float sqrt_bc2, float eps) {
  FOR_EACH(i, n) {
    float denom = sqrtf(get(v, i)) / sqrt_bc2 + eps;
    put(w, i, get(w, i) * decay - step * (get(m, i) / denom));
  }
}

// acc[0] += Σ g²: one atomicAdd per block
template <typename T>
__device__ void sum_squares(float* acc, const T* g, size_t n) {
  float s = 0.0f;
  FOR_EACH(i, n) {
    const float x = get(g, i);
    s += x * x;
  }
  s = block_reduce(s, Sum());
  if (threadIdx.x == 0) atomicAdd(acc, s);
}

#define KERNELS(T, NAME)                                                                                          \
  extern "C" __global__ void ema_##NAME(T* s, const T* g, size_t n, float beta, float one_minus_beta, float scale, \
                                        int square) {                                                             \
    ema(s, g, n, beta, one_minus_beta, scale, square);                                                            \
  }                                                                                                               \
  extern "C" __global__ void adamw_##NAME(T* w, const T* m, const T* v, size_t n, float decay, float step,       \
                                          float sqrt_bc2, float eps) {                                            \
    adamw(w, m, v, n, decay, step, sqrt_bc2, eps);                                                                \
  }                                                                                                               \
  extern "C" __global__ void sum_squares_##NAME(float* acc, const T* g, size_t n) { sum_squares(acc, g, n); }

KERNELS(float, f32)
KERNELS(__nv_bfloat16, bf16)
KERNELS(__half, f16)
