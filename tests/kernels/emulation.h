// A CPU emulation of what sdtune's CUDA kernels use, to run src/kernels/*.cu on the host in tests: one std::thread
// per CUDA thread of a block (blocks one after another), barriers for __syncthreads/__syncwarp, warp shuffles
// through a per-warp exchange, WMMA fragments as whole 16×16 tiles (every lane holds all of it; loads read the
// whole tile, only lane 0 stores, so a missing __syncwarp before another lane reads shows as wrong numbers), and
// bf16/f16 as 16-bit values rounded to nearest even. Not a model of timing, occupancy or memory coalescing.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static thread_local_shared

struct dim3_ {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3_ threadIdx, blockIdx;
inline dim3_ blockDim, gridDim;

// one block's synchronisation
struct BlockSync {
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::vector<float>> exchange;
  explicit BlockSync(unsigned threads) : block(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; w++) {
      warps.emplace_back(std::make_unique<std::barrier<>>(32));
      exchange.emplace_back(32, 0.0f);
    }
  }
};
inline BlockSync* emu_block = nullptr;

inline void __syncthreads() { emu_block->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_block->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline unsigned emu_lane() { return threadIdx.x & 31u; }

inline float emu_shfl(float v, unsigned src) {
  auto& ex = emu_block->exchange[threadIdx.x / 32];
  __syncwarp();
  ex[emu_lane()] = v;
  __syncwarp();
  const float r = ex[src & 31u];
  __syncwarp();
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu_shfl(v, emu_lane() ^ (unsigned)mask); }
inline float __shfl_down_sync(unsigned, float v, int delta) {
  const unsigned src = emu_lane() + (unsigned)delta;
  const float r = emu_shfl(v, src < 32 ? src : emu_lane());
  return src < 32 ? r : v;
}

// __shared__ variables: one instance per process, shared by the threads of the running block
#define thread_local_shared
inline std::vector<unsigned char> emu_dynamic_smem;
#define EMU_EXTERN_SHARED(name) unsigned char* name = emu_dynamic_smem.data()

// 16-bit floats
inline uint16_t emu_round16(float f, int mant_bits) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  (void)mant_bits;
  const uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;
  return (uint16_t)(u >> 16);
}
struct __nv_bfloat16 {
  uint16_t bits = 0;
};
inline __nv_bfloat16 __float2bfloat16(float f) {
  __nv_bfloat16 h;
  if (std::isnan(f)) {
    h.bits = 0x7fc0;
  } else {
    h.bits = emu_round16(f, 7);
  }
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = (uint32_t)h.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
struct __half {
  uint16_t bits = 0;
};
// IEEE binary16, round to nearest even (subnormals included, overflow to infinity)
inline __half __float2half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const float a = std::fabs(f);
  __half h;
  if (std::isnan(f)) {
    h.bits = (uint16_t)(sign | 0x7e00u);
  } else if (a >= 65520.0f) {
    h.bits = (uint16_t)(sign | 0x7c00u);
  } else if (a < 6.103515625e-05f) {  // subnormal: multiples of 2^-24
    h.bits = (uint16_t)(sign | (uint32_t)std::nearbyint(a * 16777216.0f));
  } else {
    uint32_t m = u & 0x7fffffu, e = ((u >> 23) & 0xffu) - 127 + 15;
    uint32_t r = (e << 10) | (m >> 13);
    const uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) r++;
    h.bits = (uint16_t)(sign | r);
  }
  return h;
}
inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  float f;
  if (e == 0) {
    f = std::ldexp((float)m, -24);
  } else if (e == 31) {
    f = m ? NAN : INFINITY;
  } else {
    f = std::ldexp((float)(m | 0x400u), (int)e - 25);
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= sign;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float emu_to_float(float x) { return x; }
inline float emu_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float emu_to_float(__half x) { return __half2float(x); }

inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;  // blocks run one after another
  return old;
}

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
// the whole tile, logically [row][col] of the fragment's own matrix (A: M×K, B: K×N, accumulator: M×N)
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  T x[256];
  static const int num_elements = 256;
};
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 16; j++)
      f.x[i * 16 + j] = std::is_same<Layout, row_major>::value ? p[i * ldm + j] : p[i + j * ldm];
  __syncwarp();
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 16; j++) f.x[i * 16 + j] = l == mem_row_major ? p[i * ldm + j] : p[i + j * ldm];
  __syncwarp();
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  __syncwarp();
  if (emu_lane() == 0)
    for (int i = 0; i < 16; i++)
      for (int j = 0; j < 16; j++) (l == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[i * 16 + j];
}
template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T v) {
  for (auto& e : f.x) e = v;
}
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 16; j++) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; k++) s += emu_to_float(a.x[i * 16 + k]) * emu_to_float(b.x[k * 16 + j]);
      out[i * 16 + j] = s;
    }
  std::memcpy(d.x, out, sizeof out);
}
}  // namespace wmma
}  // namespace nvcuda

// runs kernel(args…) over grid × block, blocks one after another, `smem` bytes of dynamic shared memory
template <typename F>
void emu_launch(dim3_ grid, unsigned threads, size_t smem, F kernel) {
  gridDim = grid;
  blockDim = dim3_{threads, 1, 1};
  emu_dynamic_smem.assign(smem, 0xAB);  // garbage, as on a GPU
  for (unsigned by = 0; by < grid.y; by++)
    for (unsigned bx = 0; bx < grid.x; bx++) {
      BlockSync sync(threads);
      emu_block = &sync;
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < threads; t++)
        ts.emplace_back([&, t] {
          threadIdx = dim3_{t, 0, 0};
          blockIdx = dim3_{bx, by, 0};
          kernel();
        });
      for (auto& t : ts) t.join();
    }
}
using std::max;
using std::min;
