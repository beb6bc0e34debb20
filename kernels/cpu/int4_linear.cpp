// INT4 weight-only linear for x86 CPUs with AVX2 (the "avx2" layout of kernels.int4_linear).
//
// Activations are quantized on the fly to int8 per (row, weight group) with a symmetric
// scale, as llama.cpp does with its Q8 activations, so the inner loop is integer
// multiply-adds (`vpmaddubsw`: 32 unsigned nibbles x 32 signed bytes per instruction) and
// a decode step streams 0.5 byte per weight instead of unpacking it to floats. The zero
// point is applied in integers, so each (row, channel, group) costs one float FMA:
//
//   y[m, n] = sum_g (s[g, n] * xs[m, g]) * (sum_k q[n, k] xq[m, k]  -  z[g, n] * sum_k xq[m, k])
//
// A tile is 4 output channels by RM activation rows: each 32-wide block's nibbles are
// unpacked once for the RM rows, products add up in int16 within a group (at most
// 2 * 15 * 127 = 3810 per block: 8 blocks fit under 2^15, so groups are at most 256 wide,
// which the launcher checks), and the four channels' group sums are reduced together into
// one SSE vector for the float epilogue.
//
// A row holding NaN or +-inf gives NaN in every output of that row (its int8 codes would
// be garbage), as torch gives a non-finite result there, never a finite wrong one.
// A row's result takes the same operations whatever RM, M and the thread are, so results
// are batch-invariant.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t kBlock = 32;     // k per 16 packed bytes
constexpr int kRows = 4;           // output channels of a tile
constexpr int64_t kPrefetch = 8;   // tiles ahead that the weight stream is fetched
constexpr int64_t kChunk = 16;     // tiles per scheduling unit when M > 1
constexpr int64_t kRowBlock = 32;  // activation rows per pass over a chunk
constexpr int kTileRows = 3;       // activation rows of a tile from unpacked nibbles
constexpr int64_t kExpandRows = 4;  // rows from which unpacking a tile once pays

struct QuantizedX {
  std::vector<int8_t> q;       // [M, K]
  std::vector<float> scale;    // [M, K/G]
  std::vector<int32_t> sum;    // [M, K/G]: sum of the group's q
};

inline __m256 load8(const void* x, bool bf16, int64_t at) {
  return bf16 ? baton::load8_bf16(static_cast<const uint16_t*>(x) + at)
              : _mm256_loadu_ps(static_cast<const float*>(x) + at);
}

// x is fp32, or bf16 when `bf16`; the group is a multiple of 32. Rounding is to nearest
// even (cvtps2dq in the default MXCSR mode).
QuantizedX quantize_rows(const void* x, bool bf16, int64_t m, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  QuantizedX out{std::vector<int8_t>(m * k), std::vector<float>(m * groups),
                 std::vector<int32_t>(m * groups)};
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 inf = _mm256_set1_ps(INFINITY);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t base = r * k + g * group;
      __m256 vmax = _mm256_setzero_ps();
      __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
      for (int64_t i = 0; i < group; i += 8) {
        const __m256 a = _mm256_andnot_ps(sign, load8(x, bf16, base + i));
        vmax = _mm256_max_ps(vmax, a);  // (drops a NaN: `finite` catches it)
        finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, inf, _CMP_LT_OQ));
      }
      // A NaN scale makes every product of the row NaN.
      const float amax = _mm256_movemask_ps(finite) == 0xFF ? baton::hmax(vmax) : NAN;
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t i = 0; i < group; i += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; ++j) {
          v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, bf16, base + i + 8 * j), inv));
          sum = _mm256_add_epi32(sum, v[j]);
        }
        // packs interleave 128-bit lanes; the permutation puts the 32 bytes back in order.
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                                 _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + base + i),
                            _mm256_permutevar8x32_epi32(bytes, order));
      }
      const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      const __m128i pair = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4E));
      out.scale[r * groups + g] = amax / 127.f;
      out.sum[r * groups + g] = _mm_cvtsi128_si32(_mm_add_epi32(pair, _mm_shuffle_epi32(pair, 0xB1)));
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

// Lane r = the sum of all lanes of d[r] (int16 pairs widened first).
inline __m128i group_sums(const __m256i d[kRows]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i w[kRows];
  for (int r = 0; r < kRows; ++r) w[r] = _mm256_madd_epi16(d[r], ones);
  const __m256i all = _mm256_hadd_epi32(_mm256_hadd_epi32(w[0], w[1]), _mm256_hadd_epi32(w[2], w[3]));
  return _mm_add_epi32(_mm256_castsi256_si128(all), _mm256_extracti128_si256(all, 1));
}

struct Tile {
  int64_t n0;
  int channels;  // kRows, or fewer at the end of N (their lanes past `channels` are unused)
};

// Group g's scales (as floats) and zeros (as int32) of the tile's four channels: one 8-byte
// and one 4-byte load, adjacent to the previous group's (a tail tile's missing channels
// are zero-padded in the layout).
inline void tile_params(const uint16_t* scales, const uint8_t* zeros, int64_t groups, int64_t g,
                        Tile t, __m128* s, __m128i* z) {
  const int64_t at = (t.n0 / kRows * groups + g) * kRows;
  int32_t zbytes;
  std::memcpy(&zbytes, zeros + at, sizeof zbytes);
  const __m128i sv = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + at));
  *s = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(sv), 16));
  *z = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(zbytes));
}

// The tile's nibbles as bytes in k order, one K-long row per channel.
void expand(const uint8_t* qw, int64_t k, Tile t, uint8_t* out) {
  for (int r = 0; r < kRows; ++r) {
    const uint8_t* src = qw + (t.n0 + (r < t.channels ? r : 0)) * (k / 2);
    for (int64_t b = 0; b < k / kBlock; ++b)
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + r * k + b * kBlock), unpack_block(src + b * 16));
  }
}

// Output channels [t.n0, t.n0 + t.channels) for activation rows [i0, i0 + RM). The
// nibbles come unpacked from `expanded` ([kRows, K] bytes, filled by `expand`) when it is
// given, or are unpacked in registers from the packed weight (one row: its weights are read
// once, straight from memory).
template <int RM>
void tile_kernel(const QuantizedX& xq, int64_t i0, int64_t k, int64_t group, const uint8_t* qw,
                 const uint16_t* scales, const uint8_t* zeros, Tile t, void* y, bool bf16,
                 int64_t n, const uint8_t* expanded) {
  const int64_t groups = k / group;
  const int64_t blocks_per_group = group / kBlock;
  const uint8_t* rows[kRows];
  // Missing channels of a tail tile re-read its first channel; their lanes are dropped.
  for (int r = 0; r < kRows; ++r) rows[r] = qw + (t.n0 + (r < t.channels ? r : 0)) * (k / 2);
  const int8_t* xrows[RM];
  for (int m = 0; m < RM; ++m) xrows[m] = xq.q.data() + (i0 + m) * k;
  __m128 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i dot[RM][kRows];
    for (int m = 0; m < RM; ++m)
      for (int r = 0; r < kRows; ++r) dot[m][r] = _mm256_setzero_si256();
    for (int64_t b = 0; b < blocks_per_group; ++b) {
      const int64_t off = g * group + b * kBlock;
      if (expanded != nullptr) {
        for (int r = 0; r < kRows; ++r) {
          const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(expanded + r * k + off));
          for (int m = 0; m < RM; ++m) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrows[m] + off));
            dot[m][r] = _mm256_add_epi16(dot[m][r], _mm256_maddubs_epi16(wv, xv));
          }
        }
      } else {
        __m256i wv[kRows];
        for (int r = 0; r < kRows; ++r) wv[r] = unpack_block(rows[r] + off / 2);
        for (int m = 0; m < RM; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrows[m] + off));
          for (int r = 0; r < kRows; ++r)
            dot[m][r] = _mm256_add_epi16(dot[m][r], _mm256_maddubs_epi16(wv[r], xv));
        }
      }
    }
    // The weights stream from memory on a decode step: fetch kPrefetch tiles ahead (the
    // hardware prefetcher ramps up too slowly for calls this short).
    for (int r = 0; r < kRows && expanded == nullptr; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + kPrefetch * kRows * (k / 2) + g * group / 2),
                   _MM_HINT_T0);
    __m128 s;
    __m128i z;
    tile_params(scales, zeros, groups, g, t, &s, &z);
    for (int m = 0; m < RM; ++m) {
      const int64_t at = (i0 + m) * groups + g;
      const __m128i exact = _mm_sub_epi32(group_sums(dot[m]), _mm_mullo_epi32(z, _mm_set1_epi32(xq.sum[at])));
      acc[m] = _mm_fmadd_ps(_mm_cvtepi32_ps(exact), _mm_mul_ps(s, _mm_set1_ps(xq.scale[at])), acc[m]);
    }
  }
  for (int m = 0; m < RM; ++m) {
    alignas(16) float out[kRows];
    _mm_store_ps(out, acc[m]);
    for (int r = 0; r < t.channels; ++r) {
      const int64_t at = (i0 + m) * n + t.n0 + r;
      if (bf16) {
        static_cast<uint16_t*>(y)[at] = baton::float_to_bf16(out[r]);
      } else {
        static_cast<float*>(y)[at] = out[r];
      }
    }
  }
}

}  // namespace

// x [M, K] and y [M, N] both fp32 or both bf16 (`bf16`); qweight [N, K/2]; scales bf16
// and zeros uint8 [ceil(N/4), K/G, 4]. The caller (kernels.int4_linear_cpu) checks shapes.
extern "C" void baton_int4_linear_avx2(const void* x, const uint8_t* qweight,
                                       const uint16_t* scales, const uint8_t* zeros, void* y,
                                       int bf16, int64_t m, int64_t n, int64_t k, int64_t group,
                                       int threads) {
  if (m == 0 || n == 0) return;
  const QuantizedX xq = quantize_rows(x, bf16 != 0, m, k, group);
  const int64_t tiles = (n + kRows - 1) / kRows;
  // With several rows a chunk's weights stay in cache while blocks of kRowBlock rows pass
  // over them; a single row streams each weight once, tile by tile.
  const int64_t chunk_tiles = m == 1 ? 1 : kChunk;
#pragma omp parallel num_threads(threads)
  {
    // 32-byte aligned scratch for one tile's unpacked nibbles, when enough rows share it.
    const bool expand_tiles = m >= kExpandRows;
    std::vector<uint8_t> scratch(expand_tiles ? kRows * k + 32 : 0);
    uint8_t* expanded = expand_tiles ? scratch.data() + (32 - reinterpret_cast<uintptr_t>(scratch.data()) % 32) % 32
                                     : nullptr;
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < (tiles + chunk_tiles - 1) / chunk_tiles; ++chunk) {
      const int64_t t_end = std::min(tiles, (chunk + 1) * chunk_tiles);
      for (int64_t i_block = 0; i_block < m; i_block += kRowBlock) {
        const int64_t i_end = std::min(m, i_block + kRowBlock);
        for (int64_t ti = chunk * chunk_tiles; ti < t_end; ++ti) {
          const Tile t{ti * kRows, static_cast<int>(std::min<int64_t>(kRows, n - ti * kRows))};
          if (m == 1) {
            tile_kernel<1>(xq, 0, k, group, qweight, scales, zeros, t, y, bf16, n, nullptr);
            continue;
          }
          if (expanded != nullptr) expand(qweight, k, t, expanded);
          int64_t i = i_block;
          for (; expanded != nullptr && i + kTileRows <= i_end; i += kTileRows)
            tile_kernel<kTileRows>(xq, i, k, group, qweight, scales, zeros, t, y, bf16, n, expanded);
          for (; i + 2 <= i_end; i += 2)
            tile_kernel<2>(xq, i, k, group, qweight, scales, zeros, t, y, bf16, n, expanded);
          for (; i < i_end; ++i)
            tile_kernel<1>(xq, i, k, group, qweight, scales, zeros, t, y, bf16, n, expanded);
        }
      }
    }
  }
}
