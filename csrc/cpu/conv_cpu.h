// fastsr's own CPU convolutions for layers with very few output channels (the SRResNet tail,
// 64 -> 3 channels, 9x9, at the output resolution) or input channels (its head, 3 -> 64, and the
// tail's input gradient), where oneDNN's kernels leave most vector lanes empty.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

#include <optional>

namespace fastsr::cpu {

// Whether few_out_conv serves this (x, weight) pair: fp32, 1..4 output channels and a reduction
// per output row (K * C_in) of at least one full vector.
bool few_out_conv_applies(const at::Tensor& x, const at::Tensor& weight);

// conv2d(x, weight, bias, stride 1, 'same' padding) -> (N, C_out, H, W) in memory format `fmt`.
at::Tensor few_out_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::MemoryFormat fmt);

// Whether few_in_conv serves this (x, weight) pair: fp32, 1..4 input channels, output channels in
// chunks of 4 vectors, a square odd kernel of 5x5 or more (where it is faster than oneDNN).
bool few_in_conv_applies(const at::Tensor& x, const at::Tensor& weight);

// conv2d(x, weight, bias, stride 1, 'same' padding) -> (N, C_out, H, W), channels_last.
at::Tensor few_in_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace fastsr::cpu
