// SIMD helpers shared by the native CPU kernels (prad/kernels): 16-float vectors through GCC/Clang
// vector extensions (-march=native lowers them to AVX-512 or pairs of AVX2 registers), bf16 <-> fp32
// conversions rounding as torch does, and a vectorised exp.
//
// Where a 16-float vector spans two registers (AVX2), GCC lowers a comparison or `?:` of such vectors
// lane by lane in scalar code, and passes them to a function that is not inlined through memory. So
// lane selection goes through `select_lt` / `select_nan` (two compare + blend instructions per vector
// on AVX2), and the helpers taking vectors are always inlined.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define PRAD_INLINE inline __attribute__((always_inline))

namespace prad {

constexpr int W = 16;  // floats per vector
typedef float vf __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
    uint32_t bits = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline uint16_t from_float<uint16_t>(float x) {  // round to nearest even, as torch does
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays a quiet NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return uint16_t(bits >> 16);
}

PRAD_INLINE vf load(const float *p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
PRAD_INLINE vf load(const uint16_t *p) {  // 16 bf16 -> fp32: widen to 32 bits, shift into the high half
#ifdef __AVX512F__
    const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#else
    vh h;
    std::memcpy(&h, p, sizeof h);
    const vu u = __builtin_convertvector(h, vu) << 16;
#endif
    vf v;
    std::memcpy(&v, &u, sizeof v);
    return v;
}

PRAD_INLINE void store(float *p, vf v) { std::memcpy(p, &v, sizeof v); }

#if defined(__AVX2__) && !defined(__AVX512F__)
union Halves {  // a 16-float vector as the two AVX registers that hold it
    vf v;
    __m256 h[2];
};
#endif

// Lane by lane: a where x < y, else b.
PRAD_INLINE vf select_lt(vf x, vf y, vf a, vf b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    const Halves xs{x}, ys{y}, as{a}, bs{b};
    Halves out;
    for (int i = 0; i < 2; i++)
        out.h[i] = _mm256_blendv_ps(bs.h[i], as.h[i], _mm256_cmp_ps(xs.h[i], ys.h[i], _CMP_LT_OQ));
    return out.v;
#else
    return x < y ? a : b;
#endif
}

// Lane by lane: a where x is NaN, else b.
PRAD_INLINE vf select_nan(vf x, vf a, vf b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    const Halves xs{x}, as{a}, bs{b};
    Halves out;
    for (int i = 0; i < 2; i++)
        out.h[i] = _mm256_blendv_ps(bs.h[i], as.h[i], _mm256_cmp_ps(xs.h[i], xs.h[i], _CMP_UNORD_Q));
    return out.v;
#else
    return x != x ? a : b;
#endif
}

// x rounded to T and back (what storing an fp32 result in a T tensor does), in registers
template <typename T>
PRAD_INLINE vf round_to(vf x);
template <>
PRAD_INLINE vf round_to<float>(vf x) { return x; }
template <>
PRAD_INLINE vf round_to<uint16_t>(vf x) {  // bf16: round to nearest even, keep the high 16 bits; NaN -> quiet NaN
    vu bits;
    std::memcpy(&bits, &x, sizeof bits);
    const vu rounded_bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    vf rounded;
    std::memcpy(&rounded, &rounded_bits, sizeof rounded);
    const vu quiet_nan_bits = vu{} + 0x7fc00000u;
    vf quiet_nan;
    std::memcpy(&quiet_nan, &quiet_nan_bits, sizeof quiet_nan);
    return select_nan(x, quiet_nan, rounded);
}

PRAD_INLINE void store(uint16_t *p, vf v) {  // fp32 -> bf16, round to nearest even; NaN -> quiet NaN
    vu bits;
    const vf rounded = round_to<uint16_t>(v);
    std::memcpy(&bits, &rounded, sizeof bits);
    const vh h = __builtin_convertvector(bits >> 16, vh);
    std::memcpy(p, &h, sizeof h);
}

template <typename T>
inline float round_to(float x) { return to_float(from_float<T>(x)); }

PRAD_INLINE float hsum(vf v) {
    vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

PRAD_INLINE float hmax(vf v) {
    vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    vf8 b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    a = a > b ? a : b;
    float m = a[0];
    for (int i = 1; i < 8; i++) m = a[i] > m ? a[i] : m;
    return m;
}

// exp(x) for x <= 0 (softmax after subtracting the max), 16 lanes: Cody-Waite reduction to
// |r| <= ln2 / 2 and a degree-6 Taylor polynomial (relative error < 2e-7); 0 below -87.
PRAD_INLINE vf exp_nonpositive(vf x) {
    const vf low = vf{} - 87.0f;
    const vf c = select_lt(x, low, low, x);
    const vi n = __builtin_convertvector(c * 1.44269504f - 0.5f, vi);  // truncation: ceil(t - 0.5)
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = c - nf * 0.693145751953125f - nf * 1.428606765330187e-6f;
    vf p = vf{} + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi bits = (n + 127) << 23;
    vf two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return select_lt(x, low, vf{}, p * two_n);
}

inline float exp_nonpositive(float x) { return exp_nonpositive(vf{} + x)[0]; }

}  // namespace prad
