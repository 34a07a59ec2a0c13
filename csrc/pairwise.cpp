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

constexpr int32_t kBlock = 512;  // float partial sums over blocks of t, folded into double
// Pairs are visited in tiles of kRowBlock rows x kColBlock columns (a thread owns a row block), so
// a tile's sequences stay in L2 while every row of the block meets them.
constexpr int64_t kRowBlock = 8;
constexpr int64_t kColBlock = 8;

// The sums of one pair: acc = sum_t w_t (L_t - S'_t) with w = e_L (P long, kCaseLong) or w = e_S'
// (P short); zs = sum_t e_S'(t), zl = sum_t e_L(t), accumulated the same way for both sides so that
// identical sequences give exactly 0. Float partial sums over blocks of kBlock positions are
// folded into double accumulators.
template <bool kCaseLong>
static inline void kl_sums(const float* __restrict xs, const float* __restrict es,
                           const float* __restrict xl, const float* __restrict el, int32_t nl,
                           int32_t ms, double& acc_out, double& zs_out, double& zl_out) {
  const bool case_long = kCaseLong;
  const float scale = (float)ms / (float)nl;
  const int32_t last = ms - 1;
  double acc = 0.0, zs = 0.0, zl = 0.0;
  auto src_of = [&](int32_t t) {
    const int32_t s = (int32_t)((float)t * scale);
    return s < last ? s : last;
  };
  auto scalar_range = [&](int32_t ta, int32_t tb, float& a, float& zz, float& zzl) {
    for (int32_t t = ta; t < tb; ++t) {
      const int32_t src = src_of(t);
      zz += es[src];
      zzl += el[t];
      a += (case_long ? el[t] : es[src]) * (xl[t] - xs[src]);
    }
  };
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256i vlast = _mm256_set1_epi32(last);
  const __m256 lanef = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  const __m256i seven = _mm256_set1_epi32(7);
  __m256d dacc = _mm256_setzero_pd(), dzs = _mm256_setzero_pd(), dzl = _mm256_setzero_pd();
  auto fold = [](__m256d d, __m256 f) {
    d = _mm256_add_pd(d, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
    return _mm256_add_pd(d, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
  };
#endif
  for (int32_t t0 = 0; t0 < nl; t0 += kBlock) {
    const int32_t t1 = std::min(nl, t0 + kBlock);
    int32_t t = t0;
    float a = 0.f, zz = 0.f, zzl = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 va0 = _mm256_setzero_ps(), va1 = _mm256_setzero_ps();
    __m256 vz0 = _mm256_setzero_ps(), vz1 = _mm256_setzero_ps();
    __m256 vl0 = _mm256_setzero_ps(), vl1 = _mm256_setzero_ps();
    // 8 positions: src steps by 0 or 1, so their sources fit one 8-wide window starting at
    // src(t): an unaligned load + an in-register permute replace a gather. Should rounding ever
    // make a step of 2 (never seen for lengths < 20000), those 8 positions go the scalar way.
#define HEAL_KL_STEP(TT, VA, VZ, VL)                                                        \
  {                                                                                         \
    const __m256 vt = _mm256_add_ps(_mm256_set1_ps((float)(TT)), lanef);                    \
    __m256i vsrc = _mm256_cvttps_epi32(_mm256_mul_ps(vt, vscale));                          \
    vsrc = _mm256_min_epi32(vsrc, vlast);                                                   \
    const int32_t base = _mm256_cvtsi256_si32(vsrc);                                        \
    const __m256i idx = _mm256_sub_epi32(vsrc, _mm256_set1_epi32(base));                    \
    if (__builtin_expect(_mm256_movemask_epi8(_mm256_cmpgt_epi32(idx, seven)) != 0, 0)) {   \
      scalar_range(TT, TT + 8, a, zz, zzl);                                                 \
    } else {                                                                                \
      const __m256 ev = _mm256_permutevar8x32_ps(_mm256_loadu_ps(es + base), idx);          \
      const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + base), idx);          \
      const __m256 lv = _mm256_loadu_ps(xl + (TT));                                         \
      const __m256 elv = _mm256_loadu_ps(el + (TT));                                        \
      VZ = _mm256_add_ps(VZ, ev);                                                           \
      VL = _mm256_add_ps(VL, elv);                                                          \
      VA = _mm256_fmadd_ps(case_long ? elv : ev, _mm256_sub_ps(lv, sv), VA);                \
    }                                                                                       \
  }
    for (; t + 16 <= t1; t += 16) {
      HEAL_KL_STEP(t, va0, vz0, vl0)
      HEAL_KL_STEP(t + 8, va1, vz1, vl1)
    }
    if (t + 8 <= t1) {
      HEAL_KL_STEP(t, va0, vz0, vl0)
      t += 8;
    }
#undef HEAL_KL_STEP
    dacc = fold(fold(dacc, va0), va1);
    dzs = fold(fold(dzs, vz0), vz1);
    dzl = fold(fold(dzl, vl0), vl1);
#endif
    scalar_range(t, t1, a, zz, zzl);
    acc += a;
    zs += zz;
    zl += zzl;
  }
#if defined(__AVX2__) && defined(__FMA__)
  alignas(32) double buf[4];
  _mm256_store_pd(buf, dacc);
  acc += (buf[0] + buf[1]) + (buf[2] + buf[3]);
  _mm256_store_pd(buf, dzs);
  zs += (buf[0] + buf[1]) + (buf[2] + buf[3]);
  _mm256_store_pd(buf, dzl);
  zl += (buf[0] + buf[1]) + (buf[2] + buf[3]);
#endif
  acc_out = acc;
  zs_out = zs;
  zl_out = zl;
}

// KL(P || Q) for scored row i and neighbour j (both non-empty). Iterates over the long sequence's
// positions t with src(t) read from the short one: O(max(m, n)) per pair, no exp, no boundaries.
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
  const float* xs = st.x + st.starts[S];
  const float* es = st.e + st.starts[S];
  const float* xl = st.x + st.starts[L];
  const float* el = st.e + st.starts[L];
  double acc, zs, zl;
  if (case_long) {
    kl_sums<true>(xs, es, xl, el, nl, ms, acc, zs, zl);
    return acc / zl + (st.mx[S] - st.mx[L]) + std::log(zs / zl);
  }
  kl_sums<false>(xs, es, xl, el, nl, ms, acc, zs, zl);
  return -acc / zs + (st.mx[L] - st.mx[S]) + std::log(zl / zs);
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
  const int64_t nrb = (bsz + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t rb = 0; rb < nrb; ++rb) {
    const int64_t i0 = rb * kRowBlock, i1 = std::min(bsz, i0 + kRowBlock);
    for (int64_t j0 = 0; j0 < bsz; j0 += kColBlock) {
      const int64_t j1 = std::min(bsz, j0 + kColBlock);
      for (int64_t i = i0; i < i1; ++i) {
        float* row = o + i * bsz;
        for (int64_t j = j0; j < j1; ++j) {
          row[j] = (st.lens[i] == 0 || st.lens[j] == 0) ? nan : (float)(-kl_pair(st, i, j, short_first));
        }
      }
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
  const int64_t nrb = (bsz + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t rb = 0; rb < nrb; ++rb) {
    const int64_t i0 = rb * kRowBlock, i1 = std::min(bsz, i0 + kRowBlock);
    for (int64_t j0 = 0; j0 < bsz; j0 += kColBlock) {
      const int64_t j1 = std::min(bsz, j0 + kColBlock);
      for (int64_t i = i0; i < i1; ++i) {
        if (st.lens[i] == 0) continue;
        float* row = o + i * num_groups;
        for (int64_t j = j0; j < j1; ++j) {
          if (exclude_self && j == i) continue;
          if (pid != nullptr && pid[j] == pid[i]) continue;
          if (st.lens[j] == 0) continue;
          const float sim = (float)(-kl_pair(st, i, j, short_first));
          float& slot = row[g[j]];
          if (sim > slot) slot = sim;
        }
      }
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "heal pairwise entropy-dynamics KL similarity (CPU, OpenMP); pointers from tensor.data_ptr()";
  m.def("pairwise", &pairwise, "fill float32 [B, B] with -KL (row scored)");
  m.def("grouped", &grouped, "per-row max of -KL over each group's eligible columns into float32 [B, G]");
}
