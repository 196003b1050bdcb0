// Launch functions of the fastsr CUDA kernels (csrc/cuda/kernels.cu). Plain C++ over raw
// pointers and a stream, so kernels.cu includes CUDA headers only and compiles with `nvcc -c`
// anywhere; the torch glue (ops_cuda.cpp) checks tensors and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastsr::cuda {

// Element types of the tensors passed as void*. Accumulation ("acc") is fp64 for kFloat64 and
// fp32 for everything else; slopes and per-image sums are passed in that type.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Geometry shared by all kernels: x is (N, C, H, W) contiguous in NCHW, or in NHWC when
// channels_last.
struct Shape {
  int64_t N, C, H, W;
  bool channels_last;
};

// out = prelu(pixel_shuffle(x, r), slope) + res. x: (N, C*r*r, H, W) as `in`; out, res:
// (N, C, H*r, W*r), same format. slope: C acc values or nullptr (no activation); res may be null.
cudaError_t shuffle_prelu_forward(DType dtype, const void* x, const void* slope, const void* res, void* out,
                                  Shape in, int64_t r, cudaStream_t stream);

// In place over `numel` elements in memory order: y = silu(y), or with skip (same shape and format)
// y = (y + skip) * (sigmoid(y) - 0.5), SPAN's parameter-free attention.
cudaError_t sigmoid_gate(DType dtype, void* y, const void* skip, int64_t numel, cudaStream_t stream);

// Its backward: grad_y = g * (gate + (y + a) * sig * (1 - sig)) and, with a skip, grad_skip = g * gate,
// sig = sigmoid(y), gate = sig - b, (a, b) = (0, 0) or (skip, 0.5). All tensors alike, `numel` elements.
cudaError_t sigmoid_gate_backward(DType dtype, const void* grad, const void* y, const void* skip, void* grad_y,
                                  void* grad_skip, int64_t numel, cudaStream_t stream);

// Backward of shuffle_prelu: grad_x (like x). The slope's gradient is the caller's (a deterministic
// ATen reduction: atomics here made it vary from run to run).
cudaError_t shuffle_prelu_backward(DType dtype, const void* grad_out, const void* x, const void* slope, void* grad_x,
                                   Shape in, int64_t r, cudaStream_t stream);

// sums[n] (fp64, zeroed by the caller) += sum over the cropped region of image n of (a - b)^2,
// or of the BT.601 luma difference squared when y_channel (C == 3).
cudaError_t squared_error_sums(DType dtype, const void* a, const void* b, double* sums, Shape s, int64_t crop,
                               bool y_channel, cudaStream_t stream);

// grad_a = coef[n] * (a - b) inside the region (luma-weighted when y_channel), 0 in the border.
// coef: N acc values.
cudaError_t squared_error_backward(DType dtype, const void* coef, const void* a, const void* b, void* grad_a, Shape s,
                                   int64_t crop, bool y_channel, cudaStream_t stream);

// batch_norm_prelu (training-mode BatchNorm -> PReLU -> + residual) in two passes each way, as the
// CPU kernels (csrc/cpu/batch_norm_prelu_cpu.cpp). The per-channel sums come back as per-block
// partial sums, `partial` = (batch_norm_partial_blocks(s), K, C) fp64, element (b, k, c) at
// (b * K + k) * C + c, every element written (no zeroing needed); the finalize kernels below add
// them up over b.
// Per-channel coefficients come in `coef`: kBnCoefRows x C acc values, row r at coef + r * C.
constexpr int kBnMean = 0, kBnInvstd = 1, kBnWeight = 2, kBnBias = 3, kBnSlope = 4;  // both directions
constexpr int kBnGain = 5, kBnMeanGrad = 6, kBnMeanGradXhat = 7;                       // backward pass 2
constexpr int kBnCoefRows = 8;

// Rows b of `partial` that batch_norm_stats and batch_norm_prelu_grad_sums write for shape s.
int64_t batch_norm_partial_blocks(Shape s);

// partial (K = 2): per-block sums of x and x^2 per channel, in fp64.
cudaError_t batch_norm_stats(DType dtype, const void* x, double* partial, Shape s, cudaStream_t stream);

// y = prelu(xhat * weight + bias, slope) + res, xhat = (x - mean) * invstd, rounded step by step (no
// FMA) as on CPU. coef rows kBnMean..kBnBias, and kBnSlope when act (else no activation); res may be null.
cudaError_t batch_norm_prelu_forward(DType dtype, const void* x, const void* coef, bool act, const void* res, void* y,
                                     Shape s, cudaStream_t stream);

// Between the forward passes: from pass 1's partial (K = 2), per channel c in fp64: mean = sum x / n,
// var = max(sum x^2 / n - mean^2, 0), n = N * H * W; writes coef rows kBnMean..kBnBias (kBnSlope
// when slope is given) and mean[c], var[c]. weight, bias: C acc values; slope: slope_count (1 or C)
// acc values or nullptr; coef, mean, var: acc values. invstd = 1 / sqrt(var + eps), rounded once.
cudaError_t batch_norm_finalize(DType dtype, const double* partial, Shape s, double eps, const void* weight,
                                const void* bias, const void* slope, int64_t slope_count, void* coef, void* mean,
                                void* var, cudaStream_t stream);

// Before backward pass 1: coef rows kBnMean..kBnBias (and kBnSlope with a slope) from the saved
// mean and var (C acc values each), as batch_norm_finalize writes them.
cudaError_t batch_norm_coefficients(DType dtype, const void* mean, const void* var, int64_t C, double eps,
                                    const void* weight, const void* bias, const void* slope, int64_t slope_count,
                                    void* coef, cudaStream_t stream);

// Backward pass 1, partial (K = 3): per-block sums of g', g' * xhat and g * v where !(v > 0) (0 when
// !act) per channel; g' = g, or g * slope where !(v > 0) when act. coef rows kBnMean..kBnSlope.
cudaError_t batch_norm_prelu_grad_sums(DType dtype, const void* grad, const void* x, const void* coef, bool act,
                                       double* partial, Shape s, cudaStream_t stream);

// Backward pass 2: grad_x = gain * (g' - mean_grad - xhat * mean_grad_xhat), all coef rows
// (gain = weight * invstd, the means = pass 1's first two sums / (N * H * W)).
cudaError_t batch_norm_prelu_backward(DType dtype, const void* grad, const void* x, const void* coef, bool act,
                                      void* grad_x, Shape s, cudaStream_t stream);

// Between the backward passes, from pass 1's partial (K = 3 sums S0, S1, S2) and coef's rows
// kBnInvstd and kBnWeight: coef rows kBnGain = weight * invstd, kBnMeanGrad = S0 / n and
// kBnMeanGradXhat = S1 / n; grad_weight = S1 and grad_bias = S0 (C acc values each); grad_slope (fp64,
// nullptr without a slope) = S2 per channel, or its total over the channels when slope_count is 1.
cudaError_t batch_norm_backward_finalize(DType dtype, const double* partial, Shape s, void* coef, void* grad_weight,
                                         void* grad_bias, double* grad_slope, int64_t slope_count,
                                         cudaStream_t stream);

// out (N, H, W, C) uint8 = round_half_even(clamp(x, 0, 1) * 255), NaN -> 0.
cudaError_t to_uint8(DType dtype, const void* x, uint8_t* out, Shape s, cudaStream_t stream);

}  // namespace fastsr::cuda
