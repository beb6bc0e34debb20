// Writes a step's K/V rows into their paged-cache slots: bf16 rows into a bf16 cache as
// they are, or into a float8_e4m3fn cache divided by their (K|V, head) scale.
#include <cstdint>
#include <cstring>

#include "vec.h"

namespace {

// Calls put(t, k_dst, v_dst) with token t's K and V rows in a cache layer [blocks, 2,
// block_size, row_elems] of the given block and K-to-V strides (elements).
template <typename T, typename Put>
void for_each_slot(T* cache, int64_t block_stride, int64_t kv_stride, int64_t block_size,
                   const int64_t* slots, int64_t tokens, int64_t row_elems, Put put) {
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
    T* dst = cache + block * block_stride + offset * row_elems;
    put(t, dst, dst + kv_stride);
  }
}

// e4m3(clamp(row / scale_h, +-448)) head by head: the division rounds as torch's does, so
// the bytes are `kernels.kv_cache_fp8.write_kv_fp8_torch`'s.
void quantize_row(const uint16_t* src, uint8_t* dst, const float* scales, int64_t heads,
                  int64_t head_dim) {
  for (int64_t h = 0; h < heads; ++h) {
    const __m256 scale = _mm256_set1_ps(scales[h]);
    for (int64_t c = h * head_dim; c < (h + 1) * head_dim; c += 8)
      baton::store8_e4m3(dst + c, _mm256_div_ps(baton::load8_bf16(src + c), scale));
  }
}

}  // namespace

// k/v rows of `row_elems` values, `k_stride`/`v_stride` apart.
extern "C" void baton_write_kv_bf16(const uint16_t* k, int64_t k_stride, const uint16_t* v,
                                    int64_t v_stride, uint16_t* cache, int64_t block_stride,
                                    int64_t kv_stride, int64_t block_size, const int64_t* slots,
                                    int64_t tokens, int64_t row_elems) {
  const size_t bytes = row_elems * sizeof(uint16_t);
  for_each_slot(cache, block_stride, kv_stride, block_size, slots, tokens, row_elems,
                [&](int64_t t, uint16_t* k_dst, uint16_t* v_dst) {
                  std::memcpy(k_dst, k + t * k_stride, bytes);
                  std::memcpy(v_dst, v + t * v_stride, bytes);
                });
}

// k/v rows of kv_heads x head_dim values (head_dim a multiple of 8); kv_scales [2 (K|V),
// kv_heads], finite and positive (checked by the caller).
extern "C" void baton_write_kv_fp8(const uint16_t* k, int64_t k_stride, const uint16_t* v,
                                   int64_t v_stride, uint8_t* cache, int64_t block_stride,
                                   int64_t kv_stride, int64_t block_size, const int64_t* slots,
                                   int64_t tokens, int64_t kv_heads, int64_t head_dim,
                                   const float* kv_scales) {
  for_each_slot(cache, block_stride, kv_stride, block_size, slots, tokens, kv_heads * head_dim,
                [&](int64_t t, uint8_t* k_dst, uint8_t* v_dst) {
                  quantize_row(k + t * k_stride, k_dst, kv_scales, kv_heads, head_dim);
                  quantize_row(v + t * v_stride, v_dst, kv_scales + kv_heads, kv_heads, head_dim);
                });
}
