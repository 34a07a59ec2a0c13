// All-pairs entropy-dynamics KL similarity between ragged sequences, CPU (OpenMP over rows,
// `omp simd` inner loops). Semantics: heal_kernels/reference.py; maths: the docstring of
// heal_kernels/ops/pairwise.py (segment sums over the nearest-neighbour stretch, O(min(m, n)) per
// pair, no exp per element). The per-sequence statistics are computed in Python (seq_stats) and
// passed in; this file only does the O(B^2 min(m, n)) part.
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

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct Stats {
  const float* x;        // [total]
  const float* e;        // [total] exp(x - M_seq)
  const double* gx;      // [total + 1] global prefix sums of x
  const double* ge;      // [total + 1] global prefix sums of e
  const int64_t* starts; // [B]
  const int64_t* lens;   // [B]
  const double* mx;      // [B] per-sequence max
  const double* z;       // [B] per-sequence sum e
  const double* meanp;   // [B] E_softmax[x]
};

// First long index t with floor(f32(t) * scale) >= s, scale = f32(m) / f32(n); n for s >= m.
// Candidate ceil(s * n / m) (double), then one correction step either way (see pairwise.py).
static inline int32_t boundary(int32_t s, double inv, float scale, int32_t n) {
  double q = (double)s * inv;
  int32_t cand = (int32_t)q;
  cand += ((double)cand < q) ? 1 : 0;
  int32_t prev = cand > 0 ? cand - 1 : 0;
  int32_t fprev = (int32_t)((float)prev * scale);
  cand -= (cand > 0 && fprev >= s) ? 1 : 0;
  int32_t fc = (int32_t)((float)cand * scale);
  cand += (fc < s) ? 1 : 0;
  return cand < n ? cand : n;
}

// KL(P || Q) for scored row i and neighbour j (both non-empty).
static inline double kl_pair(const Stats& st, int64_t i, int64_t j, bool short_first) {
  const int64_t mi = st.lens[i], mj = st.lens[j];
  const bool p_is_row = short_first ? (mi <= mj) : true;
  const int64_t P = p_is_row ? i : j;
  const int64_t Q = p_is_row ? j : i;
  const bool case_long = st.lens[P] >= st.lens[Q];  // P unstretched, Q stretched
  const int64_t L = case_long ? P : Q;
  const int64_t S = case_long ? Q : P;
  const int32_t nl = (int32_t)st.lens[L];
  const int32_t ms = (int32_t)st.lens[S];
  const float scale = (float)ms / (float)nl;
  const double inv = (double)nl / (double)ms;
  const float* xs = st.x + st.starts[S];
  const float* es = st.e + st.starts[S];
  const double zl = st.z[L];
  double acc = 0.0, zs = 0.0;
  if (case_long) {
    const double* g = st.ge + st.starts[L];
#pragma omp simd reduction(+ : acc, zs)
    for (int32_t s = 0; s < ms; ++s) {
      const int32_t b0 = boundary(s, inv, scale, nl);
      const int32_t b1 = boundary(s + 1, inv, scale, nl);
      const double seg = g[b1] - g[b0];
      zs += (double)(b1 - b0) * (double)es[s];
      acc += (double)xs[s] * seg;
    }
    return st.meanp[L] - acc / zl + (st.mx[S] - st.mx[L]) + std::log(zs / zl);
  }
  const double* g = st.gx + st.starts[L];
#pragma omp simd reduction(+ : acc, zs)
  for (int32_t s = 0; s < ms; ++s) {
    const int32_t b0 = boundary(s, inv, scale, nl);
    const int32_t b1 = boundary(s + 1, inv, scale, nl);
    const double c = (double)(b1 - b0);
    const double seg = g[b1] - g[b0];
    const double ev = (double)es[s];
    zs += c * ev;
    acc += ev * (c * (double)xs[s] - seg);
  }
  return acc / zs + (st.mx[L] - st.mx[S]) + std::log(zl / zs);
}

// Raw pointers come from Python (tensor.data_ptr()); the caller (heal_kernels/ops/pairwise.py)
// guarantees contiguity, dtypes and sizes. Only pybind11 is included, which keeps the first-use
// build to seconds instead of the minute torch/extension.h costs.
Stats make_stats(uintptr_t x, uintptr_t e, uintptr_t gx, uintptr_t ge, uintptr_t starts,
                 uintptr_t lens, uintptr_t mx, uintptr_t z, uintptr_t meanp) {
  return Stats{reinterpret_cast<const float*>(x),      reinterpret_cast<const float*>(e),
               reinterpret_cast<const double*>(gx),    reinterpret_cast<const double*>(ge),
               reinterpret_cast<const int64_t*>(starts), reinterpret_cast<const int64_t*>(lens),
               reinterpret_cast<const double*>(mx),    reinterpret_cast<const double*>(z),
               reinterpret_cast<const double*>(meanp)};
}

// out: float32 [B, B]
void pairwise(uintptr_t x, uintptr_t e, uintptr_t gx, uintptr_t ge, uintptr_t starts,
              uintptr_t lens, uintptr_t mx, uintptr_t z, uintptr_t meanp, int64_t bsz,
              bool short_first, uintptr_t out, int num_threads) {
  const Stats st = make_stats(x, e, gx, ge, starts, lens, mx, z, meanp);
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
void grouped(uintptr_t x, uintptr_t e, uintptr_t gx, uintptr_t ge, uintptr_t starts,
             uintptr_t lens, uintptr_t mx, uintptr_t z, uintptr_t meanp, int64_t bsz,
             bool short_first, uintptr_t groups, int64_t num_groups, bool exclude_self,
             uintptr_t prompt_ids, uintptr_t out, int num_threads) {
  const Stats st = make_stats(x, e, gx, ge, starts, lens, mx, z, meanp);
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
