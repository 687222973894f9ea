// What sdtune's kernels share: f32/bf16/f16 element access through f32, and block-wide reductions. Included once
// by each .cu (no include guard: tests/kernels/ includes several kernels, each inside its own namespace).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>

__device__ __forceinline__ float get(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float get(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float get(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void put(float* p, size_t i, float x) { p[i] = x; }
__device__ __forceinline__ void put(__nv_bfloat16* p, size_t i, float x) { p[i] = __float2bfloat16(x); }
__device__ __forceinline__ void put(__half* p, size_t i, float x) { p[i] = __float2half(x); }

// a grid-stride loop over n elements
#define FOR_EACH(i, n) \
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)blockDim.x * gridDim.x)

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// op over x of every thread of the block, returned to every thread (blockDim a multiple of 32, at most 1024; every
// thread of the block must call it)
template <typename Op>
__device__ float block_reduce(float x, Op op) {
  __shared__ float warps[32];
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_down_sync(0xffffffffu, x, o));
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  if (lane == 0) warps[warp] = x;
  __syncthreads();
  float r = warps[0];
  for (unsigned w = 1; w < (blockDim.x >> 5); w++) r = op(r, warps[w]);
  __syncthreads();  // warps[] is free again for the next call
  return r;
}
