// Scalar and AVX2 helpers shared by heal's C++ CPU kernels (entropy.cpp, linear.cpp): dtype
// conversions and loaders, a branch-free exp for non-positive arguments, a row's max pass and its
// softmax sums. Private header: every function has internal linkage in each translation unit that
// includes it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HEAL_AVX2 1
#endif

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal half -> normal float
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while (!(mant & 0x400u));
      mant &= 0x3ffu;
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// exp(u) for u <= 0, branch-free so that the loop vectorises (no libm call): Cody-Waite
// reduction u = k ln2 + r, |r| <= ln2 / 2, degree-6 polynomial (about 2 ulp), 2^k by exponent
// bits; 0 below -87 (and for -inf).
__attribute__((always_inline)) inline float exp_nonpos(float u) {
  const float uc = u < -87.0f ? -87.0f : u;
  const float k = (uc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = uc - k * 0.693145751953125f;
  r = r - k * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  return u < -87.0f ? 0.0f : p * scale;
}

#ifdef HEAL_AVX2
// 8 lanes of exp_nonpos
inline __m256 exp_nonpos8(__m256 u) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(u, lo, _CMP_LT_OQ);  // also -inf
  const __m256 uc = _mm256_max_ps(u, lo);
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(uc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), uc);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
#endif

constexpr int64_t kSumBlock = 1024;  // float partial sums per block, double across blocks

// Element access of the logits dtypes (float16 is loaded only; its store needs F16C, see entropy.cpp).
struct F32 {
  using T = float;
  static inline float load(const float* p, int64_t i) { return p[i]; }
  static inline void store(float* p, int64_t i, float x) { p[i] = x; }
};
struct BF16 {
  using T = uint16_t;
  static inline float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
  static inline void store(uint16_t* p, int64_t i, float x) { p[i] = f32_to_bf16(x); }
};
struct F16 {
  using T = uint16_t;
  static inline float load(const uint16_t* p, int64_t i) { return f16_to_f32(p[i]); }
};

// x[0:v] = the row converted to float; returns its max (-inf for an empty or all -inf row; NaN
// entries are skipped by the max and counted in *nans).
template <class L>
inline float load_row_max(const typename L::T* row, int64_t v, float* x, int* nans) {
  float c = -std::numeric_limits<float>::infinity();
  int bad = 0;
#pragma omp simd reduction(max : c) reduction(+ : bad)
  for (int64_t i = 0; i < v; ++i) {
    const float zi = L::load(row, i);
    x[i] = zi;
    bad += zi != zi;
    c = zi > c ? zi : c;
  }
  *nans = bad;
  return c;
}

// S = sum e and M = sum e u over x[0:v], u = (x[i] - c) * inv_t (exact subtraction, then the
// scaling; u <= 0 for c the row's finite max), e = exp(u); -inf entries add 0 to both (never
// 0 * -inf). 8 independent float accumulators (one AVX register; the compiler vectorises the j-loop
// without reassociating), folded into double every kSumBlock elements.
inline void exp_sums(const float* x, int64_t v, float c, float inv_t, double* s_out, double* m_out) {
  double s = 0.0, m = 0.0;
  for (int64_t b = 0; b < v; b += kSumBlock) {
    const int64_t end = b + kSumBlock < v ? b + kSumBlock : v;
    float sb[8] = {0, 0, 0, 0, 0, 0, 0, 0}, mb[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = b;
#ifdef HEAL_AVX2
    {
      const __m256 cv = _mm256_set1_ps(c), tv = _mm256_set1_ps(inv_t), zero = _mm256_setzero_ps();
      __m256 vs = zero, vm = zero;
      for (; i + 8 <= end; i += 8) {
        const __m256 u = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), cv), tv);
        const __m256 e = exp_nonpos8(u);
        vs = _mm256_add_ps(vs, e);
        vm = _mm256_add_ps(vm, _mm256_and_ps(_mm256_cmp_ps(e, zero, _CMP_GT_OQ), _mm256_mul_ps(e, u)));
      }
      sb[0] = hsum8(vs);
      mb[0] = hsum8(vm);
    }
#endif
    for (; i + 8 <= end; i += 8) {
      for (int j = 0; j < 8; ++j) {
        const float u = (x[i + j] - c) * inv_t;
        const float e = exp_nonpos(u);  // 0 for -inf entries
        sb[j] += e;
        mb[j] += e > 0.0f ? e * u : 0.0f;
      }
    }
    for (; i < end; ++i) {
      const float u = (x[i] - c) * inv_t;
      const float e = exp_nonpos(u);
      sb[0] += e;
      mb[0] += e > 0.0f ? e * u : 0.0f;
    }
    for (int j = 0; j < 8; ++j) {
      s += sb[j];
      m += mb[j];
    }
  }
  *s_out = s;
  *m_out = m;
}

}  // namespace
