// src/kernels/norm.cu under the CPU emulation of CUDA (emulation.h) against GroupNorm / LayerNorm (+ SiLU) and
// their input gradient computed in float64: rows spanning several channels, rows longer than a block, f32 and bf16.
// Exit status 1 on any mismatch. Built and run by tests/suite/cuda_emulated.rs.
#define SDTUNE_EMULATION
#include "emulation.h"
#include "../../src/kernels/norm.cu"

#include <cstdio>
#include <random>

struct Case {
  const char* name;
  size_t rows, len, hw, groups;
  int silu;
};

template <typename T>
static T cast(float x);
template <>
float cast<float>(float x) {
  return x;
}
template <>
__nv_bfloat16 cast<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

template <typename T>
static bool run(const Case& c, std::mt19937& rng, double tol, const char* dtype) {
  const size_t n = c.rows * c.len, channels = c.groups * (c.len / c.hw);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<T> x(n), gy(n), y(n), gx(n);
  std::vector<float> wb(2 * channels);
  for (auto& v : x) v = cast<T>(normal(rng) + 0.5f);
  for (auto& v : gy) v = cast<T>(normal(rng));
  for (auto& v : wb) v = normal(rng);
  const float eps = 1e-5f;
  emu_launch({(unsigned)c.rows, 1, 1}, 512, 0, [&] {
    if constexpr (std::is_same<T, float>::value) {
      norm_fwd_f32(x.data(), wb.data(), y.data(), c.len, c.hw, c.groups, channels, eps, c.silu);
    } else {
      norm_fwd_bf16(x.data(), wb.data(), y.data(), c.len, c.hw, c.groups, channels, eps, c.silu);
    }
  });
  emu_launch({(unsigned)c.rows, 1, 1}, 512, 0, [&] {
    if constexpr (std::is_same<T, float>::value) {
      norm_bwd_f32(x.data(), wb.data(), gy.data(), gx.data(), c.len, c.hw, c.groups, channels, eps, c.silu);
    } else {
      norm_bwd_bf16(x.data(), wb.data(), gy.data(), gx.data(), c.len, c.hw, c.groups, channels, eps, c.silu);
    }
  });
  double ey = 0, my = 1e-30, eg = 0, mg = 1e-30;
  for (size_t r = 0; r < c.rows; r++) {
    const size_t o = r * c.len, c0 = (r % c.groups) * (c.len / c.hw);
    double mean = 0, var = 0;
    for (size_t i = 0; i < c.len; i++) mean += emu_to_float(x[o + i]);
    mean /= c.len;
    for (size_t i = 0; i < c.len; i++) var += std::pow(emu_to_float(x[o + i]) - mean, 2);
    const double rstd = 1.0 / std::sqrt(var / c.len + eps);
    std::vector<double> xhat(c.len), ghat(c.len);
    double m1 = 0, m2 = 0;
    for (size_t i = 0; i < c.len; i++) {
      const size_t ch = c0 + i / c.hw;
      xhat[i] = (emu_to_float(x[o + i]) - mean) * rstd;
      const double pre = xhat[i] * wb[ch] + wb[channels + ch];
      const double s = 1.0 / (1.0 + std::exp(-pre));
      const double want = c.silu ? pre * s : pre;
      ey = std::max(ey, std::abs(emu_to_float(y[o + i]) - want));
      my = std::max(my, std::abs(want));
      double g = emu_to_float(gy[o + i]);
      if (c.silu) g *= s * (1.0 + pre * (1.0 - s));
      ghat[i] = g * wb[ch];
      m1 += ghat[i];
      m2 += ghat[i] * xhat[i];
    }
    m1 /= c.len;
    m2 /= c.len;
    for (size_t i = 0; i < c.len; i++) {
      const double want = (ghat[i] - m1 - xhat[i] * m2) * rstd;
      eg = std::max(eg, std::abs(emu_to_float(gx[o + i]) - want));
      mg = std::max(mg, std::abs(want));
    }
  }
  const bool ok = ey / my <= tol && eg / mg <= tol;
  std::printf("%s %s: output %.2e, input gradient %.2e (relative to the largest; tolerance %.0e)%s\n", c.name, dtype,
              ey / my, eg / mg, tol, ok ? "" : "  FAIL");
  return ok;
}

int main() {
  std::mt19937 rng(3);
  const Case cases[] = {
      {"group_norm + silu [2, 16, 9, 7], 4 groups", 2 * 4, 4 * 63, 63, 4, 1},
      {"group_norm [1, 6, 40, 40], 3 groups (rows of 3200)", 3, 2 * 1600, 1600, 3, 0},
      {"layer_norm [2, 5, 320]", 2 * 5, 320, 1, 1, 0},
  };
  bool ok = true;
  for (const auto& c : cases) {
    ok &= run<float>(c, rng, 1e-5, "f32");
    ok &= run<__nv_bfloat16>(c, rng, 1e-2, "bf16");
  }
  std::printf(ok ? "norm kernels: all cases match\n" : "norm kernels: MISMATCH\n");
  return ok ? 0 : 1;
}
