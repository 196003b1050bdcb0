// Helpers shared by the CPU and CUDA glue of the fastsr extension (torch headers allowed here,
// never in csrc/cuda/*.cu).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include <optional>
#include <tuple>

namespace fastsr {

// The memory format every op produces: channels_last when the input's channels are adjacent in
// memory (stride 1) and it is not plain NCHW-contiguous (which a channels_last tensor also is for
// C == 1 or H == W == 1), else NCHW. That covers channels_last tensors and channel slices of them
// (x[:, :k] of an NHWC buffer: RRDBNet's concat-free dense blocks), as PyTorch's own ops decide.
// fastsr/layout.py holds this rule in Python (memory_format_of), for the dispatcher, the Triton
// kernels and csrc/backend.py's fake (meta) kernels: keep the two identical, so torch.compile sees
// the real strides.
inline at::MemoryFormat output_format(const at::Tensor& x) {
  return x.dim() == 4 && x.stride(1) == 1 && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                 : at::MemoryFormat::Contiguous;
}

// Grain size for at::parallel_for over items of `work` elements each: small tensors run on the
// calling thread. Without it every tiny op (gradcheck, small batches) opens an OpenMP region,
// which on a busy machine waits for a descheduled thread each time.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work));
}

// What follows a convolution: conv2d_prelu's PReLU (none without a slope) then "+ residual", or
// conv2d_silu's (y + a) * (sigmoid(y) - b): SiLU (a = b = 0) or SPAN's attention (a = the skip,
// passed as the residual, b = 0.5).
enum class Act : int { kPReLU = 0, kSiLU = 1, kAttention = 2 };

inline bool is_channels_last(at::MemoryFormat f) { return f == at::MemoryFormat::ChannelsLast; }

// Slope of a (P)ReLU as one value per channel in the accumulation dtype (fp64 for fp64, else
// fp32), contiguous: kernels index it by channel without caring whether it was shared.
inline void check_slope(const at::Tensor& slope, int64_t channels) {
  TORCH_CHECK(slope.numel() == 1 || slope.numel() == channels, "fastsr: slope must have 1 or ", channels,
              " elements, got ", slope.numel());
}

inline at::Tensor per_channel_slope(const at::Tensor& slope, int64_t channels, at::ScalarType acc) {
  check_slope(slope, channels);
  return slope.to(acc).reshape({-1}).expand({channels}).contiguous();
}

// The accumulation dtype: fp64 for fp64, else fp32 (fastsr/layout.py's acc_dtype).
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fastsr: ", name, " must be a 4-D (N, C, H, W) tensor, got ", t.dim(), " dims");
}

// batch_norm_prelu's inputs (CPU and CUDA): C-element weight and bias, and more than one value per
// channel (a training BatchNorm's variance needs two).
inline void check_batch_norm_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_4d(x, "x");
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.numel() == C && bias.numel() == C, "fastsr: weight and bias must have ", C,
              " elements, got ", weight.numel(), " and ", bias.numel());
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, "fastsr: batch_norm_prelu needs more than one value per "
              "channel in training, got input of shape ", x.sizes());
}

// 'same' convolution, stride 1, as every fastsr op uses it (odd square kernels).
inline at::Tensor conv_same(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "fastsr: weight must be (C_out, C_in, K, K) with odd K, got ", weight.sizes());
  const int64_t p = weight.size(2) / 2;
  return at::convolution(x, weight, bias, {1, 1}, {p, p}, {1, 1}, false, {0, 0}, 1);
}

// conv2d_silu's skip in `like`'s dtype and memory format `fmt`, its shape checked; an undefined
// tensor without one.
inline at::Tensor skip_like(const std::optional<at::Tensor>& skip, const at::Tensor& like, at::MemoryFormat fmt) {
  if (!skip) return at::Tensor();
  TORCH_CHECK(skip->sizes() == like.sizes(), "fastsr: skip must have shape ", like.sizes(), ", got ", skip->sizes());
  return skip->to(like.scalar_type()).contiguous(fmt);
}

// The operands of sigmoid_gate_backward, all dense in y's memory format so one flat index serves
// every tensor, and its outputs allocated (grad_skip: 0 elements without a skip). The CPU and CUDA
// kernels fill grad_y / grad_skip; result() hands grad_skip back in the skip's own dtype.
struct SigmoidGateGrads {
  at::Tensor y, grad, skip, grad_y, grad_skip;

  std::tuple<at::Tensor, at::Tensor> result(const std::optional<at::Tensor>& skip_in) const {
    return {grad_y, skip_in ? grad_skip.to(skip_in->scalar_type()) : grad_skip};
  }
};

inline SigmoidGateGrads sigmoid_gate_grads(const at::Tensor& grad, const at::Tensor& y,
                                           const std::optional<at::Tensor>& skip) {
  check_4d(y, "y");
  const auto fmt = output_format(y);
  SigmoidGateGrads t;
  t.y = y.contiguous(fmt);
  t.grad = grad.to(y.scalar_type()).contiguous(fmt);
  TORCH_CHECK(t.grad.sizes() == t.y.sizes(), "fastsr: grad has shape ", t.grad.sizes(), ", y ", t.y.sizes());
  t.skip = skip_like(skip, t.y, fmt);
  t.grad_y = at::empty_like(t.y, fmt);
  t.grad_skip = skip ? at::empty_like(t.y, fmt) : at::empty({0}, y.options());
  return t;
}

// Y = sum_c Y_WEIGHTS[c] * rgb[c] + offset (MATLAB rgb2ycbcr on [0, 1] data); the offset cancels
// in a difference, which is all the reductions need. Same numbers as fastsr/constants.py.
constexpr double kYWeights[3] = {65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0};

}  // namespace fastsr
