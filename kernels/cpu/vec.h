// Shared AVX2 helpers of the CPU kernels: bf16 and e4m3 <-> fp32, horizontal sums, exp.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace baton {

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, as torch does (inputs here are finite).
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline __m256 load8_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline void store8_bf16(uint16_t* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
  // Pack the 8 low halves (values < 2^16, so unsigned saturation keeps them).
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// float8_e4m3fn -> fp32, exact: the 7 magnitude bits go to fp32's exponent and mantissa
// fields (an fp32 2^120 times too small; e4m3 subnormals become fp32 subnormals, of the
// same scaled value) and the sign to bit 31; one multiply by 2^120 rebiases. Sign-extending
// the byte sets bit 31 exactly for negatives. The NaN codes read as +-480: caches never
// hold them (writes clamp to +-448), and a flush-denormals mode would read e4m3 subnormals
// (|x| < 2^-6 scale) as 0.
inline __m256 load8_e4m3(const uint8_t* p) {
  const __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i bits = _mm256_and_si256(_mm256_slli_epi32(b, 20), _mm256_set1_epi32(0x87F00000));
  return _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p120f));
}

// fp32 -> float8_e4m3fn of x clamped to +-448, rounded to nearest even: bit for bit
// torch's `x.clamp(-448, 448).to(torch.float8_e4m3fn)` (c10's Float8_e4m3fn conversion),
// NaN included (0x7F with its sign).
inline void store8_e4m3(uint8_t* p, __m256 x) {
  const __m256 limit = _mm256_set1_ps(448.f);
  // max/min return their second operand when one is NaN: NaN passes through.
  x = _mm256_min_ps(limit, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), limit), x));
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32(INT32_MIN));
  const __m256i mag = _mm256_xor_si256(bits, sign);
  // Below 2^-6 (e4m3 subnormals): adding 2^14 rounds |x| to a multiple of 2^-9, whose
  // count is the code.
  const __m256 denorm = _mm256_castsi256_ps(_mm256_set1_epi32(141 << 23));
  const __m256i small = _mm256_sub_epi32(
      _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(mag), denorm)),
      _mm256_castps_si256(denorm));
  // Normals: rebias the exponent, round the 20 dropped mantissa bits to nearest even.
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(mag, 20), _mm256_set1_epi32(1));
  const __m256i normal = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(mag, _mm256_set1_epi32((7 - 127) * (1 << 23) + 0x7FFFF)),
                       odd),
      20);
  const __m256i is_small = _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), mag);
  const __m256i is_nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7F800000));
  __m256i code = _mm256_blendv_epi8(normal, small, is_small);
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7F), is_nan);
  code = _mm256_or_si256(code, _mm256_srli_epi32(sign, 24));
  // The low byte of each 32-bit lane, 4 a 128-bit half, then the halves side by side.
  const __m256i low_bytes = _mm256_shuffle_epi8(
      code, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4,
                             8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
  const __m128i packed =
      _mm_unpacklo_epi32(_mm256_castsi256_si128(low_bytes), _mm256_extracti128_si256(low_bytes, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), packed);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x to ~2 ulp for x in [-87, 88] (Cephes' expf: range reduction by ln 2, degree-5 poly).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

}  // namespace baton
