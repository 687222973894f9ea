// im2col for nn/conv.rs in one launch: the "wide" columns of x for a kh×kw kernel, padding (ph, pw), stride s.
// cols[b][(c·kh + i)·kw + j][t], t < ho·wq: with p = (i / s)·wq + j / s + t, the padded input's row
// (p / wq)·s + i % s and column (p % wq)·s + j % s (zero outside x). For t = r·wq + q with q < wo that is the
// usual column of output pixel (r, q) and tap (i, j); the wq − wo extra columns of each row are cut after the GEMM.
// src/nn/fused/conv.rs launches it; the CPU builds the same columns from candle ops.
#include "common.cuh"

template <typename T>
__device__ void im2col(const T* x, T* cols, int B, int C, int H, int W, int kh, int kw, int ph, int pw, int s,
                       int ho, int wq) {
  const size_t n_t = (size_t)ho * wq, taps = (size_t)kh * kw, total = (size_t)B * C * taps * n_t;
  FOR_EACH(e, total) {
    const size_t t = e % n_t, rest = e / n_t;
    const int tap = (int)(rest % taps), i = tap / kw, j = tap - i * kw;
    const size_t bc = rest / taps;
    const size_t p = (size_t)(i / s) * wq + j / s + t;
    const int y = (int)(p / wq) * s + i % s - ph, xx = (int)(p % wq) * s + j % s - pw;
    if (y >= 0 && y < H && xx >= 0 && xx < W) {
      cols[e] = x[(bc * H + y) * W + xx];
    } else {
      put(cols, e, 0.0f);
    }
  }
}

#define KERNELS(T, NAME)                                                                                           \
  extern "C" __global__ void im2col_##NAME(const T* x, T* cols, int B, int C, int H, int W, int kh, int kw,        \
                                           int ph, int pw, int s, int ho, int wq) {                                \
    im2col(x, cols, B, C, H, W, kh, kw, ph, pw, s, ho, wq);                                                        \
  }

KERNELS(float, f32)
KERNELS(__nv_bfloat16, bf16)
KERNELS(__half, f16)
