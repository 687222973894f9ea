// src/kernels/flash.cu under the CPU emulation of CUDA (emulation.h) against attention computed in float64 from
// the same bf16 (f16) inputs: the forward's output and log-sum-exp, the backward's dQ, dK, dV, on shapes that leave
// partial tiles, padded head dims and causal masks. Exit status 1 on any mismatch. Built and run by
// tests/suite/kernels.rs (c++ -std=c++20).
#define SDTUNE_EMULATION
#include "emulation.h"
#include "../../src/kernels/flash.cu"

#include <cstdio>
#include <random>

// the kernels and conversions of one element type
template <typename T>
struct Kernels;
template <>
struct Kernels<__nv_bfloat16> {
  static constexpr const char* name = "bf16";
  static constexpr double tol = 2e-2;  // 8-bit outputs and probabilities: about 1% of the largest value
  static __nv_bfloat16 from(float x) { return __float2bfloat16(x); }
  static float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static constexpr auto fwd = flash_fwd_bf16;
  static constexpr auto bwd_kv = flash_bwd_kv_bf16;
  static constexpr auto bwd_q = flash_bwd_q_bf16;
};
template <>
struct Kernels<__half> {
  static constexpr const char* name = "f16";
  static constexpr double tol = 4e-3;  // 11-bit: 8× finer
  static __half from(float x) { return __float2half(x); }
  static float to(__half x) { return __half2float(x); }
  static constexpr auto fwd = flash_fwd_f16;
  static constexpr auto bwd_kv = flash_bwd_kv_f16;
  static constexpr auto bwd_q = flash_bwd_q_f16;
};

struct Case {
  int B, H, Sq, Sk, d, causal;
};

static size_t smem_fwd(int dp) { return 3 * TILE * dp * 2 + TILE * TILE * 2 + TILE * TILE * 4 + TILE * dp * 4 + 2 * TILE * 4; }
// the backward kernels' BwdTiles, with `accs` f32 accumulators (dK and dV: 2, dQ: 1)
static size_t smem_bwd(int dp, int accs) {
  return 4 * TILE * dp * 2 + 2 * TILE * TILE * 2 + accs * TILE * dp * 4 + 2 * TILE * TILE * 4 + 2 * TILE * 4;
}

static double rel_err(const std::vector<double>& ours, const std::vector<double>& ref) {
  double e = 0, m = 1e-30;
  for (size_t i = 0; i < ref.size(); i++) {
    e = std::max(e, std::abs(ours[i] - ref[i]));
    m = std::max(m, std::abs(ref[i]));
  }
  return e / m;
}

template <typename T>
static std::vector<double> as_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); i++) out[i] = Kernels<T>::to(v[i]);
  return out;
}

template <typename T>
static bool run(const Case& c, std::mt19937& rng) {
  using K = Kernels<T>;
  const int C = c.H * c.d, dp = (c.d + 15) / 16 * 16;
  const float scale = 1.0f / std::sqrt((float)c.d);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](size_t n, float std) {
    std::vector<T> v(n);
    for (auto& x : v) x = K::from(normal(rng) * std);
    return v;
  };
  const size_t nq = (size_t)c.B * c.Sq * C, nk = (size_t)c.B * c.Sk * C;
  auto q = randn(nq, 1.5f), k = randn(nk, 1.5f), v = randn(nk, 1.0f), dO = randn(nq, 1.0f);
  const auto qd = as_double(q), kd = as_double(k), vd = as_double(v), dOd = as_double(dO);

  // float64 reference
  std::vector<double> o_ref(nq), lse_ref((size_t)c.B * c.H * c.Sq), dq_ref(nq), dk_ref(nk), dv_ref(nk);
  for (int b = 0; b < c.B; b++)
    for (int h = 0; h < c.H; h++) {
      std::vector<double> P((size_t)c.Sq * c.Sk), dS((size_t)c.Sq * c.Sk);
      auto at = [&](const std::vector<double>& t, int S, int s, int j) { return t[((size_t)b * S + s) * C + h * c.d + j]; };
      for (int i = 0; i < c.Sq; i++) {
        double mx = -INFINITY;
        std::vector<double> s(c.Sk);
        for (int j = 0; j < c.Sk; j++) {
          double dot = 0;
          for (int x = 0; x < c.d; x++) dot += at(qd, c.Sq, i, x) * at(kd, c.Sk, j, x);
          s[j] = (c.causal && j > i) ? -INFINITY : dot * scale;
          mx = std::max(mx, s[j]);
        }
        double l = 0;
        for (int j = 0; j < c.Sk; j++) l += std::exp(s[j] - mx);
        lse_ref[((size_t)b * c.H + h) * c.Sq + i] = mx + std::log(l);
        for (int j = 0; j < c.Sk; j++) P[(size_t)i * c.Sk + j] = std::exp(s[j] - mx) / l;
        double delta = 0;
        for (int x = 0; x < c.d; x++) {
          double o = 0;
          for (int j = 0; j < c.Sk; j++) o += P[(size_t)i * c.Sk + j] * at(vd, c.Sk, j, x);
          o_ref[((size_t)b * c.Sq + i) * C + h * c.d + x] = o;
          delta += o * at(dOd, c.Sq, i, x);
        }
        for (int j = 0; j < c.Sk; j++) {
          double dp_ = 0;
          for (int x = 0; x < c.d; x++) dp_ += at(dOd, c.Sq, i, x) * at(vd, c.Sk, j, x);
          dS[(size_t)i * c.Sk + j] = P[(size_t)i * c.Sk + j] * (dp_ - delta);
        }
      }
      for (int i = 0; i < c.Sq; i++)
        for (int x = 0; x < c.d; x++) {
          double g = 0;
          for (int j = 0; j < c.Sk; j++) g += dS[(size_t)i * c.Sk + j] * at(kd, c.Sk, j, x);
          dq_ref[((size_t)b * c.Sq + i) * C + h * c.d + x] = g * scale;
        }
      for (int j = 0; j < c.Sk; j++)
        for (int x = 0; x < c.d; x++) {
          double gk = 0, gv = 0;
          for (int i = 0; i < c.Sq; i++) {
            gk += dS[(size_t)i * c.Sk + j] * at(qd, c.Sq, i, x);
            gv += P[(size_t)i * c.Sk + j] * at(dOd, c.Sq, i, x);
          }
          dk_ref[((size_t)b * c.Sk + j) * C + h * c.d + x] = gk * scale;
          dv_ref[((size_t)b * c.Sk + j) * C + h * c.d + x] = gv;
        }
    }

  // the kernels
  std::vector<T> o(nq), dq(nq), dk(nk), dv(nk);
  std::vector<float> lse((size_t)c.B * c.H * c.Sq), delta(lse.size());
  const unsigned qt = (c.Sq + TILE - 1) / TILE, kt = (c.Sk + TILE - 1) / TILE, bh = c.B * c.H;
  emu_launch({qt, bh, 1}, THREADS, smem_fwd(dp), [&] {
    K::fwd(q.data(), k.data(), v.data(), o.data(), lse.data(), c.H, c.Sq, c.Sk, C, c.d, dp, scale, c.causal);
  });
  // Δ = Σ dO·O over each head's row, from the forward's bf16 output (as sdtune computes it)
  for (int b = 0; b < c.B; b++)
    for (int h = 0; h < c.H; h++)
      for (int i = 0; i < c.Sq; i++) {
        float s = 0;
        for (int x = 0; x < c.d; x++) {
          const size_t e = ((size_t)b * c.Sq + i) * C + h * c.d + x;
          s += K::to(o[e]) * K::to(dO[e]);
        }
        delta[((size_t)b * c.H + h) * c.Sq + i] = s;
      }
  emu_launch({kt, bh, 1}, THREADS, smem_bwd(dp, 2), [&] {
    K::bwd_kv(q.data(), k.data(), v.data(), dO.data(), lse.data(), delta.data(), dk.data(), dv.data(), c.H,
                      c.Sq, c.Sk, C, c.d, dp, scale, c.causal);
  });
  emu_launch({qt, bh, 1}, THREADS, smem_bwd(dp, 1), [&] {
    K::bwd_q(q.data(), k.data(), v.data(), dO.data(), lse.data(), delta.data(), dq.data(), c.H, c.Sq, c.Sk,
                     C, c.d, dp, scale, c.causal);
  });
  std::vector<double> lse_d(lse.begin(), lse.end());
  double lse_err = 0;
  for (size_t i = 0; i < lse.size(); i++) lse_err = std::max(lse_err, std::abs(lse_d[i] - lse_ref[i]));
  const double eo = rel_err(as_double(o), o_ref), eq = rel_err(as_double(dq), dq_ref),
               ek = rel_err(as_double(dk), dk_ref), ev = rel_err(as_double(dv), dv_ref);
  const double tol = K::tol;
  const bool ok = eo <= tol && eq <= tol && ek <= tol && ev <= tol && lse_err <= 1e-3;
  std::printf("%s B=%d H=%d Sq=%d Sk=%d d=%d causal=%d: output %.2e, log-sum-exp %.2e (abs), dQ %.2e, dK %.2e, dV %.2e%s\n",
              K::name, c.B, c.H, c.Sq, c.Sk, c.d, c.causal, eo, lse_err, eq, ek, ev, ok ? "" : "  FAIL");
  return ok;
}

int main() {
  std::mt19937 rng(7);
  const Case cases[] = {
      {1, 2, 70, 77, 40, 0},   // SD 1.5's 40-wide heads (padded to 48), partial tiles
      {2, 1, 77, 77, 64, 1},   // CLIP's causal self-attention
      {1, 1, 64, 130, 160, 0}, // the widest heads, three key tiles
      {1, 1, 150, 20, 80, 0},  // cross-attention: few keys
  };
  bool ok = true;
  for (const auto& c : cases) ok &= run<__nv_bfloat16>(c, rng);
  for (const auto& c : cases) ok &= run<__half>(c, rng);
  std::printf(ok ? "flash attention: all cases match\n" : "flash attention: MISMATCH\n");
  return ok ? 0 : 1;
}
