// Paged decode attention (one query token per sequence), bf16 queries and cache, GQA.
//
// For each (sequence, KV head) the group's query heads score every cached key through the
// block table, take a softmax in fp32, and sum the values; the output rounds to bf16 once.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec.h"

using baton::load8_bf16;
using baton::store8_bf16;

// q [seqs, heads, head_dim] (row r of the step holds sequence r); out the same shape.
// cache: [blocks, 2, block_size, kv_heads, head_dim] with the given block and K-to-V strides.
extern "C" void baton_paged_decode_bf16(const uint16_t* q, uint16_t* out, const uint16_t* cache,
                                        int64_t block_stride, int64_t kv_stride,
                                        const int32_t* block_tables, int64_t table_stride,
                                        const int32_t* seq_lens, int64_t seqs, int64_t heads,
                                        int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                        float scale, int threads) {
  const int64_t group = heads / kv_heads;
  const int64_t slot = kv_heads * head_dim;
  const int64_t chunks = head_dim / 8;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores, acc(group * head_dim), qf(group * head_dim);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < seqs; ++b) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t len = seq_lens[b];
        scores.resize(group * len);
        for (int64_t g = 0; g < group; ++g) {
          const uint16_t* qh = q + (b * heads + h * group + g) * head_dim;
          for (int64_t c = 0; c < head_dim; c += 8) {
            _mm256_storeu_ps(&qf[g * head_dim + c], _mm256_mul_ps(load8_bf16(qh + c), _mm256_set1_ps(scale)));
          }
        }
        for (int64_t j = 0; j < len; ++j) {
          const int64_t block = block_tables[b * table_stride + j / block_size];
          const uint16_t* key = cache + block * block_stride + (j % block_size) * slot + h * head_dim;
          for (int64_t g = 0; g < group; ++g) {
            __m256 dot = _mm256_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c) {
              dot = _mm256_fmadd_ps(_mm256_loadu_ps(&qf[g * head_dim + c * 8]), load8_bf16(key + c * 8), dot);
            }
            scores[g * len + j] = baton::hsum(dot);
          }
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t g = 0; g < group; ++g) {
          float* s = &scores[g * len];
          const float top = *std::max_element(s, s + len);
          float total = 0.f;
          for (int64_t j = 0; j < len; ++j) total += (s[j] = std::exp(s[j] - top));
          const float norm = 1.f / total;
          for (int64_t j = 0; j < len; ++j) s[j] *= norm;
        }
        for (int64_t j = 0; j < len; ++j) {
          const int64_t block = block_tables[b * table_stride + j / block_size];
          const uint16_t* value =
              cache + block * block_stride + kv_stride + (j % block_size) * slot + h * head_dim;
          for (int64_t c = 0; c < head_dim; c += 8) {
            const __m256 v = load8_bf16(value + c);
            for (int64_t g = 0; g < group; ++g) {
              float* a = &acc[g * head_dim + c];
              _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(scores[g * len + j]), v, _mm256_loadu_ps(a)));
            }
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          uint16_t* o = out + (b * heads + h * group + g) * head_dim;
          for (int64_t c = 0; c < head_dim; c += 8) store8_bf16(o + c, _mm256_loadu_ps(&acc[g * head_dim + c]));
        }
      }
    }
  }
}
