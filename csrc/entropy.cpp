// heal_kernels CPU kernels: token entropy + label log-probs from logits, forward and backward
// (DESIGN.md 3.1).
//
// One OpenMP parallel region over the rows; per row (kept in a float scratch row in L1/L2):
//   pass 1: convert to float, c = max(z) (NaN noticed);
//   pass 2: u = (z - c) / T, e = exp(u), S = sum e, M = sum e * u (double accumulators);
//   entropy = log S - M / S, logprob = (z[label] - c) / T - log S, stats = (c, 0, log S).
// -inf entries have e = 0 and add nothing to M (never 0 * inf). A row with a NaN, a +inf or only
// -inf entries gets NaN entropy / log-prob and non-finite stats. Labels are validated in Python;
// out-of-range labels still give NaN here rather than an out-of-bounds read.
// Inputs are raw addresses (the Python side checks dtype, shape, device and contiguity).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "heal_simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

template <class L>
void forward_rows(uintptr_t logits, int64_t n, int64_t v, int64_t stride_row, double temperature,
                  uintptr_t labels, uintptr_t entropy, uintptr_t logprob, uintptr_t stats, int num_threads) {
  using T = typename L::T;
  const T* z = reinterpret_cast<const T*>(logits);
  const int64_t* lab = reinterpret_cast<const int64_t*>(labels);
  float* ent = reinterpret_cast<float*>(entropy);
  float* lp = reinterpret_cast<float*>(logprob);
  float* st = reinterpret_cast<float*>(stats);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float nan = std::numeric_limits<float>::quiet_NaN();

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> buf(static_cast<size_t>(v));
    float* x = buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      const T* row = z + r * stride_row;
      int nans = 0;
      const float c = load_row_max<L>(row, v, x, &nans);
      float log_s = nan, h = nan, lpr = nan;
      if (nans == 0 && std::isfinite(c)) {
        double s = 0.0, m = 0.0;
        exp_sums(x, v, c, inv_t, &s, &m);
        log_s = static_cast<float>(std::log(s));
        h = static_cast<float>(std::log(s) - m / s);
        if (lab) {
          const int64_t k = lab[r];
          lpr = (k >= 0 && k < v) ? (x[k] - c) * inv_t - log_s : nan;
        }
      }
      ent[r] = h;
      if (lab) lp[r] = lpr;
      st[3 * r] = c;
      st[3 * r + 1] = 0.0f;
      st[3 * r + 2] = log_s;
    }
  }
}

// dtype: 0 float32, 1 bfloat16, 2 float16
void forward(uintptr_t logits, int dtype, int64_t n, int64_t v, int64_t stride_row, double temperature,
             uintptr_t labels, uintptr_t entropy, uintptr_t logprob, uintptr_t stats, int num_threads) {
  pybind11::gil_scoped_release release;
  if (dtype == 0)
    forward_rows<F32>(logits, n, v, stride_row, temperature, labels, entropy, logprob, stats, num_threads);
  else if (dtype == 1)
    forward_rows<BF16>(logits, n, v, stride_row, temperature, labels, entropy, logprob, stats, num_threads);
  else
    forward_rows<F16>(logits, n, v, stride_row, temperature, labels, entropy, logprob, stats, num_threads);
}

#ifdef __F16C__
struct StoreF16 {
  using T = uint16_t;
  static inline void store(uint16_t* p, int64_t i, float x) {
    p[i] = static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
  }
};
#endif

// Backward over rows: v = (z - c) / T - mx, p = exp(v - log S),
// dz = (-p * (g_H * (v - mean) + g_lp) + g_lp * onehot(label)) / T with mean = log S - entropy;
// entries with p = 0 (-inf logits) get exactly 0. Gradient rows are contiguous, in the logits' dtype.
template <class L, class S>
void backward_rows(uintptr_t logits, int64_t n, int64_t v, int64_t stride_row, double temperature,
                   uintptr_t labels, uintptr_t entropy, uintptr_t stats, uintptr_t g_entropy,
                   uintptr_t g_logprob, uintptr_t grad, int num_threads) {
  using T = typename L::T;
  using G = typename S::T;
  const T* z = reinterpret_cast<const T*>(logits);
  const int64_t* lab = reinterpret_cast<const int64_t*>(labels);
  const float* ent = reinterpret_cast<const float*>(entropy);
  const float* st = reinterpret_cast<const float*>(stats);
  const float* gh_p = reinterpret_cast<const float*>(g_entropy);
  const float* glp_p = reinterpret_cast<const float*>(g_logprob);
  G* out = reinterpret_cast<G*>(grad);
  const float inv_t = static_cast<float>(1.0 / temperature);

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> buf(static_cast<size_t>(v));
    float* x = buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      const T* row = z + r * stride_row;
      G* orow = out + r * v;
      const float c = st[3 * r], mx = st[3 * r + 1], log_s = st[3 * r + 2];
      const float gh = gh_p ? gh_p[r] : 0.0f;
      const float glp = (glp_p && lab) ? glp_p[r] : 0.0f;
      const float k = glp - gh * (log_s - ent[r]);  // g_H * (v - mean) + g_lp = g_H * v + k
      const float base = mx + log_s;
      for (int64_t i = 0; i < v; ++i) x[i] = L::load(row, i);
      int64_t i = 0;
#ifdef HEAL_AVX2
      {
        const __m256 cv = _mm256_set1_ps(c), tv = _mm256_set1_ps(inv_t), mxv = _mm256_set1_ps(mx);
        const __m256 bv = _mm256_set1_ps(base), ghv = _mm256_set1_ps(gh), kv = _mm256_set1_ps(k);
        const __m256 ntv = _mm256_set1_ps(-inv_t), zero = _mm256_setzero_ps();
        for (; i + 8 <= v; i += 8) {
          const __m256 u = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), cv), tv);
          const __m256 p = exp_nonpos8(_mm256_sub_ps(u, bv));
          const __m256 vv = _mm256_sub_ps(u, mxv);
          const __m256 d = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_fmadd_ps(ghv, vv, kv)), ntv);
          _mm256_storeu_ps(x + i, _mm256_and_ps(_mm256_cmp_ps(p, zero, _CMP_GT_OQ), d));
        }
      }
#endif
      for (; i < v; ++i) {
        const float u = (x[i] - c) * inv_t;
        const float p = exp_nonpos(u - base);
        x[i] = p > 0.0f ? -p * (gh * (u - mx) + k) * inv_t : 0.0f;
      }
      if (glp_p && lab) {
        const int64_t kk = lab[r];
        if (kk >= 0 && kk < v) x[kk] += glp * inv_t;
      }
      if (!(std::isfinite(c) && std::isfinite(log_s))) {  // bad row: NaN gradient
        for (int64_t j = 0; j < v; ++j) x[j] = std::numeric_limits<float>::quiet_NaN();
      }
      for (int64_t j = 0; j < v; ++j) S::store(orow, j, x[j]);
    }
  }
}

// Returns false when the dtype is not handled by this build (float16 without F16C).
bool backward(uintptr_t logits, int dtype, int64_t n, int64_t v, int64_t stride_row, double temperature,
              uintptr_t labels, uintptr_t entropy, uintptr_t stats, uintptr_t g_entropy, uintptr_t g_logprob,
              uintptr_t grad, int num_threads) {
  pybind11::gil_scoped_release release;
  if (dtype == 0) {
    backward_rows<F32, F32>(logits, n, v, stride_row, temperature, labels, entropy, stats, g_entropy,
                                 g_logprob, grad, num_threads);
  } else if (dtype == 1) {
    backward_rows<BF16, BF16>(logits, n, v, stride_row, temperature, labels, entropy, stats, g_entropy,
                                   g_logprob, grad, num_threads);
  } else {
#ifdef __F16C__
    backward_rows<F16, StoreF16>(logits, n, v, stride_row, temperature, labels, entropy, stats, g_entropy,
                                 g_logprob, grad, num_threads);
#else
    return false;
#endif
  }
  return true;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "entropy + label log-probs forward over rows (raw addresses)");
  m.def("backward", &backward, "gradient w.r.t. the logits for upstream entropy / log-prob gradients");
}
