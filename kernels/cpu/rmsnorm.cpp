// RMSNorm with the residual add fused, bf16 in and out (kernels.rmsnorm's semantics: the
// add rounds to bf16, the norm runs in fp32, the normalized value rounds to bf16 before the
// weight multiplies it).
#include <omp.h>

#include <cmath>

#include "vec.h"

using baton::load8_bf16;
using baton::store8_bf16;

// out = rmsnorm(x [+ residual]) * weight; with a residual, summed = x + residual.
extern "C" void baton_rms_norm_bf16(const uint16_t* x, const uint16_t* residual,
                                    const uint16_t* weight, uint16_t* out, uint16_t* summed,
                                    int64_t rows, int64_t hidden, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 16)
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * hidden;
    uint16_t* sr = summed + r * hidden;
    __m256 sq = _mm256_setzero_ps();
    for (int64_t i = 0; i < hidden; i += 8) {
      __m256 v = load8_bf16(xr + i);
      if (residual != nullptr) {
        v = _mm256_add_ps(v, load8_bf16(residual + r * hidden + i));
        store8_bf16(sr + i, v);
        v = load8_bf16(sr + i);  // the sum as stored, rounded to bf16
      }
      sq = _mm256_fmadd_ps(v, v, sq);
    }
    const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(baton::hsum(sq) / hidden + eps));
    const uint16_t* src = residual != nullptr ? sr : xr;
    uint16_t* dst = out + r * hidden;
    for (int64_t i = 0; i < hidden; i += 8) {
      store8_bf16(dst + i, _mm256_mul_ps(load8_bf16(src + i), inv));
      store8_bf16(dst + i, _mm256_mul_ps(load8_bf16(dst + i), load8_bf16(weight + i)));
    }
  }
}
