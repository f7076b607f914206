// bf16 projections of the decode step, out = W @ X, on CPUs with AVX512-BF16 (prad/kernels).
//
// W is a contiguous [M, K] weight (the model's [out, in] layout), X the step's feature-major
// activations [K, N] with N a multiple of 16 (the step pads its columns). X is first packed into K/2
// rows of N bf16 pairs (x[2p][n], x[2p + 1][n]), the operand layout of VDPBF16PS, which multiplies
// two such pairs and adds both products into one fp32 lane. A tile of R = 6 weight rows x 64 columns
// keeps its 24 accumulators in registers: per pair of k, 4 vector loads of packed X, 6 broadcasts of
// one weight pair (two adjacent bf16 of a row, already in the right order: W needs no packing) and
// 24 VDPBF16PS. The tile's weights are 6 consecutive rows, one contiguous block; the next tile's block
// is prefetched while this one computes, since every weight is read once per step, from DRAM.
//
// Accumulation is in fp32; the result is rounded to bf16 once, as oneDNN's bf16 GEMM does (only the
// order of the sums differs). docs/design.md compares it with torch.mm (oneDNN).
//
// Built with the other kernels (-O3 -march=native); row blocks are spread over pool.h's threads,
// claimed BLOCKS_PER_CHUNK at a time. Without AVX512-BF16 the entry points
// report "unsupported" and the decode step keeps torch.mm.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "pool.h"

#ifdef __AVX512BF16__
#include <immintrin.h>

namespace {

using prad::parallel_for;

constexpr int ROWS = 6;        // weight rows per tile of 64 (or 48) columns: 24 accumulators
constexpr int NARROW_ROWS = 12;  // ... of at most 32 columns (batches of up to 32), 12-24 accumulators
constexpr int COL_VECS = 4;    // 16-column vectors per tile (64 columns)
constexpr int BLOCKS_PER_CHUNK = 4;  // row blocks a thread claims at a time (prad/kernels/pool.h)
constexpr int PREFETCH_TILES = 1;  // weight blocks prefetched ahead of the one in use

// x [K, N] (row stride ldx) -> xp [(K + 1) / 2, N] pairs, an odd K's last pair padded with zero.
void pack_pairs(const uint16_t *x, int64_t k, int64_t n, int64_t ldx, uint32_t *xp) {
    for (int64_t p = 0; p < (k + 1) / 2; p++) {
        const uint16_t *lo = x + 2 * p * ldx;
        const uint16_t *hi = 2 * p + 1 < k ? lo + ldx : nullptr;
        for (int64_t c = 0; c < n; c += 16) {
            const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(lo + c)));
            const __m512i b = hi ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(hi + c)))
                                 : _mm512_setzero_si512();
            _mm512_storeu_si512(xp + p * n + c, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
        }
    }
}

inline uint32_t weight_pair(const uint16_t *row, int64_t p) {
    uint32_t pair;
    std::memcpy(&pair, row + 2 * p, sizeof pair);
    return pair;
}

template <int R, int NB>
inline void multiply_pair(__m512 (&acc)[R][NB], const uint32_t (&pairs)[R], const uint32_t *xp_row) {
    __m512bh xv[NB];
    for (int j = 0; j < NB; j++) xv[j] = (__m512bh)_mm512_loadu_si512(xp_row + 16 * j);
    for (int r = 0; r < R; r++) {
        const __m512bh wv = (__m512bh)_mm512_set1_epi32(int(pairs[r]));
        for (int j = 0; j < NB; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);
    }
}

// Where a tile's R x (16 NB) fp32 results go.
struct RowsOut {  // bf16 [M, N] row-major
    uint16_t *out;
    int64_t ld;
};
struct TransposedOut {  // fp32 [cols, M]: out[c][m], columns c < cols only (rounded through bf16)
    float *out;
    int64_t ld, cols;
};

template <int R, int NB>
inline void store_tile(const RowsOut &o, int64_t m, int64_t c, const __m512 (&acc)[R][NB]) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NB; j++)
            _mm256_storeu_si256((__m256i *)(o.out + (m + r) * o.ld + c + 16 * j), (__m256i)_mm512_cvtneps_pbh(acc[r][j]));
}

template <int R, int NB>
inline void store_tile(const TransposedOut &o, int64_t m, int64_t c, const __m512 (&acc)[R][NB]) {
    float tile[R][16 * NB];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NB; j++) {  // bf16 rounding, back to fp32 (what a bf16 GEMM then .float() gives)
            const __m512i bits = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(acc[r][j]));
            _mm512_storeu_si512(tile[r] + 16 * j, _mm512_slli_epi32(bits, 16));
        }
    const int64_t cols = o.cols - c < 16 * NB ? o.cols - c : 16 * NB;
    for (int64_t col = 0; col < cols; col++)
        for (int r = 0; r < R; r++) o.out[(c + col) * o.ld + m + r] = tile[r][col];
}

// Rows [m, m + R) x columns [c, c + 16 NB) of W @ X (+ bias), over all of K.
template <int R, int NB, typename Out>
inline void tile(const uint16_t *w, int64_t k, const uint32_t *xp, int64_t n, const uint16_t *bias,
                 int64_t m, int64_t c, const Out &out) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; r++) {
        uint32_t b = 0;
        if (bias) b = uint32_t(bias[m + r]) << 16;
        for (int j = 0; j < NB; j++) acc[r][j] = _mm512_castsi512_ps(_mm512_set1_epi32(int(b)));
    }
    const uint16_t *rows = w + m * k;
    const char *ahead = reinterpret_cast<const char *>(rows + PREFETCH_TILES * R * k);
    uint32_t pairs[R];
    for (int64_t p = 0; p < k / 2; p++) {
        // the block ahead is R * k * 2 bytes, 4 R bytes per pair: every 64-byte line gets a prefetch
        if (4 * R >= 32 || (p & 1) == 0) _mm_prefetch(ahead + p * 4 * R, _MM_HINT_T0);
        for (int r = 0; r < R; r++) pairs[r] = weight_pair(rows + r * k, p);
        multiply_pair<R, NB>(acc, pairs, xp + p * n + c);
    }
    if (k % 2) {  // an odd K's last weight, its partner zero (never read past the row)
        for (int r = 0; r < R; r++) pairs[r] = rows[r * k + k - 1];
        multiply_pair<R, NB>(acc, pairs, xp + k / 2 * n + c);
    }
    store_tile<R, NB>(out, m, c, acc);
}

template <int R, typename Out>
void row_block(const uint16_t *w, int64_t k, const uint32_t *xp, int64_t n, const uint16_t *bias, int64_t m,
               const Out &out) {
    for (int64_t c = 0; c < n; c += 16 * COL_VECS) {
        switch ((n - c) / 16 < COL_VECS ? (n - c) / 16 : COL_VECS) {
            case 4: tile<R, 4>(w, k, xp, n, bias, m, c, out); break;
            case 3: tile<R, 3>(w, k, xp, n, bias, m, c, out); break;
            case 2: tile<R, 2>(w, k, xp, n, bias, m, c, out); break;
            default: tile<R, 1>(w, k, xp, n, bias, m, c, out); break;
        }
    }
}

template <typename Out>
void last_rows(const uint16_t *w, int64_t k, const uint32_t *xp, int64_t n, const uint16_t *bias, int64_t m,
               int64_t left, const Out &out) {
    switch (left) {
        case 5: row_block<5>(w, k, xp, n, bias, m, out); break;
        case 4: row_block<4>(w, k, xp, n, bias, m, out); break;
        case 3: row_block<3>(w, k, xp, n, bias, m, out); break;
        case 2: row_block<2>(w, k, xp, n, bias, m, out); break;
        case 1: row_block<1>(w, k, xp, n, bias, m, out); break;
        default: break;
    }
}

template <typename Out>
int linear(const uint16_t *w, int64_t m, int64_t k, const uint16_t *x, int64_t n, int64_t ldx,
           const uint16_t *bias, const Out &out, int threads) {
    if (n <= 0 || n % 16 || m <= 0 || k <= 0) return -1;
    static thread_local std::vector<uint32_t> packed;  // the calling thread's scratch, grown as needed
    packed.resize(size_t((k + 1) / 2 * n));
    pack_pairs(x, k, n, ldx, packed.data());
    const uint32_t *xp = packed.data();
    // Narrow activations (up to 32 columns) have few accumulators per row: taller tiles keep
    // enough independent VDPBF16PS in flight to cover its latency.
    const int64_t rows = n <= 32 ? NARROW_ROWS : ROWS;
    parallel_for(threads, (m + rows - 1) / rows, BLOCKS_PER_CHUNK, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; b++) {
            const int64_t first = b * rows, left = std::min(rows, m - first);
            if (left == NARROW_ROWS) row_block<NARROW_ROWS>(w, k, xp, n, bias, first, out);
            else if (left == ROWS) row_block<ROWS>(w, k, xp, n, bias, first, out);
            else if (left > ROWS) {  // the last of the narrow blocks
                row_block<ROWS>(w, k, xp, n, bias, first, out);
                last_rows(w, k, xp, n, bias, first + ROWS, left - ROWS, out);
            } else last_rows(w, k, xp, n, bias, first, left, out);
        }
    });
    return 0;
}

}  // namespace

extern "C" {
int prad_linear_bf16_supported() { return 1; }

// out [m, n] bf16 (row stride ldo) = w [m, k] @ x [k, n] (row stride ldx) + bias [m] (or null).
int prad_linear_bf16(const uint16_t *w, int64_t m, int64_t k, const uint16_t *x, int64_t n, int64_t ldx,
                     const uint16_t *bias, uint16_t *out, int64_t ldo, int threads) {
    return linear(w, m, k, x, n, ldx, bias, RowsOut{out, ldo}, threads);
}

// out [cols, m] fp32 (row stride ldo) = (w [m, k] @ x [k, n])[:, :cols].T, each value rounded to bf16:
// the LM head's logits of the step's cols real rows, token-major.
int prad_linear_bf16_t_f32(const uint16_t *w, int64_t m, int64_t k, const uint16_t *x, int64_t n, int64_t ldx,
                           int64_t cols, float *out, int64_t ldo, int threads) {
    if (cols < 0 || cols > n) return -1;
    return linear(w, m, k, x, n, ldx, nullptr, TransposedOut{out, ldo, cols}, threads);
}
}

#else  // no AVX512-BF16: the decode step keeps torch.mm

extern "C" {
int prad_linear_bf16_supported() { return 0; }
int prad_linear_bf16(const uint16_t *, int64_t, int64_t, const uint16_t *, int64_t, int64_t, const uint16_t *,
                     uint16_t *, int64_t, int) {
    return -2;
}
int prad_linear_bf16_t_f32(const uint16_t *, int64_t, int64_t, const uint16_t *, int64_t, int64_t, int64_t,
                           float *, int64_t, int) {
    return -2;
}
}

#endif
