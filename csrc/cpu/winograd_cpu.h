// Winograd F(2x2, 3x3) convolution for the fp32 3x3 layers with many channels (SRResNet's
// 64 -> 64 body convs and 64 -> 256 upsample convs), with the whole conv2d_prelu epilogue (bias,
// PReLU, residual, pixel-shuffle store; or conv2d_silu's SiLU / attention) fused into the output
// transform.
//
// Why F(2x2) and not F(4x4): the correctness rule (tests/tolerance.py: |ours - ref64| <=
// 2 |torch_fp32 - ref64| + 2e-6 max|ref64|, elementwise) is violated by F(4x4) in fp32 with the
// standard points (0, +-1, +-2: worst element 2.5-3.4x over the bound on randn data) and, more
// narrowly, with the best points tried (0, +-1, 1/2, -2: up to 1.24x over); F(3x3) fails the same
// way. F(2x2) uses only the points 0, +-1 (exact transforms up to additions) and stays ~5x inside
// the bound.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "../common.h"

namespace fastsr::cpu {

// Whether winograd_conv2d serves this call: fp32, 3x3 kernel, C_in and C_out / shuffle^2
// multiples of 16, and (in the default "auto" mode) a batch of at least 64 pixels.
bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, int64_t shuffle);

// prelu(pixel_shuffle(conv2d(x, weight, bias, 'same'), shuffle), slope) + residual (act kPReLU),
// or conv2d_silu's activation of the conv (kSiLU; kAttention with the skip as `residual`, shuffle
// 1), output in memory format `fmt` (common.h's output_format(x)).
at::Tensor winograd_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& slope, const std::optional<at::Tensor>& residual,
                           int64_t shuffle, at::MemoryFormat fmt, Act act = Act::kPReLU);

// The weight gradient of a 'same' 3x3 convolution (stride 1, no dilation) for the output gradient
// `grad` (N, C_out, H, W) and input x (N, C_in, H, W), both fp32 with channels in multiples of 16:
// (C_out, C_in, 3, 3) fp32 in memory format `fmt`, by Winograd F(2x2, 3x3): 16 GEMMs over the
// transformed tiles instead of 9 taps over the pixels. Supported: those shapes and dtypes; applies:
// supported and taken by the mode, as the forward (its "auto" size threshold, FASTSR_WINOGRAD).
bool winograd_weight_grad_supported(const at::Tensor& grad, const at::Tensor& x);
bool winograd_weight_grad_applies(const at::Tensor& grad, const at::Tensor& x);
at::Tensor winograd_weight_grad(const at::Tensor& grad, const at::Tensor& x, at::MemoryFormat fmt);

}  // namespace fastsr::cpu
