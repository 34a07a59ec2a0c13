// All-pairs entropy-dynamics KL similarity between ragged sequences, CPU (OpenMP over rows,
// AVX2 inner loops). Semantics: heal_kernels/reference.py. With P = softmax(p'), Q = softmax(q')
// over the aligned length n (L = the long sequence, S' = the short one stretched by
// src(t) = min(floor(f32(t) * (f32(m) / f32(n))), m - 1), e = exp(x - M_seq) precomputed):
//   P = L:  KL = sum_t e_L(t) (L_t - S'_t) / Z_L + (M_S - M_L) + log(Z_S' / Z_L)
//   P = S': KL = sum_t e_S'(t) (S'_t - L_t) / Z_S' + (M_L - M_S) + log(Z_L / Z_S')
// with Z_L = sum_t e_L(t), Z_S' = sum_t e_S'(t). The per-sequence max and e are computed in Python
// (heal_kernels/ops/pairwise.py: seq_stats); this file does the O(B^2 max(m, n)) part.
//
//   pairwise(...)  fills float32 [B, B]    out[i, j] = -KL, NaN when a side is empty
//   grouped(...)   fills float32 [B, G]    per-row max over each group's eligible columns
//
// Deterministic: every pair is reduced by one thread in a fixed order; max is order-free.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct Stats {
  const float* x;        // [total + 8] values (8 floats of padding)
  const float* e;        // [total + 8] exp(x - M_seq)
  const int64_t* starts; // [B]
  const int64_t* lens;   // [B]
  const double* mx;      // [B] per-sequence max M_seq
};

constexpr int32_t kBlock = 256;  // float partial sums over blocks of t, combined in double

// KL(P || Q) for scored row i and neighbour j (both non-empty). Iterates over the long sequence's
// positions t with src(t) read from the short one: O(max(m, n)) per pair, no exp, no boundaries. Because src(t + 1) - src(t) is 0 or
// 1 (m <= n), the 8 sources of 8 consecutive t lie in [src(t0), src(t0) + 7]: one unaligned load and
// one in-register permute replace a gather (AVX2). The caller pads x / e / ex by 8 floats.
static inline double kl_pair(const Stats& st, int64_t i, int64_t j, bool short_first) {
  const int64_t mi = st.lens[i], mj = st.lens[j];
  const bool p_is_row = short_first ? (mi <= mj) : true;
  const int64_t P = p_is_row ? i : j;
  const int64_t Q = p_is_row ? j : i;
  const bool case_long = st.lens[P] >= st.lens[Q];  // P unstretched (long), Q stretched
  const int64_t L = case_long ? P : Q;
  const int64_t S = case_long ? Q : P;
  const int32_t nl = (int32_t)st.lens[L];
  const int32_t ms = (int32_t)st.lens[S];
  const float scale = (float)ms / (float)nl;
  const float* xs = st.x + st.starts[S];
  const float* es = st.e + st.starts[S];
  const float* xl = st.x + st.starts[L];
  const float* el = st.e + st.starts[L];
  const int32_t last = ms - 1;
  // acc = sum_t w_t d_t with w = e_L, d = L - S' (P long) or w = e_S', d = S' - L (P short);
  // zs = sum_t e_S'(t), zl = sum_t e_L(t), all accumulated the same way for both sides so that
  // identical sequences give exactly 0.
  double acc = 0.0, zs = 0.0, zl = 0.0;
  auto src_of = [&](int32_t t) {
    const int32_t s = (int32_t)((float)t * scale);
    return s < last ? s : last;
  };
  for (int32_t t0 = 0; t0 < nl; t0 += kBlock) {
    const int32_t t1 = std::min(nl, t0 + kBlock);
    int32_t t = t0;
    float a = 0.f, zz = 0.f, zzl = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    {
      const __m256 vscale = _mm256_set1_ps(scale);
      const __m256i vlast = _mm256_set1_epi32(last);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      __m256 va = _mm256_setzero_ps(), vz = _mm256_setzero_ps(), vzl = _mm256_setzero_ps();
      for (; t + 8 <= t1; t += 8) {
        const int32_t base = src_of(t);
        // src steps by 0 or 1, so the 8 sources fit one 8-wide window; if rounding ever made a
        // step of 2 (never seen for lengths < 20000), finish this block with the scalar loop
        if (src_of(t + 7) - base > 7) break;
        const __m256i vt = _mm256_add_epi32(_mm256_set1_epi32(t), lane);
        __m256i vsrc = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_cvtepi32_ps(vt), vscale));
        vsrc = _mm256_min_epi32(vsrc, vlast);
        const __m256i idx = _mm256_sub_epi32(vsrc, _mm256_set1_epi32(base));
        const __m256 ev = _mm256_permutevar8x32_ps(_mm256_loadu_ps(es + base), idx);
        const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + base), idx);
        const __m256 lv = _mm256_loadu_ps(xl + t);
        const __m256 elv = _mm256_loadu_ps(el + t);
        vz = _mm256_add_ps(vz, ev);
        vzl = _mm256_add_ps(vzl, elv);
        if (case_long) {
          va = _mm256_fmadd_ps(elv, _mm256_sub_ps(lv, sv), va);
        } else {
          va = _mm256_fmadd_ps(ev, _mm256_sub_ps(sv, lv), va);
        }
      }
      alignas(32) float buf[8];
      _mm256_store_ps(buf, va);
      for (int k = 0; k < 8; ++k) a += buf[k];
      _mm256_store_ps(buf, vz);
      for (int k = 0; k < 8; ++k) zz += buf[k];
      _mm256_store_ps(buf, vzl);
      for (int k = 0; k < 8; ++k) zzl += buf[k];
    }
#endif
    for (; t < t1; ++t) {
      const int32_t src = src_of(t);
      zz += es[src];
      zzl += el[t];
      a += case_long ? el[t] * (xl[t] - xs[src]) : es[src] * (xs[src] - xl[t]);
    }
    acc += a;
    zs += zz;
    zl += zzl;
  }
  if (case_long) return acc / zl + (st.mx[S] - st.mx[L]) + std::log(zs / zl);
  return acc / zs + (st.mx[L] - st.mx[S]) + std::log(zl / zs);
}

// Raw pointers come from Python (tensor.data_ptr()); the caller (heal_kernels/ops/pairwise.py)
// guarantees contiguity, dtypes and sizes. Only pybind11 is included, which keeps the first-use
// build to seconds instead of the minute torch/extension.h costs.
Stats make_stats(uintptr_t x, uintptr_t e, uintptr_t starts, uintptr_t lens, uintptr_t mx) {
  return Stats{reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(e),
               reinterpret_cast<const int64_t*>(starts), reinterpret_cast<const int64_t*>(lens),
               reinterpret_cast<const double*>(mx)};
}

// out: float32 [B, B]
void pairwise(uintptr_t x, uintptr_t e, uintptr_t starts, uintptr_t lens, uintptr_t mx,
              int64_t bsz, bool short_first, uintptr_t out, int num_threads) {
  const Stats st = make_stats(x, e, starts, lens, mx);
  float* o = reinterpret_cast<float*>(out);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  pybind11::gil_scoped_release nogil;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t i = 0; i < bsz; ++i) {
    float* row = o + i * bsz;
    if (st.lens[i] == 0) {
      for (int64_t j = 0; j < bsz; ++j) row[j] = nan;
      continue;
    }
    for (int64_t j = 0; j < bsz; ++j) {
      row[j] = st.lens[j] == 0 ? nan : (float)(-kl_pair(st, i, j, short_first));
    }
  }
}

// groups: int64 [B] in [0, G); prompt_ids: int64 [B] or 0 (none); out: float32 [B, G] filled
// with -inf by the caller.
void grouped(uintptr_t x, uintptr_t e, uintptr_t starts, uintptr_t lens, uintptr_t mx,
             int64_t bsz, bool short_first, uintptr_t groups, int64_t num_groups,
             bool exclude_self, uintptr_t prompt_ids, uintptr_t out, int num_threads) {
  const Stats st = make_stats(x, e, starts, lens, mx);
  const int64_t* g = reinterpret_cast<const int64_t*>(groups);
  const int64_t* pid = reinterpret_cast<const int64_t*>(prompt_ids);
  float* o = reinterpret_cast<float*>(out);
  pybind11::gil_scoped_release nogil;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t i = 0; i < bsz; ++i) {
    if (st.lens[i] == 0) continue;
    float* row = o + i * num_groups;
    for (int64_t j = 0; j < bsz; ++j) {
      if (exclude_self && j == i) continue;
      if (pid != nullptr && pid[j] == pid[i]) continue;
      if (st.lens[j] == 0) continue;
      const float sim = (float)(-kl_pair(st, i, j, short_first));
      float& slot = row[g[j]];
      if (sim > slot) slot = sim;
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "heal pairwise entropy-dynamics KL similarity (CPU, OpenMP); pointers from tensor.data_ptr()";
  m.def("pairwise", &pairwise, "fill float32 [B, B] with -KL (row scored)");
  m.def("grouped", &grouped, "per-row max of -KL over each group's eligible columns into float32 [B, G]");
}
