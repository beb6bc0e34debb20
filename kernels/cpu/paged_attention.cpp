// Paged attention over a ragged batch, GQA: bf16 queries, a bf16 or a float8_e4m3fn cache
// (one code, templated on the cache's row type).
//
// Decode rows (one query token per sequence): for each (sequence, KV head) the group's G
// query heads score every cached key through the block table (four keys at a time, so 4G
// independent FMA chains hide their latency), take a softmax in fp32, and sum the values
// with the G x 16 accumulators in registers; the output rounds to bf16 once.
//
// Prefill chunks (several query rows of one sequence after its cached prefix): a tile of
// up to 12 query vectors (consecutive rows x the group's heads) shares every key and value
// load: each key is dotted with all of them (12 FMA chains), and each value row is
// weighed into 12 accumulators. Row r of a chunk sees the keys up to its own position.
//
// A prefill row's result is bit for bit the decode row's at its position: the same dot
// products reduced in the same order, the same softmax over its own keys, the same sums
// (a tile's keys past a row's position add weight exactly 0, and are never NaN: they are
// other rows of the same chunk). So every row's result is independent of the batch, the
// tile and the chunking (what the batch-invariant engine needs).
//
// An e4m3 cache holds K / k_scale and V / v_scale per KV head: the kernel widens the codes
// to fp32 as they are, and folds k_scale into the (already scaled) query and v_scale into
// the softmax's normalization, two multiplies an item rather than one per element. With
// power-of-two scales (engine.kv_scales) both are exact, so the result is bit for bit the
// bf16 kernel's over the dequantized cache.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "vec.h"

namespace {

using baton::load8_bf16;
using baton::store8_bf16;

// 8 cached values as fp32, by the cache's row type: bf16 or e4m3 codes.
inline __m256 load8(const uint16_t* p) { return load8_bf16(p); }
inline __m256 load8(const uint8_t* p) { return baton::load8_e4m3(p); }

template <typename T>
struct Rows {
  std::vector<const T*> key, value;  // [len] row pointers of one (sequence, KV head)
};

constexpr int64_t kAhead = 8;  // keys

template <typename T>
inline void prefetch_row(const T* row, int64_t dim) {
  for (int64_t byte = 0; byte < dim * int64_t{sizeof(T)}; byte += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row) + byte, _MM_HINT_T0);
}

inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// scores[g * len + j] = q_g . k_j for the group's G heads (qf already scaled).
template <int G, typename T>
void score(const float* qf, const Rows<T>& rows, int64_t len, int64_t dim, float* scores) {
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
      for (int u = 0; u < 4; ++u) key[u] = load8(rows.key[j + u] + c);
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
        dot = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * dim + c), load8(rows.key[j] + c), dot);
      // Reduced in hsum4's order, as the keys before it (and a prefill tile's) are.
      scores[g * len + j] = _mm_cvtss_f32(hsum4(dot, dot, dot, dot));
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
template <int G, typename T>
void weigh_values(const float* w, const float* norm, const Rows<T>& rows, int64_t len, int64_t dim,
                  uint16_t* const out[G]) {
  int64_t c = 0;
  for (; c + 16 <= dim; c += 16) {
    __m256 acc[G][2];
    for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const __m256 v0 = load8(rows.value[j] + c);
      const __m256 v1 = load8(rows.value[j] + c + 8);
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
      const __m256 v = load8(rows.value[j] + c);
      for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + g * len + j), v, acc[g]);
    }
    for (int g = 0; g < G; ++g) store8_bf16(out[g] + c, _mm256_mul_ps(acc[g], _mm256_set1_ps(norm[g])));
  }
}

// v_scale: what the cached values are multiplied by (1 for a bf16 cache).
template <int G, typename T>
void attend(const float* qf, const Rows<T>& rows, int64_t len, int64_t dim, float v_scale,
            float* scores, uint16_t* const out[G]) {
  score<G>(qf, rows, len, dim, scores);
  float norm[G];
  for (int g = 0; g < G; ++g) norm[g] = softmax_weights(scores + g * len, len) * v_scale;
  weigh_values<G>(scores, norm, rows, len, dim, out);
}

// Heads of a group beyond 4 go through in slices of at most 4 (each slice is independent).
template <typename T>
void attend_group(const float* qf, const Rows<T>& rows, int64_t len, int64_t dim, float v_scale,
                  float* scores, uint16_t* const* out, int64_t group) {
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const float* q = qf + g0 * dim;
    uint16_t* const* o = out + g0;
    switch (std::min<int64_t>(4, group - g0)) {
      case 1: attend<1>(q, rows, len, dim, v_scale, scores, o); break;
      case 2: attend<2>(q, rows, len, dim, v_scale, scores, o); break;
      case 3: attend<3>(q, rows, len, dim, v_scale, scores, o); break;
      default: attend<4>(q, rows, len, dim, v_scale, scores, o); break;
    }
  }
}

constexpr int kTile = 12;  // query vectors of a prefill tile: FMA chains in registers

// A prefill tile: NQ <= kTile query vectors (scaled, fp32, `dim` apart in qf) where vector
// n sees the first lens[n] keys of `rows`, which holds max(lens) of them. Writes out[n]
// (bf16). scores holds 4 * ceil(NQ / 4) x max(lens) floats.
template <int NQ, typename T>
void attend_tile(const float* qf, const int64_t* lens, const Rows<T>& rows, int64_t dim,
                 float v_scale, float* scores, uint16_t* const* out) {
  constexpr int kPadded = (NQ + 3) / 4 * 4;
  int64_t len = 0;
  for (int n = 0; n < NQ; ++n) len = std::max(len, lens[n]);
  for (int64_t j = 0; j < len; ++j) {
    if (j + kAhead < len) prefetch_row(rows.key[j + kAhead], dim);
    __m256 dot[kPadded];
    for (int n = 0; n < kPadded; ++n) dot[n] = _mm256_setzero_ps();
    for (int64_t c = 0; c < dim; c += 8) {
      const __m256 key = load8(rows.key[j] + c);
      for (int n = 0; n < NQ; ++n)
        dot[n] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + n * dim + c), key, dot[n]);
    }
    for (int n = 0; n < kPadded; n += 4) {
      alignas(16) float four[4];
      _mm_store_ps(four, hsum4(dot[n], dot[n + 1], dot[n + 2], dot[n + 3]));
      for (int u = 0; u < 4; ++u) scores[(n + u) * len + j] = four[u];
    }
  }
  float norm[NQ];
  for (int n = 0; n < NQ; ++n) {
    float* w = scores + n * len;
    norm[n] = softmax_weights(w, lens[n]) * v_scale;
    std::fill(w + lens[n], w + len, 0.f);  // later rows' keys: weight exactly 0
  }
  for (int64_t c = 0; c < dim; c += 8) {
    __m256 acc[NQ];
    for (int n = 0; n < NQ; ++n) acc[n] = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const __m256 v = load8(rows.value[j] + c);
      for (int n = 0; n < NQ; ++n)
        acc[n] = _mm256_fmadd_ps(_mm256_broadcast_ss(scores + n * len + j), v, acc[n]);
    }
    for (int n = 0; n < NQ; ++n) store8_bf16(out[n] + c, _mm256_mul_ps(acc[n], _mm256_set1_ps(norm[n])));
  }
}

template <typename T, int... N>
void attend_tile_of(int nq, const float* qf, const int64_t* lens, const Rows<T>& rows,
                    int64_t dim, float v_scale, float* scores, uint16_t* const* out,
                    std::integer_sequence<int, N...>) {
  ((nq == N + 1 ? attend_tile<N + 1>(qf, lens, rows, dim, v_scale, scores, out) : void()), ...);
}

// One unit of work: a decode row's KV head (rows == 1), or a prefill tile: `rows`
// consecutive query rows from `row` of sequence `seq`, heads [head0, head0 + heads) of KV
// head `kv_head`'s group.
struct Item {
  int64_t seq, row, rows, kv_head, head0, heads;
};

std::vector<Item> plan_items(const int32_t* query_start, int64_t seqs, int64_t kv_heads,
                             int64_t group) {
  std::vector<Item> items;
  // Heads per tile: the whole group where it fits, else slices of kTile.
  const int64_t slice = std::min<int64_t>(group, kTile);
  for (int64_t b = 0; b < seqs; ++b) {
    const int64_t first = query_start[b], count = query_start[b + 1] - first;
    for (int64_t h = 0; h < kv_heads; ++h) {
      if (count == 1) {
        items.push_back({b, first, 1, h, 0, group});
        continue;
      }
      const int64_t per_tile = std::max<int64_t>(1, kTile / slice);
      for (int64_t r = 0; r < count; r += per_tile)
        for (int64_t g = 0; g < group; g += slice)
          items.push_back({b, first + r, std::min(per_tile, count - r), h, g,
                           std::min(slice, group - g)});
    }
  }
  return items;
}

// q [tokens, heads, head_dim]; out the same shape. Sequence b owns query rows
// query_start[b] .. query_start[b + 1] - 1, the last positions of its seq_lens[b]-token
// context (one row: a decode); its keys are found through block_tables[b]. cache: [blocks, 2,
// block_size, kv_heads, head_dim] with the given block and K-to-V strides. head_dim is a
// multiple of 8 (checked by the caller). kv_scales: [2 (K|V), kv_heads] for an e4m3 cache,
// null for bf16.
template <typename T>
void paged_attention(const uint16_t* q, uint16_t* out, const T* cache, int64_t block_stride,
                     int64_t kv_stride, const int32_t* block_tables, int64_t table_stride,
                     const int32_t* query_start, const int32_t* seq_lens, int64_t seqs,
                     int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                     float scale, const float* kv_scales, int threads) {
  const int64_t group = heads / kv_heads;
  const int64_t slot = kv_heads * head_dim;
  const std::vector<Item> items = plan_items(query_start, seqs, kv_heads, group);
  const int64_t count = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(threads) if (count > 1)
  {
    std::vector<float> scores, qf;
    std::vector<uint16_t*> outs;
    std::vector<int64_t> lens;
    Rows<T> rows;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < count; ++i) {
      const Item& it = items[i];
      const int64_t b = it.seq, h = it.kv_head;
      // The item's last row sees the most keys: seq_lens[b] less the rows after it.
      const int64_t last_row = it.row + it.rows - 1;
      const int64_t len = seq_lens[b] - (query_start[b + 1] - 1 - last_row);
      const int64_t nq = it.rows * it.heads;
      const __m256 q_scale = _mm256_set1_ps(kv_scales ? scale * kv_scales[h] : scale);
      const float v_scale = kv_scales ? kv_scales[kv_heads + h] : 1.f;
      scores.resize(std::max<int64_t>(kTile, nq) * len);
      qf.resize(nq * head_dim);
      outs.resize(nq);
      lens.resize(nq);
      rows.key.resize(len);
      rows.value.resize(len);
      for (int64_t j = 0; j < len; ++j) {
        const int64_t block = block_tables[b * table_stride + j / block_size];
        rows.key[j] = cache + block * block_stride + (j % block_size) * slot + h * head_dim;
        rows.value[j] = rows.key[j] + kv_stride;
        if (j < kAhead) prefetch_row(rows.key[j], head_dim);
      }
      for (int64_t r = 0; r < it.rows; ++r) {
        for (int64_t g = 0; g < it.heads; ++g) {
          const int64_t n = r * it.heads + g;
          const int64_t offset = ((it.row + r) * heads + h * group + it.head0 + g) * head_dim;
          for (int64_t c = 0; c < head_dim; c += 8)
            _mm256_storeu_ps(&qf[n * head_dim + c],
                             _mm256_mul_ps(load8_bf16(q + offset + c), q_scale));
          outs[n] = out + offset;
          lens[n] = len - (it.rows - 1 - r);
        }
      }
      if (it.rows == 1 && it.heads == group)
        attend_group(qf.data(), rows, len, head_dim, v_scale, scores.data(), outs.data(), group);
      else
        attend_tile_of(static_cast<int>(nq), qf.data(), lens.data(), rows, head_dim, v_scale,
                       scores.data(), outs.data(), std::make_integer_sequence<int, kTile>());
    }
  }
}

}  // namespace

extern "C" void baton_paged_attention_bf16(const uint16_t* q, uint16_t* out, const uint16_t* cache,
                                           int64_t block_stride, int64_t kv_stride,
                                           const int32_t* block_tables, int64_t table_stride,
                                           const int32_t* query_start, const int32_t* seq_lens,
                                           int64_t seqs, int64_t heads, int64_t kv_heads,
                                           int64_t head_dim, int64_t block_size, float scale,
                                           int threads) {
  paged_attention(q, out, cache, block_stride, kv_stride, block_tables, table_stride, query_start,
                  seq_lens, seqs, heads, kv_heads, head_dim, block_size, scale, nullptr, threads);
}

// kv_scales: finite and positive (checked by the caller).
extern "C" void baton_paged_attention_fp8(const uint16_t* q, uint16_t* out, const uint8_t* cache,
                                          int64_t block_stride, int64_t kv_stride,
                                          const int32_t* block_tables, int64_t table_stride,
                                          const int32_t* query_start, const int32_t* seq_lens,
                                          int64_t seqs, int64_t heads, int64_t kv_heads,
                                          int64_t head_dim, int64_t block_size, float scale,
                                          const float* kv_scales, int threads) {
  paged_attention(q, out, cache, block_stride, kv_stride, block_tables, table_stride, query_start,
                  seq_lens, seqs, heads, kv_heads, head_dim, block_size, scale, kv_scales, threads);
}
