// INT8 weight-only linear (per-output-channel scales) for x86 CPUs with AVX2: the LM head.
//
// Activations are quantized to int8 per 64-wide group of a row (one scale per token cost
// SmolLM2 0.4-0.6% perplexity, per group ~0.1%), so each group's int32 dot is scaled once:
//
//   y[m, n] = s[n] * sum_g xs[m, g] * sum_{k in g} w[n, k] xq[m, k]
//
// `vpmaddubsw` multiplies unsigned by signed bytes, so it takes |xq| and w with xq's sign
// (`vpsignb`); |w|, |xq| <= 127 keep each pair sum under 2^15. Rows are computed the same
// way whatever M is and whichever thread owns them: results are batch-invariant.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGroup = 64;  // activations per int8 scale
constexpr int64_t kRows = 4;    // output channels sharing one pass over x

inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

}  // namespace

// x [M, K] and y [M, N] both fp32 or both bf16 (`bf16`); w int8 [N, K]; scales fp32 [N].
// The caller (kernels.int8_linear) checks shapes; K is a multiple of 64.
extern "C" void baton_int8_linear_avx2(const void* x, const int8_t* w, const float* scales,
                                       void* y, int bf16, int64_t m, int64_t n, int64_t k,
                                       int threads) {
  if (m == 0 || n == 0) return;
  const int64_t groups = k / kGroup;
  std::vector<int8_t> xq(m * k), xabs(m * k);
  std::vector<float> xs(m * groups);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      float row[kGroup];
      for (int64_t j = 0; j < kGroup; ++j) {
        const int64_t at = i * k + g * kGroup + j;
        row[j] = bf16 ? baton::bf16_to_float(static_cast<const uint16_t*>(x)[at])
                      : static_cast<const float*>(x)[at];
      }
      float amax = 0.f;
      bool finite = true;
      for (float v : row) {
        amax = std::max(amax, std::fabs(v));  // (drops a NaN: `finite` catches it)
        finite &= std::isfinite(v);
      }
      // A NaN or inf makes the row's outputs NaN through its scale, never finite garbage
      // (its codes are zeroed: converting a NaN to an integer is undefined).
      if (!finite) {
        amax = NAN;
        std::fill(row, row + kGroup, 0.f);
      }
      xs[i * groups + g] = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t j = 0; j < kGroup; ++j) {
        const int8_t q = static_cast<int8_t>(std::nearbyint(row[j] * inv));
        xq[i * k + g * kGroup + j] = q;
        xabs[i * k + g * kGroup + j] = static_cast<int8_t>(q < 0 ? -q : q);
      }
    }
  }
  const int64_t tiles = (n + kRows - 1) / kRows;
  const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * kRows;
    const int64_t rows = std::min(kRows, n - n0);
    const int8_t* wr[kRows];
    for (int64_t r = 0; r < kRows; ++r) wr[r] = w + (n0 + std::min(r, rows - 1)) * k;
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* xa = xabs.data() + i * k;
      const int8_t* xsgn = xq.data() + i * k;
      __m128 acc = _mm_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        __m256i dot[kRows];
        for (int64_t r = 0; r < kRows; ++r) dot[r] = _mm256_setzero_si256();
        for (int64_t b = g * kGroup; b < (g + 1) * kGroup; b += kBlock) {
          const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + b));
          const __m256i sv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xsgn + b));
          for (int64_t r = 0; r < kRows; ++r) {
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r] + b));
            const __m256i p16 = _mm256_maddubs_epi16(av, _mm256_sign_epi8(wv, sv));
            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p16, ones));
          }
        }
        const __m128 totals = _mm_cvtepi32_ps(hsum4(dot[0], dot[1], dot[2], dot[3]));
        acc = _mm_fmadd_ps(totals, _mm_set1_ps(xs[i * groups + g]), acc);
      }
      alignas(16) float dot[kRows];
      _mm_store_ps(dot, acc);
      for (int64_t r = 0; r < rows; ++r) {
        const float v = scales[n0 + r] * dot[r];
        const int64_t at = i * n + n0 + r;
        if (bf16) {
          static_cast<uint16_t*>(y)[at] = baton::float_to_bf16(v);
        } else {
          static_cast<float*>(y)[at] = v;
        }
      }
    }
  }
}
