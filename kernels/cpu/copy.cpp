// A memcpy whose stores bypass the caches (`vmovntdq`), for bulk moves into memory that
// another process reads next (the KV store's shared segment, a caller's buffer).
//
// glibc switches to non-temporal stores only for copies larger than a fraction of the L3
// cache, so the KV store client's 256 KiB pieces (copied piece by piece so that each is
// hashed while cache-hot) paid for a read-for-ownership of every destination line: about
// half the bandwidth of one large copy. Here the source is read through the cache (the
// caller hashes it next) and the destination is written around it.
#include <immintrin.h>

#include <cstdint>
#include <algorithm>
#include <cstring>

extern "C" void baton_copy_streaming(void* dest, const void* src, int64_t n) {
  auto* d = static_cast<uint8_t*>(dest);
  const auto* s = static_cast<const uint8_t*>(src);
  const int64_t head = std::min<int64_t>(n, (32 - reinterpret_cast<uintptr_t>(d) % 32) % 32);
  std::memcpy(d, s, head);
  d += head;
  s += head;
  n -= head;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 64));
    const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 96), e);
  }
  std::memcpy(d + i, s + i, n - i);
  _mm_sfence();  // the stores are visible before the caller announces the copy
}
