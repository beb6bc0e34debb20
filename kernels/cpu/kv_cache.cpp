// Writes a step's K/V rows into their paged-cache slots (bf16 cache, bf16 rows).
#include <cstdint>
#include <cstring>

// k/v rows of `row_elems` values, `k_stride`/`v_stride` apart; the cache layer is
// [blocks, 2, block_size, row_elems] with the given block and K-to-V strides (elements).
extern "C" void baton_write_kv_bf16(const uint16_t* k, int64_t k_stride, const uint16_t* v,
                                    int64_t v_stride, uint16_t* cache, int64_t block_stride,
                                    int64_t kv_stride, int64_t block_size, const int64_t* slots,
                                    int64_t tokens, int64_t row_elems) {
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
    uint16_t* dst = cache + block * block_stride + offset * row_elems;
    std::memcpy(dst, k + t * k_stride, row_elems * sizeof(uint16_t));
    std::memcpy(dst + kv_stride, v + t * v_stride, row_elems * sizeof(uint16_t));
  }
}
