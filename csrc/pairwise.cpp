// All-pairs entropy-dynamics KL similarity between ragged sequences, CPU (OpenMP, AVX2).
// Semantics: heal_kernels/reference.py (DESIGN.md 3.2). For a pair with L the long sequence (length n)
// and S' the short one (length m) stretched by src(t) = min(floor(f32(t) * (f32(m) / f32(n))), m - 1),
// e = exp(x - M_seq) (float64, M_seq the sequence's max; computed here), P = softmax(p'),
// Q = softmax(q') over the n aligned positions:
//   P = L:  KL = sum_t e_L(t) (L_t - S'_t) / Z_L + (M_S - M_L) + log(Z_S' / Z_L)
//   P = S': KL = sum_t e_S'(t) (S'_t - L_t) / Z_S' + (M_L - M_S) + log(Z_L / Z_S')
// with Z_L = sum_t e_L(t), Z_S' = sum_t e_S'(t).
//
// Run-length form (m < n): O(m) per pair. src is non-decreasing, so seg(s) = {t : src(t) = s} is the
// range [b_s, b_{s+1}): b_0 = 0, b_m = n and b_k (0 < k < m) = the smallest t with
// f32(f32(t) * scale) >= k, float32 rounding included (BoundaryRule: computed exactly in integers,
// the float32 product evaluated only where it can matter). With the long side's float64 prefix sums
// PE[t] = sum_{u<t} e_u, PX[t] = sum_{u<t} x_u, every sum over t becomes a sum over the segments
// (c_s = b_{s+1} - b_s, dPE_s = PE[b_{s+1}] - PE[b_s], ...), here summed by parts over the m + 1
// boundaries (x_{-1} = x_m = 0 on the short side):
//   Z_S'            = sum_s c_s e_s      = sum_{k=0..m} b_k     (e_{k-1} - e_k)
//   sum_s x_s dPE_s                      = sum_{k=0..m} PE[b_k] (x_{k-1} - x_k)
//   sum_s e_s dPX_s                      = sum_{k=0..m} PX[b_k] (e_{k-1} - e_k)
//   sum_s c_s e_s x_s                    = sum_{k=0..m} b_k     (e_{k-1} x_{k-1} - e_k x_k)
//   acc(P = L)  = sum_t e_L (L - S')  = EX_L - (2nd line)   (EX_L = sum_t e_L(t) x_L(t))
//   acc(P = S') = sum_t e_S' (L - S') = (3rd line) - (4th line)
// One pass over the boundaries gives both directions of the pair, KL(S'||L) and KL(L||S'): per
// boundary 4 float64 FMAs, one 16-byte load of (PE, PX) at b_k and the short side's differences from a
// per-sequence table (prepare); no exp, one log per pair. Equal lengths (src(t) = t) use the direct
// O(n) form in float64, so identical sequences give exactly 0; lengths >= 2^22 (past the boundary
// proof's range; not met in practice) use a scalar direct form. Against the float64 reference the
// results agree to the float32 output's rounding (~6e-8 relative) up to 65,536 tokens.
//
//   pairwise(...)  fills float32 [B, B]           out[i, j] = -KL, NaN when a side is empty or holds a
//                                                  NaN / infinity
//   grouped(...)   fills float32 [end - begin, G]  for each scored row in [begin, end), the max over
//                  each group's eligible columns (all B of them)
//
// Work: each unordered pair once (the upper triangle of the rows asked for, in length order), by one
// thread, in cache tiles (for_pairs). The boundaries depend on the two lengths only, so a row is run
// against the columns of one length together (rl_group: boundaries, offsets and the short side's
// loads once for up to 4 long sequences); at B = 8192 with lengths U[64, 3072] a length is shared by
// ~2.7 sequences, and the share grows with the batch, since response lengths are bounded. A pair's
// value depends only on its two sequences (the same sums in a group of one or of four, one
// out-of-line finalisation; the pair oriented by length, equal lengths by index) and the group max
// is order-free (per-thread [rows, G] buffers merged by max), so every row is bit-identical whatever
// the thread count and row range, and pairwise() and grouped() agree bit for bit.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HEAL_AVX2 1
#else
#define HEAL_AVX2 0
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

// ------------------------------------------------------------------------------------------------
// inputs and the per-sequence tables
// ------------------------------------------------------------------------------------------------

struct Stats {
  const float* x;         // [total] values (from Python)
  const int64_t* starts;  // [B] (from Python)
  const int64_t* lens;    // [B] (from Python)
  const double* e;        // [total] exp(x - M_seq), float64 (prepare)
  const double* mx;       // [B] M_seq, the sequence's max; 0 when empty (prepare)
};

// Sequences this long or longer use the direct form (the boundary rule's proof needs n < 2^22).
constexpr int64_t kRunLengthMaxLen = int64_t(1) << 22;

struct FreeDeleter {
  void operator()(double* p) const { std::free(p); }
};

static double* alloc_doubles(size_t n) {
  const size_t bytes = std::max<size_t>(64, (n * sizeof(double) + 4095) / 4096 * 4096);
  void* p = std::aligned_alloc(4096, bytes);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= (size_t(4) << 20)) madvise(p, bytes, MADV_HUGEPAGE);  // fewer page faults and TLB misses
#endif
  return static_cast<double*>(p);
}

// Per sequence b (length n): mx[b] = M_seq, e[starts[b] + t] = exp(x_t - M_seq) (float64),
// ex[b] = sum_t e_t x_t, and the slots base[b] .. base[b + 1] - 1, round_up(n + 1, 4) of them (base[b]
// a multiple of 4):
//   P[2 (base + t) + {0, 1}] = PE[t], PX[t]                                   t in [0, n]  (long side)
//   D: per 4 slots, 12 doubles [dx x4 | de x4 | dex x4]; slot base + k holds x_{k-1} - x_k,
//      e_{k-1} - e_k, e_{k-1} x_{k-1} - e_k x_k (x_{-1} = x_n = 0)             k in [0, n]  (short side)
// zero in the remaining slots: 48 bytes per token in all. One pass per sequence, sequences in parallel.
struct Prep {
  std::vector<int64_t> base;
  std::vector<double> ex, mx;
  std::vector<uint8_t> bad;  // [B] the sequence holds a NaN or an infinity
  std::unique_ptr<double, FreeDeleter> P, D, e;
};

static void prepare(Stats& st, int64_t bsz, int num_threads, Prep& pr) {
  pr.base.resize(bsz + 1);
  pr.ex.assign(bsz, 0.0);
  pr.mx.assign(bsz, 0.0);
  pr.bad.assign(bsz, 0);
  int64_t total = 0;
  for (int64_t b = 0; b < bsz; ++b) total = std::max(total, st.starts[b] + st.lens[b]);
  pr.e.reset(alloc_doubles((size_t)total));
  st.e = pr.e.get();
  st.mx = pr.mx.data();
  int64_t slots = 0;
  for (int64_t b = 0; b < bsz; ++b) {
    pr.base[b] = slots;
    slots += (st.lens[b] + 1 + 3) / 4 * 4;
  }
  pr.base[bsz] = slots;
  pr.P.reset(alloc_doubles(2 * (size_t)slots));
  pr.D.reset(alloc_doubles(3 * (size_t)slots));
  double* P = pr.P.get();
  double* D = pr.D.get();
#pragma omp parallel for schedule(dynamic, 8) num_threads(num_threads)
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t n = st.lens[b];
    const float* x = st.x + st.starts[b];
    double* e = pr.e.get() + st.starts[b];
    float xmax = n > 0 ? x[0] : 0.0f;
    bool bad = false;
    for (int64_t t = 0; t < n; ++t) {
      xmax = std::max(xmax, x[t]);
      bad |= !std::isfinite(x[t]);
    }
    pr.bad[b] = bad;
    const double M = (double)xmax;
    pr.mx[b] = M;
    for (int64_t t = 0; t < n; ++t) e[t] = std::exp((double)x[t] - M);
    const int64_t ns = pr.base[b + 1] - pr.base[b];
    double* p = P + 2 * pr.base[b];
    double* d = D + 3 * pr.base[b];
    double pe = 0.0, px = 0.0, ex = 0.0;
    double xp = 0.0, ep = 0.0, exp_prev = 0.0;  // x, e, e x at k - 1
    for (int64_t j = 0; j < ns / 4; ++j) {
      double* blk = d + 12 * j;
      for (int l = 0; l < 4; ++l) {
        const int64_t k = 4 * j + l;
        const bool in = k < n;
        const double xk = in ? (double)x[k] : 0.0;
        const double ek = in ? e[k] : 0.0;
        const double exk = ek * xk;
        const bool live = k <= n;
        blk[l] = live ? xp - xk : 0.0;
        blk[4 + l] = live ? ep - ek : 0.0;
        blk[8 + l] = live ? exp_prev - exk : 0.0;
        p[2 * k] = live ? pe : 0.0;
        p[2 * k + 1] = live ? px : 0.0;
        pe += ek;
        px += xk;
        ex += exk;
        xp = xk;
        ep = ek;
        exp_prev = exk;
      }
    }
    pr.ex[b] = ex;
  }
}

// ------------------------------------------------------------------------------------------------
// segment boundaries
// ------------------------------------------------------------------------------------------------
//
// For 0 < m < n < 2^22 and scale = f32(f32(m) / f32(n)), let P(t) := f32(f32(t) * scale) >= k.
// P is monotone in t (rounding is monotone) and, for 0 <= k < m, b_k = the smallest t >= 0 with
// P(t) (then b_k <= n). Let q = k / scale (real). (a) t >= q implies t * scale >= k, hence P(t)
// (k is a float). (b) P(t) implies t * scale >= k - h, h = half the float gap below k <= k 2^-24,
// so t >= q - q 2^-24 > q - 1. Hence b_k is ceil(q) or ceil(q) - 1, the latter iff P(ceil(q) - 1).
// q is exact in integers: scale = M 2^-E (M < 2^24 its significand) and 2^E = Q M + R give
// q = k Q + (k R) / M, whole = floor(q) = k Q + floor(k R / M), rem = (k R) mod M (Bound8 steps
// them 8 k at a time). rem == 0: q is an integer and b_k = q ((b): q - 1 < q - q 2^-24 fails P). rem > 0:
// ceil(q) = whole + 1, and P(whole) needs q - whole = rem / M <= q 2^-24 < n 2^-24 (1 + 2^-23)
// (q < n (1 + 2^-23) for k < m), i.e. rem <= thr: only those lanes (a fraction ~n 2^-24) evaluate
// P(whole) with the float32 product itself; the others take whole + 1. For k = m, q > n - 1 and
// P(n - 1) is false, so the rule gives >= n: clamped to n (as are padding lanes k > m), b_m = n.

struct BoundaryRule {
  int32_t m, n;
  float scf;        // f32(m) / f32(n)
  int32_t M;        // scale = M 2^-E, 2^23 <= M < 2^24
  int32_t Q, R;     // 2^E = Q M + R
  int32_t Q8, R8;   // 8 R = Q8 M + R8
  int32_t thr;      // 0 < rem <= thr: evaluate P(whole)
  BoundaryRule(int32_t m_, int32_t n_) : m(m_), n(n_) {
    scf = (float)m / (float)n;
    uint32_t bits;
    std::memcpy(&bits, &scf, sizeof bits);
    M = (int32_t)((bits & 0x7fffffu) | 0x800000u);  // scf is normal: 2^-22 < scf < 1
    const int E = 150 - (int)(bits >> 23);          // scf = M 2^-E, E in [24, 45]
    const int64_t p = int64_t(1) << E;
    // floor(p / M) from a double division: the quotient (< 2^23) is an integer or at least
    // 1 / M > 2^-24 away from one, far more than the division's rounding error (< 2^-29)
    Q = (int32_t)((double)p / (double)M);
    R = (int32_t)(p - (int64_t)Q * M);
    Q8 = (int32_t)(8.0 * (double)R / (double)M);  // exact floor, as above (8 R < 2^27)
    R8 = 8 * R - Q8 * M;
    thr = (int32_t)((double)M * (double)n * 0x1p-24 * (1.0 + 0x1p-22)) + 1;
  }
  inline bool pred(int32_t t, int32_t k) const {
    const float prod = (float)t * scf;  // one float32 rounding, as F.interpolate
    return prod >= (float)k;
  }
  // b_k from whole = floor(q), rem = (k R) mod M; exact for 0 <= k < m, >= n for k = m; not clamped
  inline int32_t resolve(int32_t k, int32_t whole, int32_t rem) const {
    if (rem == 0) return whole;
    if (rem > thr) return whole + 1;
    return pred(whole, k) ? whole : whole + 1;
  }
  // the scalar rule, clamped to n: b_k for 0 <= k <= m
  inline int32_t scalar(int32_t k) const {
    const int64_t kr = (int64_t)k * R;
    return std::min(resolve(k, (int32_t)((int64_t)k * Q + kr / M), (int32_t)(kr % M)), n);
  }
};

#if HEAL_AVX2
// (v0 + v1) + (v2 + v3), in registers
static inline double hsum4(__m256d v) {
  const __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
  const __m128d s01 = _mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)), s23 = _mm_add_sd(hi, _mm_unpackhi_pd(hi, hi));
  return _mm_cvtsd_f64(_mm_add_sd(s01, s23));
}

// The 8 lanes k = k0 .. k0 + 7 (k0 = 0, 8, 16, ...) carry c = ceil(q) and r = c M - k 2^E, the distance
// to it in units of 1 / M (r = M - rem for rem > 0, 0 for rem == 0). Then b_k = c, except on lanes with
// r >= M - thr (i.e. 0 < rem <= thr), which evaluate P(c - 1): one compare per 8 boundaries.
struct Bound8 {
  __m256i c, r;
  __m256i vstep, vR8, vM, vflag;
  int32_t k0;
  explicit Bound8(const BoundaryRule& br) : k0(0) {
    // lane l: l R = w M + rem with w in [0, 8): three conditional subtractions (in registers; a
    // vector load of lanes stored one by one would stall on store forwarding)
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i one = _mm256_set1_epi32(1);
    __m256i rem = _mm256_mullo_epi32(lane, _mm256_set1_epi32(br.R));
    __m256i w = _mm256_mullo_epi32(lane, _mm256_set1_epi32(br.Q));
    for (int sh = 2; sh >= 0; --sh) {
      const __m256i mm = _mm256_set1_epi32(br.M << sh);
      const __m256i ge = _mm256_cmpgt_epi32(rem, _mm256_sub_epi32(mm, one));  // rem >= M 2^sh
      rem = _mm256_sub_epi32(rem, _mm256_and_si256(ge, mm));
      w = _mm256_sub_epi32(w, _mm256_slli_epi32(ge, sh));  // + 2^sh
    }
    const __m256i pos = _mm256_cmpgt_epi32(rem, _mm256_setzero_si256());
    vM = _mm256_set1_epi32(br.M);
    c = _mm256_sub_epi32(w, pos);                              // whole + (rem > 0)
    r = _mm256_and_si256(pos, _mm256_sub_epi32(vM, rem));      // rem > 0 ? M - rem : 0
    vstep = _mm256_set1_epi32(8 * br.Q + br.Q8);
    vR8 = _mm256_set1_epi32(br.R8);
    vflag = _mm256_set1_epi32(br.M - br.thr - 1);              // r > M - thr - 1: flagged
  }
  // b_k of the current 8 lanes (not clamped); flagged: counts the blocks that evaluated P
  inline __m256i get(const BoundaryRule& br, int64_t* flagged) const {
    if (__builtin_expect(_mm256_movemask_epi8(_mm256_cmpgt_epi32(r, vflag)) != 0, 0)) {
      if (flagged) ++*flagged;
      alignas(32) int32_t cc[8], rr[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(cc), c);
      _mm256_store_si256(reinterpret_cast<__m256i*>(rr), r);
      for (int l = 0; l < 8; ++l) {
        const int32_t rem = rr[l] > 0 ? br.M - rr[l] : 0;
        cc[l] = br.resolve(k0 + l, cc[l] - (rr[l] > 0), rem);
      }
      return _mm256_load_si256(reinterpret_cast<const __m256i*>(cc));
    }
    return c;
  }
  // k += 8: k 2^E grows by (8 Q + Q8) M + R8, so r -= R8, and c grows by 8 Q + Q8, plus 1 if r went
  // negative (then r += M)
  inline void next() {
    const __m256i t = _mm256_sub_epi32(r, vR8);
    const __m256i borrow = _mm256_srai_epi32(t, 31);  // -1 where t < 0
    r = _mm256_add_epi32(t, _mm256_and_si256(borrow, vM));
    c = _mm256_sub_epi32(_mm256_add_epi32(c, vstep), borrow);
    k0 += 8;
  }
};
#endif

// ------------------------------------------------------------------------------------------------
// one pair
// ------------------------------------------------------------------------------------------------

// Run-length sums for short S (length m >= 1, its D table at ds) against K long sequences of one
// length n > m (n < 2^22; their P tables at pls[0..K)): the boundaries b_k (k = 0..m) depend on (m, n)
// only, so they, the short side's loads and Z_S', sum c e x are computed once for the K of them;
// padding lanes (k > m) read zero D entries. Per long sequence the accumulation (its two
// accumulators, FMA order, the final horizontal sums) is the same whatever K and the position in
// the group, so a pair's sums do not depend on which other sequences share its length.
//   zs = Z_S', a3 = sum c e x (shared); a1[i] = sum x dPE, a2[i] = sum e dPX (long sequence i)
template <int K>
static inline void rl_sums(const double* __restrict ds, const double* const* pls, int32_t m, int32_t n, double& zs,
                           double& a3, double* a1, double* a2) {
  const BoundaryRule br(m, n);
#if HEAL_AVX2
  Bound8 bd8(br);
  __m256d z = _mm256_setzero_pd(), s3 = z;
  __m256d A1[K], A2[K];
  const char* plc[K];
  for (int i = 0; i < K; ++i) {
    A1[i] = A2[i] = z;
    plc[i] = reinterpret_cast<const char*>(pls[i]);
  }
  const __m256i vn = _mm256_set1_epi32(n);
  const int32_t nfull = m / 8;           // blocks of 8 with every k < m: b_k <= n, no clamp
  const int32_t nall = (m + 1 + 7) / 8;  // blocks covering k = 0..m
  for (int32_t j = 0; j < nall; ++j) {
    __m256i b = bd8.get(br, nullptr);
    if (j >= nfull) b = _mm256_min_epi32(b, vn);  // the last block: k >= m clamped to n (b_m = n)
    bd8.next();
    // byte offsets 16 b_k of the (PE, PX) pairs into general registers: two per 64-bit move (fewer
    // vector-pipe operations than 8 single-lane extractions; a store and 8 reloads is slower)
    const __m256i o16 = _mm256_slli_epi32(b, 4);
    const __m128i olo = _mm256_castsi256_si128(o16), ohi = _mm256_extracti128_si256(o16, 1);
    const uint64_t q0 = (uint64_t)_mm_cvtsi128_si64(olo), q1 = (uint64_t)_mm_extract_epi64(olo, 1);
    const uint64_t q2 = (uint64_t)_mm_cvtsi128_si64(ohi), q3 = (uint64_t)_mm_extract_epi64(ohi, 1);
    const uint64_t off[8] = {(uint32_t)q0, q0 >> 32, (uint32_t)q1, q1 >> 32,
                             (uint32_t)q2, q2 >> 32, (uint32_t)q3, q3 >> 32};
    const int halves = (8 * j + 4 <= m) ? 2 : 1;  // the D table ends at round_up(m + 1, 4)
    for (int h = 0; h < halves; ++h) {
      const double* d = ds + 12 * (2 * j + h);
      const __m256d bkv = _mm256_cvtepi32_pd(h ? _mm256_extracti128_si256(b, 1) : _mm256_castsi256_si128(b));
      const __m256d dx = _mm256_load_pd(d), de = _mm256_load_pd(d + 4);
      z = _mm256_fmadd_pd(bkv, de, z);
      s3 = _mm256_fmadd_pd(bkv, _mm256_load_pd(d + 8), s3);
      for (int i = 0; i < K; ++i) {
        // 4 boundaries: gather (PE, PX) pairs, transpose to PE x4 and PX x4
        const char* base = plc[i];
        const __m256d p02 = _mm256_insertf128_pd(
            _mm256_castpd128_pd256(_mm_loadu_pd(reinterpret_cast<const double*>(base + off[4 * h]))),
            _mm_loadu_pd(reinterpret_cast<const double*>(base + off[4 * h + 2])), 1);
        const __m256d p13 = _mm256_insertf128_pd(
            _mm256_castpd128_pd256(_mm_loadu_pd(reinterpret_cast<const double*>(base + off[4 * h + 1]))),
            _mm_loadu_pd(reinterpret_cast<const double*>(base + off[4 * h + 3])), 1);
        A1[i] = _mm256_fmadd_pd(_mm256_unpacklo_pd(p02, p13), dx, A1[i]);
        A2[i] = _mm256_fmadd_pd(_mm256_unpackhi_pd(p02, p13), de, A2[i]);
      }
    }
  }
  zs = hsum4(z);
  a3 = hsum4(s3);
  for (int i = 0; i < K; ++i) {
    a1[i] = hsum4(A1[i]);
    a2[i] = hsum4(A2[i]);
  }
#else
  const int32_t nblk = (m + 1 + 3) / 4;  // boundaries k = 0..m, in blocks of 4
  double z = 0.0, s3 = 0.0, A1[K], A2[K];
  for (int i = 0; i < K; ++i) A1[i] = A2[i] = 0.0;
  for (int32_t j = 0; j < nblk; ++j) {
    const double* d = ds + 12 * j;
    for (int l = 0; l < 4; ++l) {
      const int32_t b = br.scalar(4 * j + l);  // clamped to n
      z = std::fma((double)b, d[4 + l], z);
      s3 = std::fma((double)b, d[8 + l], s3);
      for (int i = 0; i < K; ++i) {
        A1[i] = std::fma(pls[i][2 * b], d[l], A1[i]);
        A2[i] = std::fma(pls[i][2 * b + 1], d[4 + l], A2[i]);
      }
    }
  }
  zs = z;
  a3 = s3;
  for (int i = 0; i < K; ++i) a1[i] = A1[i], a2[i] = A2[i];
#endif
}

// Equal lengths n (src(t) = t): za = sum e_a, zb = sum e_b, aab = sum e_a (x_a - x_b),
// aba = sum e_b (x_b - x_a). Identical sequences: aab = aba = 0 and za == zb exactly.
static inline void direct_equal(const float* __restrict xa, const double* __restrict ea, const float* __restrict xb,
                                const double* __restrict eb, int64_t n, double& za, double& zb, double& aab,
                                double& aba) {
  int64_t t = 0;
  double sza = 0.0, szb = 0.0, sab = 0.0, sba = 0.0;
#if HEAL_AVX2
  __m256d vza = _mm256_setzero_pd(), vzb = vza, vab = vza, vba = vza;
  for (; t + 4 <= n; t += 4) {
    const __m256d ea4 = _mm256_loadu_pd(ea + t), eb4 = _mm256_loadu_pd(eb + t);
    const __m256d dd = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(xa + t)), _mm256_cvtps_pd(_mm_loadu_ps(xb + t)));
    vza = _mm256_add_pd(vza, ea4);
    vzb = _mm256_add_pd(vzb, eb4);
    vab = _mm256_fmadd_pd(ea4, dd, vab);
    vba = _mm256_fnmadd_pd(eb4, dd, vba);
  }
  sza = hsum4(vza);
  szb = hsum4(vzb);
  sab = hsum4(vab);
  sba = hsum4(vba);
#endif
  for (; t < n; ++t) {
    const double dd = (double)xa[t] - (double)xb[t];
    sza += ea[t];
    szb += eb[t];
    sab = std::fma(ea[t], dd, sab);
    sba = std::fma(-eb[t], dd, sba);
  }
  za = sza;
  zb = szb;
  aab = sab;
  aba = sba;
}

// Lengths >= kRunLengthMaxLen (not met in practice): the direct O(n) form with the float32 index rule.
// S of length m < n = L's length: acc_l = sum e_L (L - S'), acc_s = sum e_S' (L - S').
static void direct_general(const float* xs, const double* es, const float* xl, const double* el, int64_t m,
                           int64_t n, double& zs, double& zl, double& acc_l, double& acc_s) {
  const float scf = (float)m / (float)n;
  zs = zl = acc_l = acc_s = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    int64_t s = (int64_t)((float)t * scf);
    if (s > m - 1) s = m - 1;
    const double d = (double)xl[t] - (double)xs[s];
    zs += es[s];
    zl += el[t];
    acc_l = std::fma(el[t], d, acc_l);
    acc_s = std::fma(es[s], d, acc_s);
  }
}

struct Ctx {
  Stats st;
  Prep pr;
};

// The run-length pair's two KLs from its sums: one out-of-line instance (the compiler may contract
// scalar a * b + c into an FMA differently where code is inlined), so the finalisation is the same
// for every caller.
__attribute__((noinline)) static void rl_finish(const Ctx& cx, int64_t S, int64_t L, double zs, double a1, double a2,
                                                double a3, double& kl_sl, double& kl_ls) {
  const Stats& st = cx.st;
  const double zl = cx.pr.P.get()[2 * cx.pr.base[L] + 2 * st.lens[L]];  // PE[n]
  const double lr = std::log(zs / zl), dm = st.mx[S] - st.mx[L];
  kl_ls = (cx.pr.ex[L] - a1) / zl + dm + lr;
  kl_sl = -(a2 - a3) / zs - dm - lr;
}

// KL(S' || L_i) and KL(L_i || S') for the short S (length m >= 1) against K long sequences Ls[i] of one
// length n, m < n < 2^22.
template <int K>
static void rl_group(const Ctx& cx, int64_t S, const int64_t* Ls, double* kl_sl, double* kl_ls) {
  const double* pls[K];
  for (int i = 0; i < K; ++i) pls[i] = cx.pr.P.get() + 2 * cx.pr.base[Ls[i]];
  double zs, a3, a1[K], a2[K];
  rl_sums<K>(cx.pr.D.get() + 3 * cx.pr.base[S], pls, (int32_t)cx.st.lens[S], (int32_t)cx.st.lens[Ls[0]], zs, a3, a1,
             a2);
  for (int i = 0; i < K; ++i) rl_finish(cx, S, Ls[i], zs, a1[i], a2[i], a3, kl_sl[i], kl_ls[i]);
}

// KL(P_a || P_b) and KL(P_b || P_a) ("scored first": P = the first argument's softmax after the
// alignment) for non-empty a != b or a == b. The pair is oriented canonically (by length; equal
// lengths by index) before any arithmetic, and its sums and finalisation are those of a group of one
// (above), so the values depend on the two sequences only.
__attribute__((noinline)) static void pair_kl(const Ctx& cx, int64_t a, int64_t b, double& kl_ab, double& kl_ba) {
  const Stats& st = cx.st;
  const int64_t la = st.lens[a], lb = st.lens[b];
  if (la == lb) {
    const int64_t i = std::min(a, b), j = std::max(a, b);
    double zi, zj, aij, aji;
    direct_equal(st.x + st.starts[i], st.e + st.starts[i], st.x + st.starts[j], st.e + st.starts[j], la, zi, zj, aij,
                 aji);
    const double lr = std::log(zj / zi), dm = st.mx[j] - st.mx[i];
    const double kij = aij / zi + dm + lr;
    const double kji = aji / zj - dm - lr;
    kl_ab = (a == i) ? kij : kji;
    kl_ba = (a == i) ? kji : kij;
    return;
  }
  const bool a_short = la < lb;
  const int64_t S = a_short ? a : b, L = a_short ? b : a;
  const int64_t m = st.lens[S], n = st.lens[L];
  double kl_sl, kl_ls;  // KL(S' || L), KL(L || S')
  if (n < kRunLengthMaxLen) {
    rl_group<1>(cx, S, &L, &kl_sl, &kl_ls);
  } else {
    double zs, zl, acc_l, acc_s;
    direct_general(st.x + st.starts[S], st.e + st.starts[S], st.x + st.starts[L], st.e + st.starts[L], m, n, zs, zl,
                   acc_l, acc_s);
    const double lr = std::log(zs / zl), dm = st.mx[S] - st.mx[L];
    kl_ls = acc_l / zl + dm + lr;
    kl_sl = -acc_s / zs - dm - lr;
  }
  kl_ab = a_short ? kl_sl : kl_ls;
  kl_ba = a_short ? kl_ls : kl_sl;
}

// -KL for row r scored against each neighbour cs[i], and for cs[i] scored against r (s_rc[i], s_cr[i]),
// for non-empty r and cs[i] != r, the cs all of one length. Where that length exceeds r's, the group
// shares its segment boundaries and r's loads (rl_group, up to 4 at a time); the values are those of
// pair_kl, bit for bit.
static void row_sims_finite(const Ctx& cx, int64_t r, const int64_t* cs, int cnt, bool short_first, float* s_rc,
                            float* s_cr) {
  const int64_t m = cx.st.lens[r], n = cx.st.lens[cs[0]];
  if (m < n && n < kRunLengthMaxLen) {
    double k_sl[4], k_ls[4];
    for (int i0 = 0; i0 < cnt; i0 += 4) {
      const int k = std::min(4, cnt - i0);
      switch (k) {
        case 4: rl_group<4>(cx, r, cs + i0, k_sl, k_ls); break;
        case 3: rl_group<3>(cx, r, cs + i0, k_sl, k_ls); break;
        case 2: rl_group<2>(cx, r, cs + i0, k_sl, k_ls); break;
        default: rl_group<1>(cx, r, cs + i0, k_sl, k_ls); break;
      }
      for (int i = 0; i < k; ++i) {  // r is the short side: k_rc = KL(S' || L), k_cr = KL(L || S')
        s_rc[i0 + i] = (float)(-k_sl[i]);
        s_cr[i0 + i] = (float)(-(short_first ? k_sl[i] : k_ls[i]));
      }
    }
    return;
  }
  for (int i = 0; i < cnt; ++i) {
    double k_rc, k_cr;
    pair_kl(cx, r, cs[i], k_rc, k_cr);
    if (short_first && m != n) {  // KL(short || long) both ways
      const double k = m < n ? k_rc : k_cr;
      k_rc = k_cr = k;
    }
    s_rc[i] = (float)(-k_rc);
    s_cr[i] = (float)(-k_cr);
  }
}

// row_sims_finite, then NaN (one quiet NaN) for every pair with a side holding a NaN or an infinity
// (the sums of such a sequence are not used: its tables are whatever the arithmetic gave).
static void row_sims(const Ctx& cx, int64_t r, const int64_t* cs, int cnt, bool short_first, float* s_rc,
                     float* s_cr) {
  row_sims_finite(cx, r, cs, cnt, short_first, s_rc, s_cr);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const bool bad_r = cx.pr.bad[r] != 0;
  for (int i = 0; i < cnt; ++i)
    if (bad_r || cx.pr.bad[cs[i]]) s_rc[i] = s_cr[i] = nan;
}

// The grouped op's running max: NaN, once seen, stays (a non-finite similarity is never dropped, nor
// taken for "no eligible neighbour", -inf); otherwise the larger.
static inline void max_into(float& slot, float v) {
  if (std::isnan(slot)) return;
  if (std::isnan(v) || v > slot) slot = v;
}

// ------------------------------------------------------------------------------------------------
// tiles of pairs
// ------------------------------------------------------------------------------------------------

// Rows r in [rb, re) against every column c in [0, B): each unordered pair {r, c} is visited once,
// as (row, column), (r, c) with c no earlier than r in length order when both are rows (r == c
// included). visit(tid, r, cols, cnt) gets a row and up to kColBlock of its columns, all of one
// length (a run of equal lengths in length order, inside one task). Rows and columns are visited in
// length order (stable), so in a task of kRowBlock rows against kColBlock columns the rows are
// (nearly all) the shorter sides: the task touches the rows' difference tables (kept in L2) and the columns' prefix tables (~5 MB at 1.5k tokens, kept in L3).
// The column loop is outside (a column is read once per task) and tasks go column block by column
// block, so the threads share the columns.
//
// share / shares (every row scored, shares > 1): only this share's tasks, a contiguous run of the
// task list cut at equal estimated cost (pairs x (shorter length + a per-pair constant)). The
// shares together visit every unordered pair exactly once, so processes that each compute one
// share and combine their maxima with max do the work of one process, split.
constexpr int64_t kRowBlock = 8;
constexpr int64_t kColBlock = 192;
constexpr double kPairOverhead = 64.0;  // per-pair cost in tokens' worth (set-up, finalisation)

template <class F>
static void for_pairs(const int64_t* lens, int64_t bsz, int64_t rb, int64_t re, int num_threads, F&& visit,
                      int64_t share = 0, int64_t shares = 1) {
  std::vector<int64_t> order(bsz), pos(bsz), rows;
  for (int64_t i = 0; i < bsz; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lens[a] < lens[b]; });
  for (int64_t p = 0; p < bsz; ++p) pos[order[p]] = p;
  rows.reserve(re - rb);
  for (int64_t p = 0; p < bsz; ++p)
    if (order[p] >= rb && order[p] < re) rows.push_back(order[p]);
  const int64_t nr = (int64_t)rows.size();
  const bool all_rows = rb == 0 && re == bsz;  // then rows == order
  struct Task {
    int64_t r0, r1, c0, c1;  // positions in rows / in order
  };
  std::vector<Task> tasks;
  for (int64_t c0 = 0; c0 < bsz; c0 += kColBlock) {
    const int64_t c1 = std::min(bsz, c0 + kColBlock);
    for (int64_t r0 = 0; r0 < nr; r0 += kRowBlock) {
      const int64_t r1 = std::min(nr, r0 + kRowBlock);
      if (all_rows && c1 - 1 < r0) continue;  // every column sorts before every row: visited as a row
      tasks.push_back({r0, r1, c0, c1});
    }
  }
  if (shares > 1) {
    // estimated cost of each task: its visited pairs x (the mean shorter length + overhead); rows and
    // columns of a task have neighbouring lengths (both in length order), so block means suffice
    std::vector<double> cost(tasks.size());
    double total = 0.0;
    for (size_t t = 0; t < tasks.size(); ++t) {
      const Task& tk = tasks[t];
      double lr = 0.0, lc = 0.0;
      for (int64_t p = tk.r0; p < tk.r1; ++p) lr += (double)lens[rows[p]];
      for (int64_t p = tk.c0; p < tk.c1; ++p) lc += (double)lens[order[p]];
      lr /= (double)(tk.r1 - tk.r0);
      lc /= (double)(tk.c1 - tk.c0);
      double pairs = (double)(tk.r1 - tk.r0) * (double)(tk.c1 - tk.c0);
      if (tk.c0 < tk.r1 && tk.r0 < tk.c1) pairs *= 0.5;  // a diagonal task: each pair once
      cost[t] = pairs * (std::min(lr, lc) + kPairOverhead);
      total += cost[t];
    }
    // task t belongs to share floor(shares * (cost before t + half its own) / total)
    std::vector<Task> mine;
    double before = 0.0;
    for (size_t t = 0; t < tasks.size(); ++t) {
      const double mid = before + 0.5 * cost[t];
      int64_t k = total > 0.0 ? (int64_t)std::floor((double)shares * mid / total) : 0;
      k = std::min<int64_t>(shares - 1, std::max<int64_t>(0, k));
      if (k == share) mine.push_back(tasks[t]);
      before += cost[t];
    }
    tasks.swap(mine);
  }
  const int64_t nt = (int64_t)tasks.size();
#pragma omp parallel num_threads(num_threads)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    int64_t cols[kColBlock];
#pragma omp for schedule(dynamic, 1)
    for (int64_t ti = 0; ti < nt; ++ti) {
      const Task tk = tasks[ti];
      for (int64_t cs = tk.c0, ce; cs < tk.c1; cs = ce) {  // runs of columns of one length
        const int64_t n = lens[order[cs]];
        for (ce = cs + 1; ce < tk.c1 && lens[order[ce]] == n;) ++ce;
        for (int64_t rp = tk.r0; rp < tk.r1; ++rp) {
          const int64_t r = rows[rp];
          int cnt = 0;
          for (int64_t cp = cs; cp < ce; ++cp) {
            const int64_t c = order[cp];
            if (c >= rb && c < re && cp < pos[r]) continue;  // a row visited as (c, r)
            cols[cnt++] = c;
          }
          if (cnt > 0) visit(tid, r, (const int64_t*)cols, cnt);
        }
      }
    }
  }
}

static Stats make_stats(uintptr_t x, uintptr_t starts, uintptr_t lens) {
  return Stats{reinterpret_cast<const float*>(x), reinterpret_cast<const int64_t*>(starts),
               reinterpret_cast<const int64_t*>(lens), nullptr, nullptr};
}

// Raw pointers come from Python (tensor.data_ptr()); the caller (heal_kernels/ops/pairwise.py:
// _run_cpu_ext) guarantees contiguity, dtypes and sizes: x float32 [total] (a NaN or infinity makes its
// sequence's similarities NaN), starts / lens
// int64 [B]. Only pybind11 is included, which keeps the first-use build to seconds instead of the
// minute torch/extension.h costs.

// out: float32 [B, B]
void pairwise(uintptr_t x, uintptr_t starts, uintptr_t lens, int64_t bsz, bool short_first, uintptr_t out,
              int num_threads) {
  pybind11::gil_scoped_release nogil;
  num_threads = std::max(1, num_threads);
  Ctx cx;
  cx.st = make_stats(x, starts, lens);
  prepare(cx.st, bsz, num_threads, cx.pr);
  float* o = reinterpret_cast<float*>(out);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for_pairs(cx.st.lens, bsz, 0, bsz, num_threads, [&](int, int64_t r, const int64_t* cs, int cnt) {
    float s_rc[kColBlock], s_cr[kColBlock];
    int64_t nb[kColBlock];
    int k = 0;
    for (int i = 0; i < cnt; ++i) {
      const int64_t c = cs[i];
      if (cx.st.lens[r] == 0 || cx.st.lens[c] == 0) {
        o[r * bsz + c] = o[c * bsz + r] = nan;
      } else if (c == r) {
        float s, s2;
        row_sims(cx, r, &c, 1, short_first, &s, &s2);  // equal lengths: pair_kl's direct form, exactly 0
        o[r * bsz + r] = s;
      } else {
        nb[k++] = c;
      }
    }
    if (k == 0) return;
    row_sims(cx, r, nb, k, short_first, s_rc, s_cr);
    for (int i = 0; i < k; ++i) {
      o[r * bsz + nb[i]] = s_rc[i];
      o[nb[i] * bsz + r] = s_cr[i];
    }
  });
}

// groups: int64 [B] in [0, G); prompt_ids: int64 [B] or 0 (none); out: float32 [row_end - row_begin, G],
// written entirely (-inf where no column is eligible, and for empty rows; NaN where an eligible
// column's similarity is NaN: a side holding a NaN / infinity). Scored rows
// row_begin .. row_end - 1, every column a candidate neighbour.
//
// share / shares (shares > 1; then every row is scored): only this share of the unordered pairs
// (see for_pairs); out [B, G] holds partial maxima (-inf where the share saw no eligible column), and
// the element-wise max over the shares 0 .. shares - 1 is the full result, bit for bit.
void grouped(uintptr_t x, uintptr_t starts, uintptr_t lens, int64_t bsz, bool short_first, uintptr_t groups,
             int64_t num_groups, bool exclude_self, uintptr_t prompt_ids, uintptr_t out, int num_threads,
             int64_t row_begin, int64_t row_end, int64_t share, int64_t shares) {
  pybind11::gil_scoped_release nogil;
  num_threads = std::max(1, num_threads);
  shares = std::max<int64_t>(1, shares);
  if (share < 0 || share >= shares) throw std::invalid_argument("grouped: need 0 <= share < shares");
  if (shares > 1) row_begin = 0, row_end = bsz;
  row_begin = std::max<int64_t>(0, row_begin);
  row_end = std::max(row_begin, std::min(bsz, row_end));
  const int64_t nrows = row_end - row_begin;
  float* o = reinterpret_cast<float*>(out);
  const float ninf = -std::numeric_limits<float>::infinity();
  std::fill(o, o + nrows * num_groups, ninf);
  if (nrows == 0) return;
  Ctx cx;
  cx.st = make_stats(x, starts, lens);
  prepare(cx.st, bsz, num_threads, cx.pr);
  const int64_t* g = reinterpret_cast<const int64_t*>(groups);
  const int64_t* pid = reinterpret_cast<const int64_t*>(prompt_ids);
  const int64_t* len = cx.st.lens;
  std::vector<std::vector<float>> priv(num_threads, std::vector<float>(nrows * num_groups, ninf));
  for_pairs(cx.st.lens, bsz, row_begin, row_end, num_threads, [&](int tid, int64_t r, const int64_t* cs, int cnt) {
    if (len[r] == 0 || len[cs[0]] == 0) return;  // the cs are all of one length
    float* buf = priv[tid].data();
    float s_rc[kColBlock], s_cr[kColBlock];
    int64_t nb[kColBlock];
    int k = 0;
    for (int i = 0; i < cnt; ++i) {
      const int64_t c = cs[i];
      if (pid != nullptr && pid[r] == pid[c]) continue;  // symmetric: both directions ineligible
      if (c == r) {
        if (exclude_self) continue;
        float s, s2;
        row_sims(cx, r, &c, 1, short_first, &s, &s2);
        max_into(buf[(r - row_begin) * num_groups + g[r]], s);
        continue;
      }
      nb[k++] = c;
    }
    if (k == 0) return;
    row_sims(cx, r, nb, k, short_first, s_rc, s_cr);
    for (int i = 0; i < k; ++i) {
      const int64_t c = nb[i];
      max_into(buf[(r - row_begin) * num_groups + g[c]], s_rc[i]);
      if (c >= row_begin && c < row_end) max_into(buf[(c - row_begin) * num_groups + g[r]], s_cr[i]);
    }
  }, share, shares);
  for (int t = 0; t < num_threads; ++t) {
    const float* p = priv[t].data();
    for (int64_t k = 0; k < nrows * num_groups; ++k) max_into(o[k], p[k]);
  }
}

// Test entry: the segment boundaries b_0 .. b_m of the pair (m, n), 0 < m < n < 2^22, into int32
// out[m + 1], as the kernel computes them (its vector code when compiled in, else the scalar rule;
// scalar=true: the scalar rule). Returns the number of 8-lane blocks that evaluated the float32
// product (the rare path).
int64_t boundaries(int64_t m, int64_t n, uintptr_t out, bool scalar) {
  if (m < 1 || n <= m || n >= kRunLengthMaxLen) throw std::invalid_argument("boundaries: need 0 < m < n < 2^22");
  int32_t* o = reinterpret_cast<int32_t*>(out);
  const BoundaryRule br((int32_t)m, (int32_t)n);
  int64_t flagged = 0;
#if HEAL_AVX2
  if (!scalar) {
    Bound8 bd8(br);
    const __m256i vn = _mm256_set1_epi32((int32_t)n);
    for (int64_t k0 = 0; k0 <= m; k0 += 8) {
      alignas(32) int32_t b[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(b), _mm256_min_epi32(bd8.get(br, &flagged), vn));
      bd8.next();
      for (int l = 0; l < 8 && k0 + l <= m; ++l) o[k0 + l] = b[l];
    }
    return flagged;
  }
#endif
  for (int64_t k = 0; k <= m; ++k) o[k] = br.scalar((int32_t)k);
  return flagged;
}

bool simd() { return HEAL_AVX2 != 0; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "heal pairwise entropy-dynamics KL similarity (CPU, OpenMP); pointers from tensor.data_ptr()";
  m.def("pairwise", &pairwise, "fill float32 [B, B] with -KL (row scored)");
  m.def("grouped", &grouped,
        "per scored row in [row_begin, row_end): max of -KL over each group's eligible columns, float32 [rows, G]; "
        "share < shares > 1: that share of the unordered pairs, partial maxima [B, G]");
  m.def("boundaries", &boundaries, "test: segment boundaries b_0..b_m of the pair (m, n) into int32 [m + 1]");
  m.def("simd", &simd, "whether the AVX2 code is compiled in");
}
