// SIMD helpers shared by the native CPU kernels (prad/kernels): vectors of W floats through GCC/Clang
// vector extensions, bf16 <-> fp32 conversions rounding as torch does, and a vectorised exp.
//
// W is the machine's register width: 16 floats with AVX-512, else 8 (one AVX register). A vector
// wider than the registers is not just split in two: GCC 12 lowers comparisons and `?:` of such
// vectors lane by lane in scalar code and moves them through memory in 8-byte pieces, which made
// the kernels several times slower than PyTorch's ops on AVX2. Helpers that take vectors are always
// inlined, so none is passed through memory either.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#define PRAD_INLINE inline __attribute__((always_inline))

namespace prad {

#ifdef __AVX512F__
constexpr int W = 16;  // floats per vector
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

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
PRAD_INLINE vf load(const uint16_t *p) {  // W bf16 -> fp32: widen to 32 bits, shift into the high half
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

// x rounded to T and back (what storing an fp32 result in a T tensor does), in registers
template <typename T>
PRAD_INLINE vf round_to(vf x);
template <>
PRAD_INLINE vf round_to<float>(vf x) { return x; }
template <>
PRAD_INLINE vf round_to<uint16_t>(vf x) {  // bf16: round to nearest even, keep the high 16 bits
    vu bits;
    std::memcpy(&bits, &x, sizeof bits);
    const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    const vu out = (bits & 0x7fffffffu) > 0x7f800000u ? vu{} + 0x7fc00000u : rounded;
    vf v;
    std::memcpy(&v, &out, sizeof v);
    return v;
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

// a * b + c rounded once where the CPU has FMA. Written out because the compiler contracts `acc += a * b`
// into an FMA in some functions and not in others, and a kernel whose results must not depend on how
// it was instantiated (linear_narrow_f32.cpp) needs the same rounding everywhere.
PRAD_INLINE vf fma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
    return _mm256_fmadd_ps(a, b, c);
#else
    return a * b + c;
#endif
}

PRAD_INLINE vf8 halve_sum(vf8 v) { return v; }  // W = 8: already one AVX register
#ifdef __AVX512F__
PRAD_INLINE vf8 halve_sum(vf v) {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}
#endif

PRAD_INLINE float hsum(vf v) {
    const vf8 a = halve_sum(v);
    const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

PRAD_INLINE float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < W; i++) m = v[i] > m ? v[i] : m;
    return m;
}

// exp(x) for x <= 0 (softmax after subtracting the max), W lanes: Cody-Waite reduction to
// |r| <= ln2 / 2 and a degree-6 Taylor polynomial (relative error < 2e-7); 0 below -87.
PRAD_INLINE vf exp_nonpositive(vf x) {
    const vf c = x < -87.0f ? vf{} - 87.0f : x;
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
    return x < -87.0f ? vf{} : p * two_n;
}

inline float exp_nonpositive(float x) { return exp_nonpositive(vf{} + x)[0]; }

}  // namespace prad
