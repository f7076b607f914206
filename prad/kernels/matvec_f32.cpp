// fp32 matrix-vector products of a batch-of-one decode step (prad/kernels): out = W @ x (+ bias),
// W a contiguous [M, K] weight (the model's [out, in] layout), x a contiguous [K] vector.
//
// A step of one row reads every weight once and does two FLOPs per weight, so it runs at the speed
// memory delivers the weights. torch.mm on an [M, K] x [K, 1] product runs on one thread here, which
// reaches about half of what two cores read; this kernel splits the rows over the kernels' pool.
// Each pass over x serves ROWS rows, each with two W-wide partial sums (independent FMA chains).
#include "pool.h"
#include "simd.h"

namespace {

using namespace prad;

constexpr int64_t ROWS = 4;
constexpr int64_t BLOCKS_PER_CHUNK = 16;  // 64 rows of 576 floats: ~150 KB of weights per chunk

template <int R>
void row_block(const float *w, int64_t k, const float *x, const float *bias, int64_t first, float *out) {
    vf even[R], odd[R];
    for (int r = 0; r < R; r++) even[r] = odd[r] = vf{};
    int64_t c = 0;
    for (; c + 2 * W <= k; c += 2 * W) {
        const vf x0 = load(x + c), x1 = load(x + c + W);
        for (int r = 0; r < R; r++) {
            const float *row = w + (first + r) * k + c;
            even[r] += load(row) * x0;
            odd[r] += load(row + W) * x1;
        }
    }
    for (; c + W <= k; c += W) {
        const vf xv = load(x + c);
        for (int r = 0; r < R; r++) even[r] += load(w + (first + r) * k + c) * xv;
    }
    for (int r = 0; r < R; r++) {
        float sum = hsum(even[r] + odd[r]);
        for (int64_t t = c; t < k; t++) sum += w[(first + r) * k + t] * x[t];
        out[first + r] = bias ? sum + bias[first + r] : sum;
    }
}

}  // namespace

extern "C" {
// out [m] = w [m, k] @ x [k] (+ bias [m], or null), on up to `threads` threads. Returns 0, or -1 for
// an empty shape (nothing written).
int prad_matvec_f32(const float *w, int64_t m, int64_t k, const float *x, const float *bias, float *out,
                    int threads) {
    if (m <= 0 || k <= 0) return -1;
    parallel_for(threads, (m + ROWS - 1) / ROWS, BLOCKS_PER_CHUNK, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; b++) {
            const int64_t first = b * ROWS;
            if (m - first >= ROWS) {
                row_block<ROWS>(w, k, x, bias, first, out);
            } else {
                for (int64_t r = first; r < m; r++) row_block<1>(w, k, x, bias, r, out);
            }
        }
    });
    return 0;
}
}
