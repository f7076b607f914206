// Decode attention on the CPU: RoPE, the KV write and attention for one decode step, one layer.
//
// A work item is (row b, KV head g): rotate the row's new key (RoPE), write it and the new value at
// the row's position p into the slot cache, then attend the G = num_heads / num_kv_heads query heads
// that share KV head g over keys [0, p], loading each key and value once for all G heads (SDPA's
// CPU kernel walks them once per query head, and in bf16 converts each block every time). The G
// queries and their accumulators live in vector registers: head_dim and G are template parameters
// (head_dim 16/32/64/128, G 1-8; the caller falls back to PyTorch for other shapes). Softmax is
// online over blocks of KEY_BLOCK keys, in fp32; the output is rounded to the storage type once.
//
// SIMD through GCC/Clang vector extensions (16 floats): -march=native lowers them to AVX-512, or
// pairs of AVX2 registers. Operands are addressed through element strides, so the caller passes
// PyTorch views as they are. Built by prad/kernels/__init__.py (-O3 -march=native); work items are
// spread over the kernels' own thread pool (pool.h).
#include "pool.h"
#include "simd.h"

namespace {

using namespace prad;

constexpr int KEY_BLOCK = 128;
// Keys (and values) prefetched ahead of the one in use: each work item streams two arrays of a few
// KB to tens of KB, too short for the hardware prefetchers to reach full speed on their own; each
// item's first keys are prefetched when it starts (the distance was tuned; docs/design.md).
constexpr int PREFETCH_KEYS = 16;

template <typename T, int D>
inline void prefetch_keys(const T *first, int keys) {
    const char *p = reinterpret_cast<const char *>(first);
    for (int c = 0; c < keys * D * int(sizeof(T)); c += 64) __builtin_prefetch(p + c);
}

struct Strides {
    int64_t b, h, d;
};

template <typename T>
struct Args {
    const T *q, *k_new, *v_new;
    Strides qs, ns, os;
    T *k_cache, *v_cache, *out;
    int64_t row_stride, head_stride;
    const int64_t *positions;
    const float *cos, *sin;  // [max_position, head_dim] or null (no RoPE)
    float scale;
};

// x (head_dim fp32 values) rotated by RoPE at one position, HF's rotate-half convention. Two
// products and a sum, each rounded (no fused multiply-add), so the result is bit-identical to the
// PyTorch path's `x * cos + rotated * sin` (prad/model.py apply_rope).
template <int D>
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void rope(float *x, const float *cos, const float *sin) {
    float rotated[D];
    for (int d = 0; d < D / 2; d++) rotated[d] = -x[d + D / 2];
    for (int d = D / 2; d < D; d++) rotated[d] = x[d - D / 2];
    for (int d = 0; d < D; d++) {
        const float a = x[d] * cos[d];
        const float b = rotated[d] * sin[d];
        x[d] = a + b;
    }
}

// One query / new-key vector of D values, read through strides, RoPE'd and rounded to T (as the
// PyTorch path rounds its RoPE output).
template <typename T, int D>
inline void load_rotated(const T *src, int64_t stride, const float *cos, const float *sin, float *dst) {
    for (int d = 0; d < D; d++) dst[d] = to_float(src[d * stride]);
    if (cos == nullptr) return;
    rope<D>(dst, cos, sin);
    for (int d = 0; d < D; d++) dst[d] = round_to<T>(dst[d]);
}

template <typename T, int D, int G>
void attend_item(const Args<T> &a, int64_t b, int64_t g) {
    constexpr int NV = D / W;
    const int64_t pos = a.positions[b];
    const float *cos = a.cos ? a.cos + pos * D : nullptr;
    const float *sin = a.sin ? a.sin + pos * D : nullptr;
    T *kc = a.k_cache + b * a.row_stride + g * a.head_stride;
    T *vc = a.v_cache + b * a.row_stride + g * a.head_stride;

    alignas(64) float row[D];
    load_rotated<T, D>(a.k_new + b * a.ns.b + g * a.ns.h, a.ns.d, cos, sin, row);
    for (int d = 0; d < D; d++) kc[pos * D + d] = from_float<T>(row[d]);
    for (int d = 0; d < D; d++) vc[pos * D + d] = a.v_new[b * a.ns.b + g * a.ns.h + d * a.ns.d];

    vf q[G][NV], acc[G][NV];
    float m[G], l[G];
    for (int j = 0; j < G; j++) {
        load_rotated<T, D>(a.q + b * a.qs.b + (g * G + j) * a.qs.h, a.qs.d, cos, sin, row);
        for (int i = 0; i < NV; i++) {
            q[j][i] = load(row + i * W);
            acc[j][i] = vf{};
        }
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    alignas(64) float scores[G][KEY_BLOCK];
    const int64_t num_keys = pos + 1;
    prefetch_keys<T, D>(kc, PREFETCH_KEYS);  // the loops below prefetch from key PREFETCH_KEYS on
    prefetch_keys<T, D>(vc, PREFETCH_KEYS);
    for (int64_t s0 = 0; s0 < num_keys; s0 += KEY_BLOCK) {
        const int nb = int(num_keys - s0 < KEY_BLOCK ? num_keys - s0 : KEY_BLOCK);
        for (int s = 0; s < nb; s++) {
            const T *ks = kc + (s0 + s) * D;
            prefetch_keys<T, D>(ks + PREFETCH_KEYS * D, 1);
            vf k[NV];
            for (int i = 0; i < NV; i++) k[i] = load(ks + i * W);
            for (int j = 0; j < G; j++) {
                vf p = q[j][0] * k[0];
                for (int i = 1; i < NV; i++) p += q[j][i] * k[i];
                scores[j][s] = hsum(p) * a.scale;
            }
        }
        const int nv = (nb + W - 1) / W;  // score vectors in this block; lanes past nb are -inf
        for (int j = 0; j < G; j++) {
            for (int s = nb; s < nv * W; s++) scores[j][s] = -INFINITY;
            vf sv[KEY_BLOCK / W];
            for (int i = 0; i < nv; i++) sv[i] = load(scores[j] + i * W);
            vf vmax = sv[0];
            for (int i = 1; i < nv; i++) vmax = sv[i] > vmax ? sv[i] : vmax;
            const float block_max = hmax(vmax);
            const float new_max = block_max > m[j] ? block_max : m[j];
            const float correction = exp_nonpositive(m[j] - new_max);
            vf sum = vf{};
            for (int i = 0; i < nv; i++) {
                sv[i] = exp_nonpositive(sv[i] - new_max);
                sum += sv[i];
                store(scores[j] + i * W, sv[i]);
            }
            l[j] = l[j] * correction + hsum(sum);
            m[j] = new_max;
            for (int i = 0; i < NV; i++) acc[j][i] *= correction;
        }
        for (int s = 0; s < nb; s++) {
            const T *vs = vc + (s0 + s) * D;
            prefetch_keys<T, D>(vs + PREFETCH_KEYS * D, 1);
            vf v[NV];
            for (int i = 0; i < NV; i++) v[i] = load(vs + i * W);
            for (int j = 0; j < G; j++)
                for (int i = 0; i < NV; i++) acc[j][i] += scores[j][s] * v[i];
        }
    }
    for (int j = 0; j < G; j++) {
        T *out = a.out + b * a.os.b + (g * G + j) * a.os.h;
        const float inv = 1.0f / l[j];
        for (int i = 0; i < NV; i++)
            for (int e = 0; e < W; e++) out[(i * W + e) * a.os.d] = from_float<T>(acc[j][i][e] * inv);
    }
}

template <typename T>
using Item = void (*)(const Args<T> &, int64_t, int64_t);

template <typename T, int D>
Item<T> pick_group(int64_t group) {
    switch (group) {
        case 1: return attend_item<T, D, 1>;
        case 2: return attend_item<T, D, 2>;
        case 3: return attend_item<T, D, 3>;
        case 4: return attend_item<T, D, 4>;
        case 5: return attend_item<T, D, 5>;
        case 6: return attend_item<T, D, 6>;
        case 7: return attend_item<T, D, 7>;
        case 8: return attend_item<T, D, 8>;
        default: return nullptr;
    }
}

template <typename T>
Item<T> pick(int64_t head_dim, int64_t group) {
    switch (head_dim) {
        case 16: return pick_group<T, 16>(group);
        case 32: return pick_group<T, 32>(group);
        case 64: return pick_group<T, 64>(group);
        case 128: return pick_group<T, 128>(group);
        default: return nullptr;
    }
}

template <typename T>
int run(const T *q, int64_t qsb, int64_t qsh, int64_t qsd, const T *k_new, const T *v_new, int64_t nsb,
        int64_t nsh, int64_t nsd, T *k_cache, T *v_cache, int64_t row_stride, int64_t head_stride,
        int64_t capacity, const int64_t *positions, int64_t batch, int64_t num_heads, int64_t num_kv_heads,
        int64_t head_dim, const float *cos, const float *sin, float scale, T *out, int64_t osb, int64_t osh,
        int64_t osd, int num_threads) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) return -2;
    Item<T> item = pick<T>(head_dim, num_heads / num_kv_heads);
    if (item == nullptr) return -2;
    for (int64_t b = 0; b < batch; b++)
        if (positions[b] < 0 || positions[b] >= capacity) return -1;
    const Args<T> a{q, k_new, v_new, {qsb, qsh, qsd}, {nsb, nsh, nsd}, {osb, osh, osd}, k_cache, v_cache, out,
                    row_stride, head_stride, positions, cos, sin, scale};
    const int64_t items = batch * num_kv_heads;
    parallel_for(num_threads, items, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) item(a, i / num_kv_heads, i % num_kv_heads);
    });
    return 0;
}

}  // namespace

// Entry points. q, out: [B, H, D] and k_new, v_new: [B, Hkv, D] through element strides (b, h, d);
// k_cache, v_cache: one layer of the slot cache, [rows, Hkv, capacity, D], unit stride along D;
// cos, sin: [max_position, D] fp32, or null. Returns 0; -1 when a position is outside
// [0, capacity) and -2 for an unsupported head_dim / group size (nothing is written then).
#define PRAD_ENTRY(NAME, T)                                                                              \
    extern "C" int NAME(const T *q, int64_t qsb, int64_t qsh, int64_t qsd, const T *k_new, const T *v_new, \
                        int64_t nsb, int64_t nsh, int64_t nsd, T *k_cache, T *v_cache, int64_t row_stride, \
                        int64_t head_stride, int64_t capacity, const int64_t *positions, int64_t batch,    \
                        int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, const float *cos,       \
                        const float *sin, float scale, T *out, int64_t osb, int64_t osh, int64_t osd,      \
                        int num_threads) {                                                                 \
        return run<T>(q, qsb, qsh, qsd, k_new, v_new, nsb, nsh, nsd, k_cache, v_cache, row_stride,       \
                      head_stride, capacity, positions, batch, num_heads, num_kv_heads, head_dim, cos, sin, \
                      scale, out, osb, osh, osd, num_threads);                                           \
    }

PRAD_ENTRY(prad_decode_attention_f32, float)
PRAD_ENTRY(prad_decode_attention_bf16, uint16_t)

extern "C" int prad_decode_attention_supports(int64_t head_dim, int64_t group) {
    return pick<float>(head_dim, group) != nullptr;
}
