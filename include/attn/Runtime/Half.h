//===- Half.h - bf16 and f16 conversions for host buffers -------*- C++ -*-===//
//
// attn-run reads and writes float32 .npy files; GPU packages take bf16 or
// f16. These convert with round-to-nearest-even (NaN stays NaN).
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_RUNTIME_HALF_H
#define ATTN_RUNTIME_HALF_H

#include <cmath>
#include <cstdint>
#include <cstring>

namespace attn::runtime {

inline uint16_t floatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f))
    return 0x7fc0;
  bits += 0x7fff + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

inline float bf16ToFloat(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t floatToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  if (std::isnan(f))
    return 0x7e00;
  float a = std::fabs(f);
  if (a >= 65520.0f)
    return uint16_t(sign | 0x7c00); // overflow -> inf
  if (a < 6.103515625e-05f) {       // subnormal: multiples of 2^-24
    uint32_t m = uint32_t(std::nearbyint(a * 16777216.0f));
    return uint16_t(sign | m);
  }
  uint32_t e = ((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffff;
  uint32_t h = (e << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1)))
    ++h; // may carry into the exponent, which is the right result
  return uint16_t(sign | h);
}

inline float f16ToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
  float f;
  if (e == 0) {
    f = std::ldexp(float(m), -24);
    return sign ? -f : f;
  }
  uint32_t bits = e == 31 ? (sign | 0x7f800000 | (m << 13))
                          : (sign | ((e - 15 + 127) << 23) | (m << 13));
  std::memcpy(&f, &bits, 4);
  return f;
}

} // namespace attn::runtime

#endif // ATTN_RUNTIME_HALF_H
