// Element-wise work of the decode step, fused (prad/kernels): the residual add + RMSNorm and
// SiLU(gate) * up, on feature-major activations [features, columns] (columns contiguous), so each
// is one pass over the data instead of the 6-8 small PyTorch ops it replaces. Roundings follow the
// PyTorch path op by op (prad/model.py rms_norm, F.silu(gate) * up): every intermediate that
// PyTorch stores in the activation dtype is rounded to it here too; only the order of the sum of
// squares differs. Single-threaded: one pass over a step's activations is too little work to
// share between threads.
#include "simd.h"

namespace {

using namespace prad;

// h [d, cols] (row stride ld) += y (same layout) if y is given, rounded to T; then
// out = weight * T(h * rsqrt(mean over the d features of h^2 + eps)) for every column, in fp32.
template <typename T>
void add_rms_norm(T *h, const T *y, const T *weight, float eps, int64_t d, int64_t cols, int64_t ld,
                  T *out, int64_t ld_out) {
    float sum_sq[cols];
    for (int64_t c = 0; c < cols; c++) sum_sq[c] = 0.0f;
    const int64_t vec_cols = cols / W * W;
    for (int64_t f = 0; f < d; f++) {
        T *row = h + f * ld;
        const T *add = y ? y + f * ld : nullptr;
        for (int64_t c = 0; c < vec_cols; c += W) {
            vf x = load(row + c);
            if (add) {
                x = round_to<T>(x + load(add + c));
                store(row + c, x);
            }
            store(sum_sq + c, load(sum_sq + c) + x * x);
        }
        for (int64_t c = vec_cols; c < cols; c++) {
            float x = to_float(row[c]);
            if (add) {
                x = round_to<T>(x + to_float(add[c]));
                row[c] = from_float<T>(x);
            }
            sum_sq[c] += x * x;
        }
    }
    float inv[cols];
    for (int64_t c = 0; c < cols; c++) inv[c] = 1.0f / std::sqrt(sum_sq[c] / float(d) + eps);
    for (int64_t f = 0; f < d; f++) {
        const T *row = h + f * ld;
        T *dst = out + f * ld_out;
        const float w = to_float(weight[f]);
        for (int64_t c = 0; c < vec_cols; c += W) store(dst + c, round_to<T>(load(row + c) * load(inv + c)) * w);
        for (int64_t c = vec_cols; c < cols; c++) dst[c] = from_float<T>(round_to<T>(to_float(row[c]) * inv[c]) * w);
    }
}

PRAD_INLINE vf silu(vf x) {  // x * sigmoid(x), with exp(-|x|) <= 1 so exp_nonpositive serves both signs
    const vf ax = x < 0.0f ? -x : x;
    const vf e = exp_nonpositive(-ax);
    const vf num = x < 0.0f ? e : vf{} + 1.0f;  // sigmoid = num / (1 + e): one division, not two
    return x * (num / (1.0f + e));
}

// out [inter, cols] = T(T(silu(gate)) * up), gate = rows [0, inter) and up = rows [inter, 2 inter)
// of gate_up (row stride ld).
template <typename T>
void silu_mul(const T *gate_up, int64_t inter, int64_t cols, int64_t ld, T *out, int64_t ld_out) {
    if (ld == cols && ld_out == cols) {  // dense rows: gate, up and out are each one long row
        cols *= inter;
        ld = ld_out = cols;
        inter = 1;
    }
    const int64_t vec_cols = cols / W * W;
    for (int64_t f = 0; f < inter; f++) {
        const T *gate = gate_up + f * ld, *up = gate_up + (f + inter) * ld;
        T *dst = out + f * ld_out;
        for (int64_t c = 0; c < vec_cols; c += W) store(dst + c, round_to<T>(silu(load(gate + c))) * load(up + c));
        for (int64_t c = vec_cols; c < cols; c++)
            dst[c] = from_float<T>(round_to<T>(silu(vf{} + to_float(gate[c]))[0]) * to_float(up[c]));
    }
}

}  // namespace

extern "C" {
void prad_add_rms_norm_f32(float *h, const float *y, const float *weight, float eps, int64_t d, int64_t cols,
                           int64_t ld, float *out, int64_t ld_out) {
    add_rms_norm(h, y, weight, eps, d, cols, ld, out, ld_out);
}
void prad_add_rms_norm_bf16(uint16_t *h, const uint16_t *y, const uint16_t *weight, float eps, int64_t d,
                            int64_t cols, int64_t ld, uint16_t *out, int64_t ld_out) {
    add_rms_norm(h, y, weight, eps, d, cols, ld, out, ld_out);
}
void prad_silu_mul_f32(const float *gate_up, int64_t inter, int64_t cols, int64_t ld, float *out, int64_t ld_out) {
    silu_mul(gate_up, inter, cols, ld, out, ld_out);
}
void prad_silu_mul_bf16(const uint16_t *gate_up, int64_t inter, int64_t cols, int64_t ld, uint16_t *out,
                        int64_t ld_out) {
    silu_mul(gate_up, inter, cols, ld, out, ld_out);
}
}
