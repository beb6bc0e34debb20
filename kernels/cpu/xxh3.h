// XXH3-64 (seed 0, default secret) of inputs longer than 240 bytes (shorter ones take
// other algorithms; services.kvstore.segment.FUSED_MIN_BYTES keeps them away), with AVX2: the KV
// block checksum of DESIGN.md, computed here so that a copy can hash the bytes it moves
// while they are in L1 (copy.cpp). Python's `xxhash.xxh3_64_intdigest` is the reference;
// tests/services/kvstore/test_segment.py checks copies of every length class against it.
//
// The long-input algorithm: eight 64-bit accumulators take 64-byte stripes, each stripe
// keyed by the secret at an offset advancing 8 bytes a stripe; after 16 stripes (a 1 KiB
// block) the accumulators are scrambled. The last partial block's stripes follow, then the
// input's last 64 bytes as one more stripe, and the accumulators are folded into 64 bits.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace baton::xxh3 {

constexpr int64_t kStripe = 64;
constexpr int64_t kStripesPerBlock = 16;
constexpr int64_t kBlock = kStripe * kStripesPerBlock;

constexpr uint64_t kPrime32_1 = 0x9E3779B1ULL;
constexpr uint64_t kPrime32_2 = 0x85EBCA77ULL;
constexpr uint64_t kPrime32_3 = 0xC2B2AE3DULL;
constexpr uint64_t kPrime64_1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kPrime64_2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kPrime64_3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kPrime64_4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t kPrime64_5 = 0x27D4EB2F165667C5ULL;

// The published default secret (192 bytes).
alignas(64) constexpr uint8_t kSecret[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};
constexpr int64_t kScrambleKey = sizeof(kSecret) - kStripe;
constexpr int64_t kLastStripeKey = sizeof(kSecret) - kStripe - 7;
constexpr int64_t kMergeKey = 11;

struct State {
  __m256i acc[2];

  State() {
    alignas(32) const uint64_t init[8] = {kPrime32_3, kPrime64_1, kPrime64_2, kPrime64_3,
                                          kPrime64_4, kPrime32_2, kPrime64_5, kPrime32_1};
    acc[0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(init));
    acc[1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(init + 4));
  }

  // One stripe, its two halves already in registers (the copy loaded them).
  inline void stripe(__m256i lo, __m256i hi, const uint8_t* key) {
    mix(acc[0], lo, key);
    mix(acc[1], hi, key + 32);
  }

  inline void stripe(const uint8_t* p, const uint8_t* key) {
    stripe(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)), key);
  }

  inline void scramble() {
    const __m256i prime = _mm256_set1_epi32(static_cast<int>(kPrime32_1));
    for (int i = 0; i < 2; ++i) {
      const __m256i key =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kSecret + kScrambleKey + 32 * i));
      const __m256i a = _mm256_xor_si256(_mm256_xor_si256(acc[i], _mm256_srli_epi64(acc[i], 47)), key);
      const __m256i hi = _mm256_shuffle_epi32(a, _MM_SHUFFLE(0, 3, 0, 1));
      acc[i] = _mm256_add_epi64(_mm256_mul_epu32(a, prime),
                                _mm256_slli_epi64(_mm256_mul_epu32(hi, prime), 32));
    }
  }

  // The hash of an input of `n` bytes at `p`, every whole block before its last block
  // (the first (n - 1) / kBlock blocks) already fed through stripe() and scramble().
  uint64_t finish(const uint8_t* p, int64_t n) {
    const int64_t blocks = (n - 1) / kBlock;
    const int64_t tail_stripes = ((n - 1) - blocks * kBlock) / kStripe;
    for (int64_t s = 0; s < tail_stripes; ++s) stripe(p + blocks * kBlock + s * kStripe, kSecret + 8 * s);
    stripe(p + n - kStripe, kSecret + kLastStripeKey);
    alignas(32) uint64_t a[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(a), acc[0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(a + 4), acc[1]);
    uint64_t h = static_cast<uint64_t>(n) * kPrime64_1;
    for (int i = 0; i < 4; ++i) {
      uint64_t k0, k1;
      std::memcpy(&k0, kSecret + kMergeKey + 16 * i, 8);
      std::memcpy(&k1, kSecret + kMergeKey + 16 * i + 8, 8);
      const unsigned __int128 product =
          static_cast<unsigned __int128>(a[2 * i] ^ k0) * (a[2 * i + 1] ^ k1);
      h += static_cast<uint64_t>(product) ^ static_cast<uint64_t>(product >> 64);
    }
    h ^= h >> 37;
    h *= 0x165667919E3779F9ULL;
    return h ^ (h >> 32);
  }

 private:
  // acc[j] += data[j ^ 1]; acc[j] += lo32(data[j] ^ key[j]) * hi32(data[j] ^ key[j])
  static inline void mix(__m256i& acc, __m256i data, const uint8_t* key) {
    const __m256i keyed = _mm256_xor_si256(data, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key)));
    const __m256i product = _mm256_mul_epu32(keyed, _mm256_srli_epi64(keyed, 32));
    const __m256i swapped = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
    acc = _mm256_add_epi64(product, _mm256_add_epi64(acc, swapped));
  }
};

}  // namespace baton::xxh3
