// Rotate-half RoPE, bf16 in and out, cos/sin in fp32 rounded to bf16 first as the torch
// path does; the rotation itself is computed in fp32 and rounded once.
#include <omp.h>

#include "vec.h"

using baton::load8_bf16;
using baton::store8_bf16;

// src rows of `heads * head_dim` values `src_stride` apart -> dst [tokens, heads, head_dim].
extern "C" void baton_rope_bf16(const uint16_t* src, int64_t src_stride, uint16_t* dst,
                                const float* cos, const float* sin, int64_t tokens, int64_t heads,
                                int64_t head_dim, int threads) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens > 16)
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < half; i += 8) {
      // Round cos/sin to bf16 (ties to even) as `cos.to(bfloat16)` would.
      uint16_t cb[8], sb[8];
      store8_bf16(cb, _mm256_loadu_ps(cos + t * half + i));
      store8_bf16(sb, _mm256_loadu_ps(sin + t * half + i));
      const __m256 c = load8_bf16(cb), s = load8_bf16(sb);
      for (int64_t h = 0; h < heads; ++h) {
        const uint16_t* x = src + t * src_stride + h * head_dim;
        uint16_t* y = dst + (t * heads + h) * head_dim;
        const __m256 x1 = load8_bf16(x + i), x2 = load8_bf16(x + half + i);
        store8_bf16(y + i, _mm256_fmsub_ps(x1, c, _mm256_mul_ps(x2, s)));
        store8_bf16(y + half + i, _mm256_fmadd_ps(x2, c, _mm256_mul_ps(x1, s)));
      }
    }
  }
}
