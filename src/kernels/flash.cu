// Fused multi-head attention (FlashAttention's scheme) on tensor cores (WMMA, bf16/f16 inputs, f32 accumulation):
// the forward keeps no [Sq, Sk] scores in memory, the backward recomputes them tile by tile. src/nn/fused/flash.rs
// launches these; tests/kernels/ runs them under a CPU emulation against a float64 reference.
//
// q: [B, Sq, C], k and v: [B, Sk, C], C = H·d (head h's values at columns h·d … h·d + d − 1); o like q; lse: f32
// [B·H, Sq], each query row's log Σ exp(score). Scores are scale·q·kᵀ, future keys masked when causal. Blocks of
// 4 warps take 64 rows (queries, or keys for dK/dV), each warp 16; tiles of 64 keys (queries) move through shared
// memory; head dims are padded with zeros to dp, a multiple of 16 (dp ≤ 160).
#include <mma.h>

#include "common.cuh"
using namespace nvcuda;

#ifdef SDTUNE_EMULATION
#define DYNAMIC_SMEM(name) unsigned char* name = emu_dynamic_smem.data()
#else
#define DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#define TILE 64
#define WARPS 4
#define THREADS (WARPS * 32)

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// rows r0 … r0 + TILE − 1 of a [B, S, C] tensor's head (row pointer `base` = batch b, column h·d) into a TILE × dp
// tile, zeros past S and past d
template <typename T>
__device__ void load_tile(T* dst, const T* base, int r0, int S, int C, int d, int dp) {
  for (int i = threadIdx.x; i < TILE * dp; i += THREADS) {
    const int r = i / dp, j = i - r * dp;
    if (r0 + r < S && j < d) {
      dst[i] = base[(size_t)(r0 + r) * C + j];
    } else {
      put(dst, i, 0.0f);
    }
  }
}

// the warp's 16 × 64 block of A·Bᵀ into out (f32, row stride TILE): A rows a (row stride dp), B rows b (TILE rows,
// row stride dp)
template <typename T>
__device__ void abt(float* out, const T* a, const T* b, int dp) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  for (int nb = 0; nb < TILE / 16; nb++) {
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < dp / 16; kk++) {
      wmma::load_matrix_sync(fa, a + kk * 16, dp);
      wmma::load_matrix_sync(fb, b + (size_t)nb * 16 * dp + kk * 16, dp);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + nb * 16, acc, TILE, wmma::mem_row_major);
  }
}

template <bool COL>
struct Layout {
  typedef wmma::row_major type;
};
template <>
struct Layout<true> {
  typedef wmma::col_major type;
};

// acc (f32 16 × dp, row stride dp) += P·V for the warp's 16 rows: P 16 × TILE (row stride TILE, row-major, or
// column-major when COL: element (i, j) at p[i + j·TILE]), V TILE × dp (row stride dp)
template <typename T, bool COL>
__device__ void acc_pv(float* acc, const T* p, const T* v, int dp) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, typename Layout<COL>::type> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  for (int jb = 0; jb < dp / 16; jb++) {
    wmma::load_matrix_sync(fc, acc + jb * 16, dp, wmma::mem_row_major);
    for (int kb = 0; kb < TILE / 16; kb++) {
      wmma::load_matrix_sync(fa, COL ? p + kb * 16 * TILE : p + kb * 16, TILE);
      wmma::load_matrix_sync(fb, v + (size_t)kb * 16 * dp + jb * 16, dp);
      wmma::mma_sync(fc, fa, fb, fc);
    }
    wmma::store_matrix_sync(acc + jb * 16, fc, dp, wmma::mem_row_major);
  }
}

__device__ __forceinline__ bool visible(int qi, int kj, int Sq, int Sk, int causal) {
  return qi < Sq && kj < Sk && !(causal && kj > qi);
}

// grid (⌈Sq/64⌉, B·H)
template <typename T>
__device__ void flash_fwd(const T* q, const T* k, const T* v, T* o, float* lse, int H, int Sq, int Sk, int C, int d,
                          int dp, float scale, int causal) {
  DYNAMIC_SMEM(smem);
  T* Qs = (T*)smem;
  T* Ks = Qs + TILE * dp;
  T* Vs = Ks + TILE * dp;
  T* Ps = Vs + TILE * dp;
  float* Ss = (float*)(Ps + TILE * TILE);
  float* Os = Ss + TILE * TILE;
  float* Ms = Os + TILE * dp;
  float* Ls = Ms + TILE;
  const int bh = blockIdx.y, b = bh / H, h = bh - b * H, q0 = blockIdx.x * TILE;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const size_t qoff = (size_t)b * Sq * C + (size_t)h * d, koff = (size_t)b * Sk * C + (size_t)h * d;
  load_tile(Qs, q + qoff, q0, Sq, C, d, dp);
  for (int i = threadIdx.x; i < TILE * dp; i += THREADS) Os[i] = 0.0f;
  for (int i = threadIdx.x; i < TILE; i += THREADS) {
    Ms[i] = -INFINITY;
    Ls[i] = 0.0f;
  }
  const int kend = causal ? min(Sk, q0 + TILE) : Sk;
  for (int k0 = 0; k0 < kend; k0 += TILE) {
    __syncthreads();  // the previous tile's K, V are no longer read
    load_tile(Ks, k + koff, k0, Sk, C, d, dp);
    load_tile(Vs, v + koff, k0, Sk, C, d, dp);
    __syncthreads();
    float* S = Ss + warp * 16 * TILE;
    T* P = Ps + warp * 16 * TILE;
    float* O = Os + warp * 16 * dp;
    abt(S, Qs + warp * 16 * dp, Ks, dp);
    __syncwarp();
    for (int r = 0; r < 16; r++) {
      const int row = warp * 16 + r, qi = q0 + row;
      float s[2];
      for (int c = 0; c < 2; c++) {
        const int col = lane * 2 + c;
        s[c] = visible(qi, k0 + col, Sq, Sk, causal) ? S[r * TILE + col] * scale : -INFINITY;
      }
      const float m_old = Ms[row];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(s[0], s[1])));
      float sum = 0.0f;
      for (int c = 0; c < 2; c++) {
        const float p = m_new == -INFINITY ? 0.0f : expf(s[c] - m_new);
        put(P, r * TILE + lane * 2 + c, p);
        sum += p;
      }
      sum = warp_sum(sum);
      const float alpha = m_new == -INFINITY ? 1.0f : expf(m_old - m_new);
      for (int j = lane; j < dp; j += 32) O[r * dp + j] *= alpha;
      __syncwarp();
      if (lane == 0) {
        Ms[row] = m_new;
        Ls[row] = Ls[row] * alpha + sum;
      }
    }
    __syncwarp();
    acc_pv<T, false>(O, P, Vs, dp);
    __syncwarp();
  }
  __syncthreads();
  for (int i = threadIdx.x; i < TILE * d; i += THREADS) {
    const int r = i / d, j = i - r * d, qi = q0 + r;
    if (qi < Sq) {
      const float l = Ls[r];
      put(o, qoff + (size_t)qi * C + j, l > 0.0f ? Os[r * dp + j] / l : 0.0f);
    }
  }
  for (int r = threadIdx.x; r < TILE; r += THREADS)
    if (q0 + r < Sq) lse[(size_t)bh * Sq + q0 + r] = Ms[r] + logf(Ls[r]);
}

// the query tile's log-sum-exp and Δ (rows past Sq: 0)
__device__ void load_rows(float* Lq, float* Dq, const float* lse, const float* delta, int bh, int q0, int Sq) {
  for (int r = threadIdx.x; r < TILE; r += THREADS) {
    const bool in = q0 + r < Sq;
    Lq[r] = in ? lse[(size_t)bh * Sq + q0 + r] : 0.0f;
    Dq[r] = in ? delta[(size_t)bh * Sq + q0 + r] : 0.0f;
  }
}

// The backward kernels' shared memory (sizes: flash.rs's `smem`): the Q, dO, K and V tiles (TILE × dp), P and dS
// (TILE × TILE), then in f32 `accs` accumulators (TILE × dp each: dK and dV, or dQ), the scratch tiles S and dP
// (TILE × TILE), and the query tile's lse and Δ rows.
template <typename T>
struct BwdTiles {
  T *Q, *dO, *K, *V, *P, *dS;
  float *acc, *S, *dP, *Lq, *Dq;
  __device__ BwdTiles(unsigned char* smem, int dp, int accs) {
    Q = (T*)smem;
    dO = Q + TILE * dp;
    K = dO + TILE * dp;
    V = K + TILE * dp;
    P = V + TILE * dp;
    dS = P + TILE * TILE;
    acc = (float*)(dS + TILE * TILE);
    S = acc + accs * TILE * dp;
    dP = S + TILE * TILE;
    Lq = dP + TILE * TILE;
    Dq = Lq + TILE;
  }
};

// the warp's 16 query rows (w16 …) of P = exp(S·scale − lse) and dS = P ⊙ (dP − Δ), S = Q·Kᵀ and dP = dO·Vᵀ going
// through the f32 scratch tiles; query tile q0, key tile k0 (all tiles TILE rows, row stride TILE or dp)
template <typename T>
__device__ void probs_and_dscores(const BwdTiles<T>& t, int w16, int q0, int k0, int Sq, int Sk, int dp, float scale,
                                  int causal) {
  T *Ps = t.P, *dSs = t.dS;
  const float *Lq = t.Lq, *Dq = t.Dq;
  float *S = t.S + w16 * TILE, *dP = t.dP + w16 * TILE;
  abt(S, t.Q + w16 * dp, t.K, dp);
  abt(dP, t.dO + w16 * dp, t.V, dp);
  __syncwarp();
  const int lane = threadIdx.x & 31;
  for (int r = 0; r < 16; r++)
    for (int c = lane; c < TILE; c += 32) {
      const int qi = q0 + w16 + r, kj = k0 + c;
      float p = 0.0f, ds = 0.0f;
      if (visible(qi, kj, Sq, Sk, causal)) {
        p = expf(S[r * TILE + c] * scale - Lq[w16 + r]);
        ds = p * (dP[r * TILE + c] - Dq[w16 + r]);
      }
      put(Ps + w16 * TILE, r * TILE + c, p);
      put(dSs + w16 * TILE, r * TILE + c, ds);
    }
}

// dK, dV for a tile of 64 keys: grid (⌈Sk/64⌉, B·H). dO like q; delta: f32 [B·H, Sq], Σ_j dO·O per query row.
// Each query tile: the warps compute S and dP for 16 queries each, then dV += Pᵀ·dO and dK += dSᵀ·Q for 16 keys
// each.
template <typename T>
__device__ void flash_bwd_kv(const T* q, const T* k, const T* v, const T* dO, const float* lse, const float* delta,
                             T* dk, T* dv, int H, int Sq, int Sk, int C, int d, int dp, float scale, int causal) {
  DYNAMIC_SMEM(smem);
  const BwdTiles<T> t(smem, dp, 2);
  float *dKs = t.acc, *dVs = t.acc + TILE * dp;
  const int bh = blockIdx.y, b = bh / H, h = bh - b * H, k0 = blockIdx.x * TILE;
  const int warp = threadIdx.x / 32;
  const size_t qoff = (size_t)b * Sq * C + (size_t)h * d, koff = (size_t)b * Sk * C + (size_t)h * d;
  load_tile(t.K, k + koff, k0, Sk, C, d, dp);
  load_tile(t.V, v + koff, k0, Sk, C, d, dp);
  for (int i = threadIdx.x; i < TILE * dp; i += THREADS) dKs[i] = dVs[i] = 0.0f;
  for (int q0 = causal ? k0 : 0; q0 < Sq; q0 += TILE) {
    __syncthreads();  // the previous query tile is no longer read
    load_tile(t.Q, q + qoff, q0, Sq, C, d, dp);
    load_tile(t.dO, dO + qoff, q0, Sq, C, d, dp);
    load_rows(t.Lq, t.Dq, lse, delta, bh, q0, Sq);
    __syncthreads();
    // P, dS for the warp's 16 queries × the 64 keys
    const int w16 = warp * 16;
    probs_and_dscores(t, w16, q0, k0, Sq, Sk, dp, scale, causal);
    __syncthreads();
    // the warp's 16 keys: dV += Pᵀ·dO, dK += dSᵀ·Q (Pᵀ read column-major from P's rows of queries)
    acc_pv<T, true>(dVs + w16 * dp, t.P + w16, t.dO, dp);
    acc_pv<T, true>(dKs + w16 * dp, t.dS + w16, t.Q, dp);
    __syncwarp();
  }
  __syncthreads();
  for (int i = threadIdx.x; i < TILE * d; i += THREADS) {
    const int r = i / d, j = i - r * d, kj = k0 + r;
    if (kj < Sk) {
      put(dk, koff + (size_t)kj * C + j, dKs[r * dp + j] * scale);
      put(dv, koff + (size_t)kj * C + j, dVs[r * dp + j]);
    }
  }
}

// dQ for a tile of 64 queries: grid (⌈Sq/64⌉, B·H); each warp its 16 queries through every key tile
template <typename T>
__device__ void flash_bwd_q(const T* q, const T* k, const T* v, const T* dO, const float* lse, const float* delta,
                            T* dq, int H, int Sq, int Sk, int C, int d, int dp, float scale, int causal) {
  DYNAMIC_SMEM(smem);
  const BwdTiles<T> t(smem, dp, 1);
  float* dQs = t.acc;
  const int bh = blockIdx.y, b = bh / H, h = bh - b * H, q0 = blockIdx.x * TILE;
  const int warp = threadIdx.x / 32, w16 = warp * 16;
  const size_t qoff = (size_t)b * Sq * C + (size_t)h * d, koff = (size_t)b * Sk * C + (size_t)h * d;
  load_tile(t.Q, q + qoff, q0, Sq, C, d, dp);
  load_tile(t.dO, dO + qoff, q0, Sq, C, d, dp);
  for (int i = threadIdx.x; i < TILE * dp; i += THREADS) dQs[i] = 0.0f;
  load_rows(t.Lq, t.Dq, lse, delta, bh, q0, Sq);
  const int kend = causal ? min(Sk, q0 + TILE) : Sk;
  for (int k0 = 0; k0 < kend; k0 += TILE) {
    __syncthreads();
    load_tile(t.K, k + koff, k0, Sk, C, d, dp);
    load_tile(t.V, v + koff, k0, Sk, C, d, dp);
    __syncthreads();
    probs_and_dscores(t, w16, q0, k0, Sq, Sk, dp, scale, causal);
    __syncwarp();
    acc_pv<T, false>(dQs + w16 * dp, t.dS + w16 * TILE, t.K, dp);
    __syncwarp();
  }
  __syncthreads();
  for (int i = threadIdx.x; i < TILE * d; i += THREADS) {
    const int r = i / d, j = i - r * d, qi = q0 + r;
    if (qi < Sq) put(dq, qoff + (size_t)qi * C + j, dQs[r * dp + j] * scale);
  }
}

#define KERNELS(T, NAME)                                                                                           \
  extern "C" __global__ void flash_fwd_##NAME(const T* q, const T* k, const T* v, T* o, float* lse, int H, int Sq, \
                                              int Sk, int C, int d, int dp, float scale, int causal) {             \
    flash_fwd(q, k, v, o, lse, H, Sq, Sk, C, d, dp, scale, causal);                                                \
  }                                                                                                                \
  extern "C" __global__ void flash_bwd_kv_##NAME(const T* q, const T* k, const T* v, const T* dO,                  \
                                                 const float* lse, const float* delta, T* dk, T* dv, int H,        \
                                                 int Sq, int Sk, int C, int d, int dp, float scale, int causal) {  \
    flash_bwd_kv(q, k, v, dO, lse, delta, dk, dv, H, Sq, Sk, C, d, dp, scale, causal);                             \
  }                                                                                                                \
  extern "C" __global__ void flash_bwd_q_##NAME(const T* q, const T* k, const T* v, const T* dO, const float* lse,  \
                                                const float* delta, T* dq, int H, int Sq, int Sk, int C, int d,    \
                                                int dp, float scale, int causal) {                                 \
    flash_bwd_q(q, k, v, dO, lse, delta, dq, H, Sq, Sk, C, d, dp, scale, causal);                                  \
  }

KERNELS(__nv_bfloat16, bf16)
KERNELS(__half, f16)
