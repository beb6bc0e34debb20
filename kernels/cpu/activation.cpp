// SwiGLU on a merged gate‖up row, bf16 in and out, computed in fp32 and rounded once.
#include <omp.h>

#include "vec.h"

using baton::load8_bf16;
using baton::store8_bf16;

// x [rows, 2 * inter] (gate ‖ up) -> out [rows, inter] = silu(gate) * up.
extern "C" void baton_silu_and_mul_bf16(const uint16_t* x, uint16_t* out, int64_t rows,
                                        int64_t inter, int threads) {
  const __m256 one = _mm256_set1_ps(1.f);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 16)
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* gate = x + r * 2 * inter;
    const uint16_t* up = gate + inter;
    for (int64_t i = 0; i < inter; i += 8) {
      const __m256 g = load8_bf16(gate + i);
      const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, baton::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
      store8_bf16(out + r * inter + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), load8_bf16(up + i)));
    }
  }
}
