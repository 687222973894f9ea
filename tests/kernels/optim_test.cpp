// src/kernels/optim.cu and src/kernels/adam8bit.cu under the CPU emulation of CUDA (emulation.h) against the same
// updates written plainly here in f32 (the arithmetic sdtune's CPU code does): Adam's moments, AdamW's update, the
// sum of squares, and AdamW8bit's weights and re-coded state (codes must agree exactly). Several blocks, partial
// blocks, f32 and bf16. Exit status 1 on any mismatch. Built and run by tests/suite/cuda_emulated.rs.
#define SDTUNE_EMULATION
#include "emulation.h"
namespace optim {
#include "../../src/kernels/optim.cu"
}
namespace a8 {
#include "../../src/kernels/adam8bit.cu"
}

#include <algorithm>
#include <cstdio>
#include <random>

using bf16 = __nv_bfloat16;
static float f(float x) { return x; }
static float f(bf16 x) { return __bfloat162float(x); }

static bool report(const char* what, double err, double tol) {
  const bool ok = err <= tol;
  std::printf("%s: %.2e (tolerance %.0e)%s\n", what, err, tol, ok ? "" : "  FAIL");
  return ok;
}

// bitsandbytes' dynamic code map, as sdtune's train::optim::dynamic_map
static std::vector<float> dynamic_map(bool is_signed) {
  std::vector<float> data;
  for (int i = 0; i < 7; i++) {
    const int items = (1 << (i + (is_signed ? 0 : 1))) + 1;
    const double scale = std::pow(10.0, -6 + i);
    for (int j = 0; j + 1 < items; j++) {
      const double a = 0.1 + 0.9 * j / (items - 1), b = 0.1 + 0.9 * (j + 1) / (items - 1);
      const float code = (float)(scale * (a + b) / 2.0);
      data.push_back(code);
      if (is_signed) data.push_back(-code);
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  data.resize(256, 0.0f);
  std::sort(data.begin(), data.end());
  return data;
}

static unsigned char nearest(float x, const std::vector<float>& map) {
  const int hi = std::min<int>(std::lower_bound(map.begin(), map.end(), x) - map.begin(), 255);
  int best = hi;
  if (hi > 0 && std::abs(x - map[hi - 1]) <= std::abs(x - map[hi])) best = hi - 1;
  while (best > 0 && map[best - 1] == map[best]) best--;
  return (unsigned char)best;
}

template <typename T>
static bool elementwise(std::mt19937& rng, const char* dtype, double tol) {
  const size_t n = 1000;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<T> m(n), v(n), w(n), g(n);
  for (size_t i = 0; i < n; i++) {
    m[i] = T{};
    optim::put(&m[i], 0, 0.01f * normal(rng));
    optim::put(&v[i], 0, 1e-4f * std::abs(normal(rng)) + 1e-6f);
    optim::put(&w[i], 0, 0.1f * normal(rng));
    optim::put(&g[i], 0, 0.05f * normal(rng));
  }
  auto m0 = m, v0 = v, w0 = w;
  const float b1 = 0.9f, b2 = 0.999f, a1 = 0.1f, a2 = 0.001f, scale = 0.7f;
  const float decay = 0.999f, step = 0.05f, sqrt_bc2 = 0.0447f, eps = 1e-8f;
  float acc = 0.0f;
  emu_launch({3, 1, 1}, 256, 0, [&] {  // a grid smaller than n / 256: the grid-stride loops go round
    if constexpr (std::is_same<T, float>::value) {
      optim::ema_f32(m.data(), g.data(), n, b1, a1, scale, 0);
    } else {
      optim::ema_bf16(m.data(), g.data(), n, b1, a1, scale, 0);
    }
  });
  emu_launch({3, 1, 1}, 256, 0, [&] {
    if constexpr (std::is_same<T, float>::value) {
      optim::ema_f32(v.data(), g.data(), n, b2, a2, scale, 1);
    } else {
      optim::ema_bf16(v.data(), g.data(), n, b2, a2, scale, 1);
    }
  });
  emu_launch({3, 1, 1}, 256, 0, [&] {
    if constexpr (std::is_same<T, float>::value) {
      optim::adamw_f32(w.data(), m.data(), v.data(), n, decay, step, sqrt_bc2, eps);
      optim::sum_squares_f32(&acc, g.data(), n);
    } else {
      optim::adamw_bf16(w.data(), m.data(), v.data(), n, decay, step, sqrt_bc2, eps);
      optim::sum_squares_bf16(&acc, g.data(), n);
    }
  });
  double em = 0, ev = 0, ew = 0, mm = 1e-30, mv = 1e-30, mw = 1e-30, ss = 0;
  for (size_t i = 0; i < n; i++) {
    const float gs = scale * f(g[i]);
    const float mi = b1 * f(m0[i]) + a1 * gs, vi = b2 * f(v0[i]) + a2 * (gs * gs);
    // the weights from the kernel's own (rounded) moments, as the next kernel reads them
    const float wi = f(w0[i]) * decay - step * (f(m[i]) / (std::sqrt(f(v[i])) / sqrt_bc2 + eps));
    em = std::max(em, (double)std::abs(f(m[i]) - mi)), mm = std::max(mm, (double)std::abs(mi));
    ev = std::max(ev, (double)std::abs(f(v[i]) - vi)), mv = std::max(mv, (double)std::abs(vi));
    ew = std::max(ew, (double)std::abs(f(w[i]) - wi)), mw = std::max(mw, (double)std::abs(wi));
    ss += (double)f(g[i]) * f(g[i]);
  }
  char what[200];
  bool ok = true;
  std::snprintf(what, sizeof what, "ema (m) %s, relative", dtype);
  ok &= report(what, em / mm, tol);
  std::snprintf(what, sizeof what, "ema squared (v) %s, relative", dtype);
  ok &= report(what, ev / mv, tol);
  std::snprintf(what, sizeof what, "adamw %s, relative", dtype);
  ok &= report(what, ew / mw, tol);
  std::snprintf(what, sizeof what, "sum of squares %s, relative", dtype);
  ok &= report(what, std::abs(acc - ss) / ss, 1e-5);
  return ok;
}

static bool adam8bit(std::mt19937& rng) {
  const size_t n = 5000, blocks = (n + 255) / 256;  // a partial last block
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto smap = dynamic_map(true), umap = dynamic_map(false);
  // a state of random moments, coded as sdtune codes them
  std::vector<float> m(n), v(n), w(n), g(n);
  for (size_t i = 0; i < n; i++) m[i] = 0.01f * normal(rng), v[i] = 1e-4f * normal(rng) * normal(rng);
  for (size_t i = 0; i < n; i++) v[i] = std::abs(v[i]), w[i] = 0.1f * normal(rng), g[i] = 0.05f * normal(rng);
  auto encode = [&](const std::vector<float>& x, const std::vector<float>& map, std::vector<unsigned char>& codes,
                    std::vector<float>& absmax) {
    codes.resize(n), absmax.resize(blocks);
    for (size_t b = 0; b < blocks; b++) {
      float mx = 0.0f;
      for (size_t i = b * 256; i < std::min(n, b * 256 + 256); i++) mx = std::max(mx, std::abs(x[i]));
      if (mx == 0.0f) mx = 1.0f;
      absmax[b] = mx;
      for (size_t i = b * 256; i < std::min(n, b * 256 + 256); i++) codes[i] = nearest(x[i] / mx, map);
    }
  };
  std::vector<unsigned char> mc, vc;
  std::vector<float> mmax, vmax;
  encode(m, smap, mc, mmax);
  encode(v, umap, vc, vmax);
  std::vector<unsigned char> st(2048 + 8 * blocks + 2 * n);
  std::memcpy(st.data(), smap.data(), 1024);
  std::memcpy(st.data() + 1024, umap.data(), 1024);
  std::memcpy(st.data() + 2048, mmax.data(), 4 * blocks);
  std::memcpy(st.data() + 2048 + 4 * blocks, vmax.data(), 4 * blocks);
  std::memcpy(st.data() + 2048 + 8 * blocks, mc.data(), n);
  std::memcpy(st.data() + 2048 + 8 * blocks + n, vc.data(), n);
  const float b1 = 0.9f, b2 = 0.999f, a1 = 0.1f, a2 = 0.001f, sqrt_bc2 = 0.0447f, eps = 1e-8f, decay = 0.999f,
              step_size = -0.05f;
  std::vector<float> w0 = w;
  emu_launch({4, 1, 1}, 256, 0, [&] {
    a8::adam8bit_weights_f32(w.data(), g.data(), st.data(), n, b1, b2, a1, a2, sqrt_bc2, eps, decay, step_size, 1);
  });
  emu_launch({(unsigned)blocks, 1, 1}, 256, 0,
             [&] { a8::adam8bit_state_f32(st.data(), g.data(), n, b1, b2, a1, a2); });
  // the reference: decode, update in f32, code again
  std::vector<float> m1(n), v1(n);
  double ew = 0;
  for (size_t i = 0; i < n; i++) {
    m1[i] = smap[mc[i]] * mmax[i / 256] * b1 + a1 * g[i];
    v1[i] = umap[vc[i]] * vmax[i / 256] * b2 + a2 * g[i] * g[i];
    const float denom = std::sqrt(v1[i]) / sqrt_bc2 + eps;
    const float want = w0[i] * decay + step_size * (m1[i] / denom);
    ew = std::max(ew, (double)std::abs(w[i] - want));
  }
  std::vector<unsigned char> mc1, vc1;
  std::vector<float> mmax1, vmax1;
  encode(m1, smap, mc1, mmax1);
  encode(v1, umap, vc1, vmax1);
  size_t differ = 0;
  for (size_t i = 0; i < n; i++) differ += (st[2048 + 8 * blocks + i] != mc1[i]) + (st[2048 + 8 * blocks + n + i] != vc1[i]);
  differ += std::memcmp(st.data() + 2048, mmax1.data(), 4 * blocks) != 0;
  differ += std::memcmp(st.data() + 2048 + 4 * blocks, vmax1.data(), 4 * blocks) != 0;
  differ += std::memcmp(st.data(), smap.data(), 1024) != 0;
  bool ok = report("adam8bit weights, max |difference|", ew, 0.0);
  ok &= report("adam8bit state: codes, maxima or maps differing", (double)differ, 0.0);
  return ok;
}

int main() {
  std::mt19937 rng(11);
  bool ok = elementwise<float>(rng, "f32", 1e-6);
  ok &= elementwise<bf16>(rng, "bf16", 8e-3);
  ok &= adam8bit(rng);
  std::printf(ok ? "optimizer kernels: all cases match\n" : "optimizer kernels: MISMATCH\n");
  return ok ? 0 : 1;
}
