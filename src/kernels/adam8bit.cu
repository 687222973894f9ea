// AdamW8bit's step (bitsandbytes' block-wise 8-bit moments), two kernels per tensor; src/nn/fused/adam8bit.rs
// launches them and its CPU code is their reference. A tensor's packed state st (bytes): the signed and the
// unsigned code map (f32 × 256 each), m's and v's block maxima (f32 × blocks each), m's and v's codes (u8 × n
// each); blocks of 256 values. adam8bit_weights updates the weights from the old state and the gradient;
// adam8bit_state then moves the state to the new moments (the same arithmetic) and codes them again.
#include "common.cuh"

#define QBLOCK 256

struct Packed {
  const float* smap;
  const float* umap;
  float* mmax;
  float* vmax;
  unsigned char* mc;
  unsigned char* vc;
};

__device__ __forceinline__ Packed unpack(unsigned char* st, size_t n) {
  const size_t blocks = (n + QBLOCK - 1) / QBLOCK;
  Packed p;
  p.smap = (const float*)st;
  p.umap = p.smap + 256;
  p.mmax = (float*)(st + 2048);
  p.vmax = p.mmax + blocks;
  p.mc = st + 2048 + 8 * blocks;
  p.vc = p.mc + n;
  return p;
}

// element e's new moments from its old codes and the gradient
__device__ __forceinline__ void moments(const Packed& s, size_t e, float g, float b1, float b2, float a1, float a2,
                                        float& m, float& v) {
  const size_t blk = e / QBLOCK;
  m = s.smap[s.mc[e]] * s.mmax[blk] * b1 + a1 * g;
  v = s.umap[s.vc[e]] * s.vmax[blk] * b2 + a2 * g * g;
}

template <typename T>
__device__ void weights(T* p, const T* g, unsigned char* st, size_t n, float b1, float b2, float a1, float a2,
                        float sqrt_bc2, float eps, float decay, float step_size, int decayed) {
  const Packed s = unpack(st, n);
  FOR_EACH(e, n) {
    float m, v;
    moments(s, e, get(g, e), b1, b2, a1, a2, m, v);
    const float denom = sqrtf(v) / sqrt_bc2 + eps;
    float w = get(p, e);
    if (decayed) w *= decay;
    w += step_size * (m / denom);
    put(p, e, w);
  }
}

// the index of the code nearest to x (the lower one on a tie, as argmin)
__device__ unsigned char nearest(float x, const float* map) {
  int lo = 0, hi = 256;  // first index with map[i] >= x
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (map[mid] < x) lo = mid + 1; else hi = mid;
  }
  int best = lo < 255 ? lo : 255;
  if (best > 0 && fabsf(x - map[best - 1]) <= fabsf(x - map[best])) best -= 1;
  while (best > 0 && map[best - 1] == map[best]) best -= 1;
  return (unsigned char)best;
}

// one block per quantisation block
template <typename T>
__device__ void state(unsigned char* st, const T* g, size_t n, float b1, float b2, float a1, float a2) {
  const Packed s = unpack(st, n);
  const size_t blk = blockIdx.x, e = blk * QBLOCK + threadIdx.x;
  float m = 0.0f, v = 0.0f;
  if (e < n) moments(s, e, get(g, e), b1, b2, a1, a2, m, v);
  float am = block_reduce(fabsf(m), Max());  // every thread has read the old maxima before this returns
  float av = block_reduce(fabsf(v), Max());
  if (am == 0.0f) am = 1.0f;
  if (av == 0.0f) av = 1.0f;
  if (threadIdx.x == 0) {
    s.mmax[blk] = am;
    s.vmax[blk] = av;
  }
  if (e < n) {
    s.mc[e] = nearest(m / am, s.smap);
    s.vc[e] = nearest(v / av, s.umap);
  }
}

#define KERNELS(T, NAME)                                                                                           \
  extern "C" __global__ void adam8bit_weights_##NAME(T* p, const T* g, unsigned char* st, size_t n, float b1,      \
                                                     float b2, float a1, float a2, float sqrt_bc2, float eps,     \
                                                     float decay, float step_size, int decayed) {                 \
    weights(p, g, st, n, b1, b2, a1, a2, sqrt_bc2, eps, decay, step_size, decayed);                               \
  }                                                                                                                \
  extern "C" __global__ void adam8bit_state_##NAME(unsigned char* st, const T* g, size_t n, float b1, float b2,    \
                                                   float a1, float a2) {                                           \
    state(st, g, n, b1, b2, a1, a2);                                                                               \
  }

KERNELS(float, f32)
KERNELS(__nv_bfloat16, bf16)
KERNELS(__half, f16)
