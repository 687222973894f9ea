// src/kernels/conv.cu under the CPU emulation of CUDA (emulation.h): every column an output pixel uses must hold
// the zero-padded input at (r·s + i − ph, q·s + j − pw), the definition of im2col (the kernel reaches it through
// nn/conv.rs's stride phases). Strides 1 and 2, odd sides, 1×1 and 3×3 kernels. Exit status 1 on any mismatch.
#define SDTUNE_EMULATION
#include "emulation.h"
#include "../../src/kernels/conv.cu"

#include <cstdio>

struct Case {
  int B, C, H, W, kh, kw, p, s;
};

static bool run(const Case& c) {
  const int ho = (c.H + 2 * c.p - c.kh) / c.s + 1, wo = (c.W + 2 * c.p - c.kw) / c.s + 1;
  const int wq = wo + (c.kw - 1) / c.s;  // nn/conv.rs's wide rows
  std::vector<float> x((size_t)c.B * c.C * c.H * c.W);
  for (size_t i = 0; i < x.size(); i++) x[i] = (float)(i % 97) - 48.0f;
  std::vector<float> cols((size_t)c.B * c.C * c.kh * c.kw * ho * wq, NAN);
  emu_launch({4, 1, 1}, 128, 0, [&] {
    im2col_f32(x.data(), cols.data(), c.B, c.C, c.H, c.W, c.kh, c.kw, c.p, c.p, c.s, ho, wq);
  });
  size_t bad = 0, nan = 0;
  for (int b = 0; b < c.B; b++)
    for (int ch = 0; ch < c.C; ch++)
      for (int i = 0; i < c.kh; i++)
        for (int j = 0; j < c.kw; j++)
          for (int r = 0; r < ho; r++)
            for (int q = 0; q < wq; q++) {
              const size_t e = ((((size_t)b * c.C + ch) * c.kh + i) * c.kw + j) * ho * wq + (size_t)r * wq + q;
              if (std::isnan(cols[e])) nan++;
              if (q >= wo) continue;  // the wide rows' extra columns are cut after the GEMM
              const int y = r * c.s + i - c.p, xx = q * c.s + j - c.p;
              const float want =
                  (y >= 0 && y < c.H && xx >= 0 && xx < c.W) ? x[(((size_t)b * c.C + ch) * c.H + y) * c.W + xx] : 0.0f;
              bad += cols[e] != want;
            }
  const bool ok = bad == 0 && nan == 0;
  std::printf("im2col [%d,%d,%d,%d] %dx%d pad %d stride %d: %zu wrong, %zu unwritten%s\n", c.B, c.C, c.H, c.W, c.kh,
              c.kw, c.p, c.s, bad, nan, ok ? "" : "  FAIL");
  return ok;
}

int main() {
  const Case cases[] = {
      {2, 3, 7, 9, 3, 3, 1, 1}, {1, 2, 9, 8, 3, 3, 1, 2}, {2, 2, 8, 8, 3, 3, 1, 2}, {1, 3, 5, 6, 1, 1, 0, 1},
      {1, 2, 7, 7, 3, 3, 0, 1},
  };
  bool ok = true;
  for (const auto& c : cases) ok &= run(c);
  std::printf(ok ? "im2col kernel: all cases match\n" : "im2col kernel: MISMATCH\n");
  return ok ? 0 : 1;
}
