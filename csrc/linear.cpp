// heal_kernels CPU kernels of the fused linear entropy / log-prob op (heal_kernels/ops/linear.py):
// the two per-block steps between the matmuls, for one block of logits z[r, c] = hidden_chunk @
// weight_block.T (+ bias) (float32 or bfloat16, row stride, contiguous columns).
//
// block_stats: per row, x = z / T, the block's (max mb, sum exp(x - mb), sum exp(x - mb) (x - mb))
//   in one in-cache pass after a max pass (heal_simd.h: exp_sums with u = (z - max z) / T, as the
//   entropy kernel), merged into the row's running state (m, s, t, x_label)
//   (float32 [r, 4]); x_label takes x[label] when the row's label lies in this block.
//   merge: M = max(m, mb), a = exp(m - M), b = exp(mb - M),
//          s' = a s + b sb,  t' = a (t + s (m - M)) + b (tb + sb (mb - M))   (-inf states add nothing)
// block_grad: per row, in place: z <- ( -p (g_H (x - mean) + g_lp) + g_lp onehot(label) ) / T with
//   p = exp(x - lse), from the row's final (lse, mean, g_H, g_lp) (float32 [r, 4]); p = 0 entries
//   (-inf logits) get exactly 0.
// A NaN in a row makes its state NaN. Inputs are raw addresses (Python checks everything).
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
void stats_rows(uintptr_t block, int64_t n, int64_t v, int64_t stride_row, double temperature, uintptr_t labels,
                uintptr_t state, int num_threads) {
  using T = typename L::T;
  const T* z = reinterpret_cast<const T*>(block);
  const int64_t* lab = reinterpret_cast<const int64_t*>(labels);
  float* st = reinterpret_cast<float*>(state);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float ninf = -std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> buf(static_cast<size_t>(v));
    float* x = buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      const T* row = z + r * stride_row;
      float* S = st + 4 * r;
      int nans = 0;
      const float zmax = load_row_max<L>(row, v, x, &nans);
      if (lab) {
        const int64_t k = lab[r];
        if (k >= 0 && k < v) S[3] = x[k] * inv_t;
      }
      if (nans) {
        S[0] = S[1] = S[2] = nan;
        continue;
      }
      if (zmax == ninf) continue;  // the whole block row is masked: nothing to merge
      const float mb = zmax * inv_t;
      double sd = 0.0, td = 0.0;  // sum e, sum e (x - mb) with x = z / T: the entropy kernel's sums
      exp_sums(x, v, zmax, inv_t, &sd, &td);
      const float sb = static_cast<float>(sd), tb = static_cast<float>(td);
      const float m = S[0], s = S[1], t = S[2];
      if (m != m) continue;  // NaN state stays NaN
      if (m == ninf) {
        S[0] = mb;
        S[1] = sb;
        S[2] = tb;
      } else if (mb > m) {
        const float d = m - mb, a = std::exp(d);
        S[0] = mb;
        S[1] = a * s + sb;
        S[2] = a * (t + s * d) + tb;
      } else {
        const float d = mb - m, b = std::exp(d);
        S[1] = s + b * sb;
        S[2] = t + b * (tb + sb * d);
      }
    }
  }
}

template <class L>
void grad_rows(uintptr_t block, int64_t n, int64_t v, int64_t stride_row, double temperature, uintptr_t labels,
               uintptr_t coef, int num_threads) {
  using T = typename L::T;
  T* z = reinterpret_cast<T*>(block);
  const int64_t* lab = reinterpret_cast<const int64_t*>(labels);
  const float* cf = reinterpret_cast<const float*>(coef);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float nan = std::numeric_limits<float>::quiet_NaN();
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> buf(static_cast<size_t>(v));
    float* x = buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      T* row = z + r * stride_row;
      const float lse = cf[4 * r], mean = cf[4 * r + 1], gh = cf[4 * r + 2], glp = cf[4 * r + 3];
      for (int64_t i = 0; i < v; ++i) x[i] = L::load(row, i);
      int64_t i = 0;
#ifdef HEAL_AVX2
      {
        const __m256 tv = _mm256_set1_ps(inv_t), lv = _mm256_set1_ps(lse), ghv = _mm256_set1_ps(gh);
        const __m256 kv = _mm256_set1_ps(glp), mnv = _mm256_set1_ps(mean), ntv = _mm256_set1_ps(-inv_t), zero = _mm256_setzero_ps();
        for (; i + 8 <= v; i += 8) {
          const __m256 u = _mm256_mul_ps(_mm256_loadu_ps(x + i), tv);
          const __m256 p = exp_nonpos8(_mm256_sub_ps(u, lv));
          const __m256 d = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_fmadd_ps(ghv, _mm256_sub_ps(u, mnv), kv)), ntv);
          _mm256_storeu_ps(x + i, _mm256_and_ps(_mm256_cmp_ps(p, zero, _CMP_GT_OQ), d));
        }
      }
#endif
      for (; i < v; ++i) {
        const float u = x[i] * inv_t;
        const float p = exp_nonpos(u - lse);
        x[i] = p > 0.0f ? -p * (gh * (u - mean) + glp) * inv_t : 0.0f;
      }
      if (lab) {
        const int64_t kk = lab[r];
        if (kk >= 0 && kk < v) x[kk] += glp * inv_t;
      }
      if (!std::isfinite(lse) || !std::isfinite(mean)) {
        for (int64_t j = 0; j < v; ++j) x[j] = nan;
      }
      for (int64_t j = 0; j < v; ++j) L::store(row, j, x[j]);
    }
  }
}

// dtype: 0 float32, 1 bfloat16
void block_stats(uintptr_t block, int dtype, int64_t n, int64_t v, int64_t stride_row, double temperature,
                 uintptr_t labels, uintptr_t state, int num_threads) {
  pybind11::gil_scoped_release release;
  if (dtype == 0)
    stats_rows<F32>(block, n, v, stride_row, temperature, labels, state, num_threads);
  else
    stats_rows<BF16>(block, n, v, stride_row, temperature, labels, state, num_threads);
}

void block_grad(uintptr_t block, int dtype, int64_t n, int64_t v, int64_t stride_row, double temperature,
                uintptr_t labels, uintptr_t coef, int num_threads) {
  pybind11::gil_scoped_release release;
  if (dtype == 0)
    grad_rows<F32>(block, n, v, stride_row, temperature, labels, coef, num_threads);
  else
    grad_rows<BF16>(block, n, v, stride_row, temperature, labels, coef, num_threads);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_stats", &block_stats, "merge one logits block's per-row softmax statistics (raw addresses)");
  m.def("block_grad", &block_grad, "turn one logits block into its gradient in place (raw addresses)");
}
