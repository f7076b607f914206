// fp32 projections of a decode step with few rows (prad/kernels): out = W @ X (+ bias) for X of at most
// MAX_COLUMNS columns, W a contiguous [M, K] weight (the model's [out, in] layout).
//
// With a few columns every weight is read once for 2 x columns FLOPs, so the product runs at the speed
// memory delivers the weights. torch.mm runs an [M, K] x [K, 1] product on one thread (about half of
// what two cores read) and 2-15 columns far slower still, which is why the step used to pad them to 16.
// Here the rows are split over the kernels' pool, and each weight vector loaded serves up to GROUP
// columns: a chunk of rows is read from memory once, and again from cache for each further group.
//
// Every output is one dot product summed in the same order whatever the number of columns or the
// row blocking (W-wide partial sums over K in order, then the lanes, the tail, the bias): a row's
// result does not depend on the rest of the batch.
#include <vector>

#include "pool.h"
#include "simd.h"

namespace {

using namespace prad;

constexpr int MAX_COLUMNS = 16;
constexpr int GROUP = 8;  // columns per pass over a chunk's rows (later passes find its weights in cache)
constexpr int64_t ROWS_PER_CHUNK = 64;  // 64 rows of 576 floats: ~150 KB of weights per chunk

struct Operands {
    const float *w;
    int64_t k;
    const float *xt;  // [n, k]: the columns of X, each contiguous
    const float *bias;
    float *out;
    int64_t out_row_stride, out_col_stride;
};

// Rows [first, first + R) x all N columns; R * N accumulators in registers.
template <int R, int N>
void row_block(const Operands &o, int64_t first) {
    vf acc[R][N];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < N; j++) acc[r][j] = vf{};
    const int64_t k = o.k, vec_k = k / W * W;
    for (int64_t c = 0; c < vec_k; c += W) {
        for (int r = 0; r < R; r++) {
            const vf wv = load(o.w + (first + r) * k + c);
            for (int j = 0; j < N; j++) acc[r][j] = fma(wv, load(o.xt + j * k + c), acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++) {
        const float *row = o.w + (first + r) * k;
        for (int j = 0; j < N; j++) {
            float sum = hsum(acc[r][j]);
            for (int64_t t = vec_k; t < k; t++) sum = std::fma(row[t], o.xt[j * k + t], sum);  // see prad::fma
            if (o.bias) sum += o.bias[first + r];
            o.out[(first + r) * o.out_row_stride + j * o.out_col_stride] = sum;
        }
    }
}

// About 8 independent accumulators per pass, whatever N.
template <int N>
constexpr int ROWS = N <= 2 ? 4 : N <= 4 ? 2 : 1;

template <int N>
void rows(const Operands &o, int64_t begin, int64_t end) {
    int64_t r = begin;
    for (; r + ROWS<N> <= end; r += ROWS<N>) row_block<ROWS<N>, N>(o, r);
    for (; r < end; r++) row_block<1, N>(o, r);
}

using Rows = void (*)(const Operands &, int64_t, int64_t);

Rows pick_group(int64_t n) {
    switch (n) {
        case 1: return rows<1>;
        case 2: return rows<2>;
        case 3: return rows<3>;
        case 4: return rows<4>;
        case 5: return rows<5>;
        case 6: return rows<6>;
        case 7: return rows<7>;
        case 8: return rows<8>;
        default: return nullptr;
    }
}

}  // namespace

extern "C" {
// out = w [m, k] @ x [k, n] (row stride ldx) + bias [m] (or null), element (i, j) of the product
// written at out[i * out_row_stride + j * out_col_stride] (a transposed output: swap the strides);
// on up to `threads` threads. Returns 0, or -1 for an empty shape or n > MAX_COLUMNS (nothing written).
int prad_linear_narrow_f32(const float *w, int64_t m, int64_t k, const float *x, int64_t n, int64_t ldx,
                           const float *bias, float *out, int64_t out_row_stride, int64_t out_col_stride,
                           int threads) {
    if (m <= 0 || k <= 0 || n <= 0 || n > MAX_COLUMNS) return -1;
    static thread_local std::vector<float> columns;  // the calling thread's scratch, grown as needed
    const float *xt = x;
    if (n > 1 || ldx != 1) {
        columns.resize(size_t(n * k));
        for (int64_t t = 0; t < k; t++)
            for (int64_t j = 0; j < n; j++) columns[size_t(j * k + t)] = x[t * ldx + j];
        xt = columns.data();
    }
    const Operands o{w, k, xt, bias, out, out_row_stride, out_col_stride};
    parallel_for(threads, (m + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; c++) {
            for (int64_t g = 0; g < n; g += GROUP) {
                Operands group = o;
                group.xt = xt + g * k;
                group.out = out + g * out_col_stride;
                pick_group(std::min<int64_t>(GROUP, n - g))(group, c * ROWS_PER_CHUNK,
                                                            std::min(m, (c + 1) * ROWS_PER_CHUNK));
            }
        }
    });
    return 0;
}
}
