// Paged decode attention (one query token per sequence), bf16 queries and cache, GQA.
//
// For each (sequence, KV head) the group's G query heads score every cached key through
// the block table (four keys at a time, so 4G independent FMA chains hide their latency),
// take a softmax in fp32, and sum the values with the G x 16 accumulators in registers;
// the output rounds to bf16 once. Each (sequence, head) is computed the same way whatever
// the batch, so results are batch-invariant.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec.h"

namespace {

using baton::load8_bf16;
using baton::store8_bf16;

struct Rows {
  std::vector<const uint16_t*> key, value;  // [len] row pointers of one (sequence, KV head)
};

constexpr int64_t kAhead = 8;  // keys

inline void prefetch_row(const uint16_t* row, int64_t dim) {
  for (int64_t byte = 0; byte < dim * 2; byte += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row) + byte, _MM_HINT_T0);
}

inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// scores[g * len + j] = q_g . k_j for the group's G heads (qf already scaled).
template <int G>
void score(const float* qf, const Rows& rows, int64_t len, int64_t dim, float* scores) {
  int64_t j = 0;
  for (; j + 4 <= len; j += 4) {
    // The rows come from DRAM (the step's weights stream through the caches between
    // layers), one block-table hop apart: fetch keys kAhead rows ahead, and the values
    // that weigh_values will read.
    for (int u = 0; u < 4; ++u) {
      if (j + kAhead + u < len) prefetch_row(rows.key[j + kAhead + u], dim);
      prefetch_row(rows.value[j + u], dim);
    }
    __m256 dot[G][4];
    for (int g = 0; g < G; ++g)
      for (int u = 0; u < 4; ++u) dot[g][u] = _mm256_setzero_ps();
    for (int64_t c = 0; c < dim; c += 8) {
      __m256 key[4];
      for (int u = 0; u < 4; ++u) key[u] = load8_bf16(rows.key[j + u] + c);
      for (int g = 0; g < G; ++g) {
        const __m256 qv = _mm256_loadu_ps(qf + g * dim + c);
        for (int u = 0; u < 4; ++u) dot[g][u] = _mm256_fmadd_ps(qv, key[u], dot[g][u]);
      }
    }
    for (int g = 0; g < G; ++g)
      _mm_storeu_ps(scores + g * len + j, hsum4(dot[g][0], dot[g][1], dot[g][2], dot[g][3]));
  }
  for (; j < len; ++j) {
    prefetch_row(rows.value[j], dim);
    for (int g = 0; g < G; ++g) {
      __m256 dot = _mm256_setzero_ps();
      for (int64_t c = 0; c < dim; c += 8)
        dot = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * dim + c), load8_bf16(rows.key[j] + c), dot);
      scores[g * len + j] = baton::hsum(dot);
    }
  }
}

// scores -> exp(score - max) in place; returns 1 / sum.
float softmax_weights(float* s, int64_t len) {
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  float top = baton::hmax(vmax);
  for (; j < len; ++j) top = std::max(top, s[j]);
  __m256 vsum = _mm256_setzero_ps();
  const __m256 vtop = _mm256_set1_ps(top);
  for (j = 0; j + 8 <= len; j += 8) {
    const __m256 e = baton::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vtop));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float total = baton::hsum(vsum);
  for (; j < len; ++j) total += (s[j] = std::exp(s[j] - top));
  return 1.f / total;
}

// out_g = norm_g * sum_j w[g * len + j] v_j, 16 dims at a time (8 for a last odd chunk).
template <int G>
void weigh_values(const float* w, const float* norm, const Rows& rows, int64_t len, int64_t dim,
                  uint16_t* const out[G]) {
  int64_t c = 0;
  for (; c + 16 <= dim; c += 16) {
    __m256 acc[G][2];
    for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const __m256 v0 = load8_bf16(rows.value[j] + c);
      const __m256 v1 = load8_bf16(rows.value[j] + c + 8);
      for (int g = 0; g < G; ++g) {
        const __m256 p = _mm256_broadcast_ss(w + g * len + j);
        acc[g][0] = _mm256_fmadd_ps(p, v0, acc[g][0]);
        acc[g][1] = _mm256_fmadd_ps(p, v1, acc[g][1]);
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m256 n = _mm256_set1_ps(norm[g]);
      store8_bf16(out[g] + c, _mm256_mul_ps(acc[g][0], n));
      store8_bf16(out[g] + c + 8, _mm256_mul_ps(acc[g][1], n));
    }
  }
  if (c < dim) {
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const __m256 v = load8_bf16(rows.value[j] + c);
      for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + g * len + j), v, acc[g]);
    }
    for (int g = 0; g < G; ++g) store8_bf16(out[g] + c, _mm256_mul_ps(acc[g], _mm256_set1_ps(norm[g])));
  }
}

template <int G>
void attend(const float* qf, const Rows& rows, int64_t len, int64_t dim, float* scores,
            uint16_t* const out[G]) {
  score<G>(qf, rows, len, dim, scores);
  float norm[G];
  for (int g = 0; g < G; ++g) norm[g] = softmax_weights(scores + g * len, len);
  weigh_values<G>(scores, norm, rows, len, dim, out);
}

// Heads of a group beyond 4 go through in slices of at most 4 (each slice is independent).
void attend_group(const float* qf, const Rows& rows, int64_t len, int64_t dim, float* scores,
                  uint16_t* const* out, int64_t group) {
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const float* q = qf + g0 * dim;
    uint16_t* const* o = out + g0;
    switch (std::min<int64_t>(4, group - g0)) {
      case 1: attend<1>(q, rows, len, dim, scores, o); break;
      case 2: attend<2>(q, rows, len, dim, scores, o); break;
      case 3: attend<3>(q, rows, len, dim, scores, o); break;
      default: attend<4>(q, rows, len, dim, scores, o); break;
    }
  }
}

}  // namespace

// q [seqs, heads, head_dim] (row r of the step holds sequence r); out the same shape.
// cache: [blocks, 2, block_size, kv_heads, head_dim] with the given block and K-to-V strides.
// head_dim is a multiple of 8 (checked by the caller).
extern "C" void baton_paged_decode_bf16(const uint16_t* q, uint16_t* out, const uint16_t* cache,
                                        int64_t block_stride, int64_t kv_stride,
                                        const int32_t* block_tables, int64_t table_stride,
                                        const int32_t* seq_lens, int64_t seqs, int64_t heads,
                                        int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                        float scale, int threads) {
  const int64_t group = heads / kv_heads;
  const int64_t slot = kv_heads * head_dim;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores, qf(group * head_dim);
    std::vector<uint16_t*> outs(group);
    Rows rows;
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < seqs; ++b) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t len = seq_lens[b];
        scores.resize(group * len);
        rows.key.resize(len);
        rows.value.resize(len);
        for (int64_t j = 0; j < len; ++j) {
          const int64_t block = block_tables[b * table_stride + j / block_size];
          rows.key[j] = cache + block * block_stride + (j % block_size) * slot + h * head_dim;
          rows.value[j] = rows.key[j] + kv_stride;
          if (j < kAhead) prefetch_row(rows.key[j], head_dim);
        }
        for (int64_t g = 0; g < group; ++g) {
          const uint16_t* qh = q + (b * heads + h * group + g) * head_dim;
          for (int64_t c = 0; c < head_dim; c += 8)
            _mm256_storeu_ps(&qf[g * head_dim + c], _mm256_mul_ps(load8_bf16(qh + c), _mm256_set1_ps(scale)));
          outs[g] = out + (b * heads + h * group + g) * head_dim;
        }
        attend_group(qf.data(), rows, len, head_dim, scores.data(), outs.data(), group);
      }
    }
  }
}
