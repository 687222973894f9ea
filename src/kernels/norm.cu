// GroupNorm / LayerNorm (+ SiLU) and its backward pass, one block per normalised row (src/nn/fused/norm.rs
// launches them; its CPU code is their reference). Row r of x's (rows, len) view is normalised over its len
// elements; element i of row r has affine channel c = (r % groups)·(len / hw) + i / hw (GroupNorm: hw = H·W;
// LayerNorm: groups = hw = 1). wb is f32 [2, channels]: weight, then bias. Statistics and arithmetic in f32.
#include "common.cuh"

// the row's mean and 1/√(var + eps), two passes
template <typename T>
__device__ void stats(const T* x, size_t len, float eps, float& mean, float& rstd) {
  float s = 0.0f;
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) s += get(x, i);
  mean = block_reduce(s, Sum()) / (float)len;
  float q = 0.0f;
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float d = get(x, i) - mean;
    q += d * d;
  }
  rstd = 1.0f / sqrtf(block_reduce(q, Sum()) / (float)len + eps);
}

__device__ __forceinline__ float sigmoid(float y) { return 1.0f / (1.0f + expf(-y)); }

template <typename T>
__device__ void norm_fwd(const T* x, const float* wb, T* y, size_t len, size_t hw, size_t groups, size_t channels,
                         float eps, int silu) {
  const size_t r = blockIdx.x;
  x += r * len;
  y += r * len;
  float mean, rstd;
  stats(x, len, eps, mean, rstd);
  const size_t c0 = (r % groups) * (len / hw);
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
    const size_t c = c0 + i / hw;
    float v = (get(x, i) - mean) * rstd * wb[c] + wb[channels + c];
    if (silu) v = v * sigmoid(v);
    put(y, i, v);
  }
}

// gx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))·rstd with ĝ = gy'·w and gy' = gy (or gy·silu'(y) with y = x̂·w + b)
template <typename T>
__device__ __forceinline__ float ghat(const T* x, const float* wb, const T* gy, size_t i, size_t c, size_t channels,
                                      float mean, float rstd, int silu, float& xhat) {
  xhat = (get(x, i) - mean) * rstd;
  float g = get(gy, i);
  if (silu) {
    const float y = xhat * wb[c] + wb[channels + c];
    const float s = sigmoid(y);
    g = g * (s * (y * (1.0f - s) + 1.0f));
  }
  return g * wb[c];
}

template <typename T>
__device__ void norm_bwd(const T* x, const float* wb, const T* gy, T* gx, size_t len, size_t hw, size_t groups,
                         size_t channels, float eps, int silu) {
  const size_t r = blockIdx.x;
  x += r * len;
  gy += r * len;
  gx += r * len;
  float mean, rstd;
  stats(x, len, eps, mean, rstd);
  const size_t c0 = (r % groups) * (len / hw);
  float s1 = 0.0f, s2 = 0.0f, xhat;
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float g = ghat(x, wb, gy, i, c0 + i / hw, channels, mean, rstd, silu, xhat);
    s1 += g;
    s2 += g * xhat;
  }
  const float m1 = block_reduce(s1, Sum()) / (float)len;
  const float m2 = block_reduce(s2, Sum()) / (float)len;
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float g = ghat(x, wb, gy, i, c0 + i / hw, channels, mean, rstd, silu, xhat);
    put(gx, i, (g - m1 - xhat * m2) * rstd);
  }
}

#define KERNELS(T, NAME)                                                                                           \
  extern "C" __global__ void norm_fwd_##NAME(const T* x, const float* wb, T* y, size_t len, size_t hw,            \
                                             size_t groups, size_t channels, float eps, int silu) {               \
    norm_fwd(x, wb, y, len, hw, groups, channels, eps, silu);                                                      \
  }                                                                                                                \
  extern "C" __global__ void norm_bwd_##NAME(const T* x, const float* wb, const T* gy, T* gx, size_t len,          \
                                             size_t hw, size_t groups, size_t channels, float eps, int silu) {    \
    norm_bwd(x, wb, gy, gx, len, hw, groups, channels, eps, silu);                                                 \
  }

KERNELS(float, f32)
KERNELS(__nv_bfloat16, bf16)
KERNELS(__half, f16)
