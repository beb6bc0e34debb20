// INT4 weight-only linear for x86 CPUs with AVX2 (the "avx2" layout of kernels.int4_linear).
//
// Activations are quantized on the fly to int8 per (row, weight group) with a symmetric
// scale, as llama.cpp does with its Q8 activations, so the inner loop is integer
// multiply-adds (`vpmaddubsw`: 32 unsigned nibbles x 32 signed bytes per instruction) and
// a decode step streams 0.5 byte per weight instead of unpacking it to floats:
//
//   y[m, n] = sum_g s[n, g] * (xs[m, g] * sum_k q[n, k] xq[m, k]  -  z[n, g] * xs[m, g] * sum_k xq[m, k])
//
// Every output row is computed with the same sequence of operations whatever M is and
// whichever thread owns it, so results are batch-invariant.
#include <omp.h>

#include <algorithm>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t kBlock = 32;  // k per 16 packed bytes
constexpr int64_t kRows = 4;    // output channels sharing one pass over x
constexpr int64_t kPrefetch = 8;  // tiles

struct QuantizedX {
  std::vector<int8_t> q;       // [M, K]
  std::vector<float> scale;    // [M, K/G]
  std::vector<float> zero_dot; // [M, K/G]: scale * sum of the group's q
};

// x is fp32, or bf16 when `bf16`.
QuantizedX quantize_rows(const void* x, bool bf16, int64_t m, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  QuantizedX out{std::vector<int8_t>(m * k), std::vector<float>(m * groups),
                 std::vector<float>(m * groups)};
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      float src[512];  // group <= 512 (checked by the launcher)
      for (int64_t i = 0; i < group; ++i) {
        const int64_t at = r * k + g * group + i;
        src[i] = bf16 ? baton::bf16_to_float(static_cast<const uint16_t*>(x)[at])
                      : static_cast<const float*>(x)[at];
      }
      int8_t* dst = out.q.data() + r * k + g * group;
      float amax = 0.f;
      for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(src[i]));
      const float scale = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < group; ++i) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(src[i] * inv));
        dst[i] = static_cast<int8_t>(v);
        sum += v;
      }
      out.scale[r * groups + g] = scale;
      out.zero_dot[r * groups + g] = scale * static_cast<float>(sum);
    }
  }
  return out;
}

inline __m256i unpack_block(const uint8_t* src) {
  // Byte i of a 32-block's 16 bytes holds k = i (low nibble) and k = i + 16 (high nibble).
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// Output channels [n0, n0 + R) for every activation row. With one activation row the
// nibbles are unpacked in registers; with more they are unpacked once into `expanded`.
template <int R, bool kUnpacked>
void tile_kernel(const QuantizedX& xq, int64_t m, int64_t k, int64_t group, const uint8_t* qw,
                 const uint16_t* scales, const uint8_t* zeros, int64_t n0, void* y, bool bf16,
                 int64_t n_total, uint8_t* expanded) {
  const int64_t groups = k / group;
  const int64_t blocks_per_group = group / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = qw + (n0 + r) * (k / 2);
  if (kUnpacked) {
    for (int r = 0; r < R; ++r) {
      for (int64_t b = 0; b < k / kBlock; ++b) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(expanded + r * k + b * kBlock),
                            unpack_block(rows[r] + b * 16));
      }
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* xrow = xq.q.data() + i * k;
    __m256 acc[R];
    float zacc[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_setzero_ps();
      zacc[r] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m256i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
      for (int64_t b = 0; b < blocks_per_group; ++b) {
        const int64_t off = g * group + b * kBlock;
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrow + off));
        for (int r = 0; r < R; ++r) {
          const __m256i wv =
              kUnpacked ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(expanded + r * k + off))
                    : unpack_block(rows[r] + off / 2);
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones));
        }
      }
      if (!kUnpacked) {
        // Weights stream from memory once per step: fetch the tile kPrefetch tiles ahead
        // (the hardware prefetcher ramps up too slowly for calls this short).
        for (int r = 0; r < R; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(rows[r] + kPrefetch * R * (k / 2) + g * group / 2),
                       _MM_HINT_T0);
        }
      }
      const float xs = xq.scale[i * groups + g];
      const float xz = xq.zero_dot[i * groups + g];
      for (int r = 0; r < R; ++r) {
        const float s = baton::bf16_to_float(scales[(n0 + r) * groups + g]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_set1_ps(s * xs), acc[r]);
        zacc[r] += s * static_cast<float>(zeros[(n0 + r) * groups + g]) * xz;
      }
    }
    for (int r = 0; r < R; ++r) {
      const float v = baton::hsum(acc[r]) - zacc[r];
      const int64_t at = i * n_total + n0 + r;
      if (bf16) {
        static_cast<uint16_t*>(y)[at] = baton::float_to_bf16(v);
      } else {
        static_cast<float*>(y)[at] = v;
      }
    }
  }
}

}  // namespace

// x [M, K] and y [M, N] both fp32 or both bf16 (`bf16`); qweight [N, K/2]; scales bf16
// [N, K/G]; zeros [N, K/G]. The caller (kernels.int4_linear_cpu) checks shapes.
extern "C" void baton_int4_linear_avx2(const void* x, const uint8_t* qweight,
                                       const uint16_t* scales, const uint8_t* zeros, void* y,
                                       int bf16, int64_t m, int64_t n, int64_t k, int64_t group,
                                       int threads) {
  if (m == 0 || n == 0) return;
  const QuantizedX xq = quantize_rows(x, bf16 != 0, m, k, group);
  const int64_t tiles = (n + kRows - 1) / kRows;
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint8_t> expanded(m > 1 ? kRows * k : 0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * kRows;
      if (n - n0 < kRows) {
        for (int64_t r = n0; r < n; ++r) {
          tile_kernel<1, false>(xq, m, k, group, qweight, scales, zeros, r, y, bf16, n, nullptr);
        }
      } else if (m > 1) {
        tile_kernel<kRows, true>(xq, m, k, group, qweight, scales, zeros, n0, y, bf16, n,
                                 expanded.data());
      } else {
        tile_kernel<kRows, false>(xq, m, k, group, qweight, scales, zeros, n0, y, bf16, n, nullptr);
      }
    }
  }
}
