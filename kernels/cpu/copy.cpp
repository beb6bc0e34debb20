// A copy that returns the xxh3-64 of the bytes it moves (the KV block checksum), for bulk
// moves into memory that another process reads next: the KV store's shared segment, or a
// caller's buffer on a get.
//
// Each 64-byte stripe is hashed from the registers that carry it (xxh3.h), so a verified
// copy reads its source once; hashing 256 KiB pieces after copying them cost a third of the
// copy's rate even from L2. The stores bypass the caches (`vmovntdq`): glibc's memcpy does
// so only above a large size, and piece by piece it read every destination line for
// ownership first, which halved its rate.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "xxh3.h"

namespace {

constexpr int64_t kPrefetchAhead = 512;

template <bool kAligned>
void copy_blocks_hashed(uint8_t* d, const uint8_t* s, int64_t blocks, baton::xxh3::State& state) {
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t k = 0; k < baton::xxh3::kStripesPerBlock; ++k) {
      const int64_t at = b * baton::xxh3::kBlock + k * baton::xxh3::kStripe;
      _mm_prefetch(reinterpret_cast<const char*>(s + at + kPrefetchAhead), _MM_HINT_T0);
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + at));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + at + 32));
      if constexpr (kAligned) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + at), lo);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + at + 32), hi);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + at), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + at + 32), hi);
      }
      state.stripe(lo, hi, baton::xxh3::kSecret + 8 * k);
    }
    state.scramble();
  }
}

}  // namespace

// Copies n >= 241 bytes and returns their xxh3-64 (seed 0), reading the source once.
extern "C" uint64_t baton_copy_xxh3(void* dest, const void* src, int64_t n) {
  auto* d = static_cast<uint8_t*>(dest);
  const auto* s = static_cast<const uint8_t*>(src);
  baton::xxh3::State state;
  const int64_t blocks = (n - 1) / baton::xxh3::kBlock;  // the last block is finish()'s
  if (reinterpret_cast<uintptr_t>(d) % 32 == 0) {
    copy_blocks_hashed<true>(d, s, blocks, state);
  } else {
    copy_blocks_hashed<false>(d, s, blocks, state);
  }
  const int64_t done = blocks * baton::xxh3::kBlock;
  std::memcpy(d + done, s + done, n - done);
  _mm_sfence();  // the stores are visible before the caller announces the copy
  return state.finish(s, n);
}
