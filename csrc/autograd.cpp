// Autograd formulas of the differentiable fastsr ops, registered for every device (Autograd key).
// In C++ rather than through torch.library.register_autograd: a Python autograd wrapper cost ~30 us
// per op each way, ~4 ms of a 60 ms CPU SRResNet training step (73 ops forward, as many backward).
//   conv2d_prelu     the backward un-shuffles the gradient, or (with a slope) recomputes the
//                    convolution for the PReLU's derivative (like activation checkpointing: the op
//                    saves only its inputs). The backend's conv2d_prelu under autograd never takes
//                    the fused path with a slope (csrc/backend.py: conv + bias, then shuffle_prelu);
//                    the recompute serves direct torch.ops.fastsr.conv2d_prelu calls.
//   conv2d_silu      recomputes the convolution for the activation's derivative (sigmoid_gate_backward).
//   shuffle_prelu    shuffle_prelu_backward.
//   batch_norm_prelu batch_norm_prelu_backward (mean and var are statistics, not differentiable).
//   mse_per_image    mse_per_image_backward (d/db is the negation of d/da).
// And adam_step_'s version-counter bumps (the ADInplaceOrView key), as ATen's in-place ops have them.
// The convolutions' input gradients: oneDNN (at::convolution_backward), but for a few-output conv on
// CPU in fp32 (the 64 -> 3 tail) in the AVX2 and AVX-512 builds, whose input gradient is the 3 -> 64
// convolution of the gradient with the flipped, transposed weight: conv2d_prelu's few-input kernel
// where it applies (cpu::few_in_conv_applies: SRResNet's 9x9 tail to 64 channels), the same FMAs in the
// same order as oneDNN's (bit for bit on SRResNet's tail on a Zen 5, natively and under
// the AVX2 approximation), 1.2x oneDNN's speed under AVX2. Not in the portable build: without FMA its
// sums round twice per term, and a whole SRResNet's slope gradient then left the rule.
// The 3x3 convs' input gradient stays on oneDNN: through the Winograd kernel it was 1.3x faster at
// 24x24, but a whole SRResNet's slope gradient then broke the tolerance rule (1.4x the bound; 1.75x
// when tried again).
// The weight gradients on CPU in fp32: conv2d_weight_grad for a few-output conv (5-10x oneDNN) and for
// the 3x3 many-channel convs (Winograd, 1.6-1.9x oneDNN's weight gradient on Zen 4), written in the
// weight's own layout so AccumulateGrad stores it as it is; oneDNN elsewhere, input and weight in one call.
// Per-op ATen headers rather than ATen/ATen.h: this file is the extension's slowest to compile.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/pixel_unshuffle.h>
#include <ATen/ops/sum.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "cpu/conv_cpu.h"

namespace fastsr {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// The op itself below the autograd key (the CPU or CUDA kernel).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Tensor call_conv2d_prelu(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& slope,
                         const OptTensor& residual, int64_t shuffle) {
  static const auto handle = op<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                       const OptTensor&, int64_t)>("fastsr::conv2d_prelu");
  return handle.call(x, weight, bias, slope, residual, shuffle);
}

// A saved optional tensor comes back undefined when it was None.
OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// ctx->needs_input_grad by tensor argument position. The context numbers only the tensor arguments
// that were given (an absent optional has no edge), so forward saves which were: bit i for argument i.
void save_given(AutogradContext* ctx, std::initializer_list<bool> arguments) {
  int64_t bits = 0, i = 0;
  for (const bool present : arguments) bits |= int64_t(present) << i++;
  ctx->saved_data["given"] = bits;
}

bool was_given(AutogradContext* ctx, int argument) { return ctx->saved_data["given"].toInt() >> argument & 1; }

// False for an argument that was not given.
bool needs(AutogradContext* ctx, int argument) {
  const int64_t bits = ctx->saved_data["given"].toInt();
  if (!was_given(ctx, argument)) return false;
  const int64_t edge = __builtin_popcountll(static_cast<uint64_t>(bits & ((int64_t(1) << argument) - 1)));
  return ctx->needs_input_grad(static_cast<size_t>(edge));
}

// An fp32 CPU conv with input channels in multiples of 16: the shapes fastsr's own CPU gradients serve.
bool fp32_cpu_16(const Tensor& x, const Tensor& weight) {
  const auto fp32_cpu = [](const Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; };
  return fp32_cpu(x) && fp32_cpu(weight) && x.size(1) % 16 == 0;
}

// A few-output conv (1-4 output channels: a tail conv).
bool few_output(const Tensor& x, const Tensor& weight) { return fp32_cpu_16(x, weight) && weight.size(0) <= 4; }

// Whether its input gradient is the few-input convolution (see the top of this file).
constexpr bool kOwnInputGrad =
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    true;
#else
    false;
#endif

// conv2d_weight_grad's shapes (fp32 CPU): a few-output conv, or a 3x3 kernel with input and output
// channels in multiples of 16 (Winograd).
bool own_weight_grad(const Tensor& x, const Tensor& weight) {
  return few_output(x, weight) || (fp32_cpu_16(x, weight) && weight.size(-1) == 3 && weight.size(-2) == 3 &&
                                    weight.size(0) % 16 == 0);
}

// (grad_x, grad_weight, grad_bias) of the 'same' convolution for the gradient of its output; undefined
// where not needed (need: x, weight, bias).
std::array<Tensor, 3> conv_grads(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                 std::array<bool, 3> need) {
  static const auto weight_grad =
      op<Tensor(const Tensor&, const Tensor&, int64_t, bool)>("fastsr::conv2d_weight_grad");
  std::array<Tensor, 3> out;
  const bool own_x = kOwnInputGrad && need[0] && few_output(x, weight) &&
                     cpu::few_in_conv_applies(grad, weight.transpose(0, 1));
  if (own_x)
    out[0] = call_conv2d_prelu(grad, weight.flip({2, 3}).transpose(0, 1), std::nullopt, std::nullopt, std::nullopt,
                               1);
  const bool own_w = need[1] && own_weight_grad(x, weight);
  if (own_w)
    out[1] = weight_grad.call(grad, x, weight.size(-1),
                              weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast);
  // Asked for the bias gradient too, oneDNN computes the weight gradient (15 ms of a tail's 17).
  if (own_w && need[2] && bias) out[2] = grad.sum({0, 2, 3});
  const std::array<bool, 3> mask{need[0] && !own_x, need[1] && !own_w,
                                  need[2] && bias.has_value() && !out[2].defined()};
  if (mask[0] || mask[1] || mask[2]) {
    const int64_t pad = weight.size(-1) / 2;
    const std::vector<int64_t> bias_sizes = bias ? std::vector<int64_t>{bias->size(0)} : std::vector<int64_t>{};
    auto [gx, gw, gb] = at::convolution_backward(
        grad, x, weight, bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), {1, 1},
        {pad, pad}, {1, 1}, false, {0, 0}, 1, mask);
    if (mask[0]) out[0] = gx;
    if (mask[1]) out[1] = gw;
    if (mask[2]) out[2] = gb;
  }
  return out;
}

struct Conv2dPReLU : public torch::autograd::Function<Conv2dPReLU> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const OptTensor& slope, const OptTensor& residual, int64_t shuffle) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_given(ctx, {true, true, given(bias), given(slope), given(residual)});
    ctx->saved_data["shuffle"] = shuffle;
    ctx->save_for_backward({x, weight, bias.value_or(Tensor()), slope.value_or(Tensor())});
    return call_conv2d_prelu(x, weight, bias, slope, residual, shuffle);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto shuffle_backward = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                                       int64_t)>("fastsr::shuffle_prelu_backward");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &grad = grads[0];
    const OptTensor bias = optional(saved[2]), slope = optional(saved[3]);
    const int64_t r = ctx->saved_data["shuffle"].toInt();
    Tensor grad_pre, grad_slope;
    if (slope) {
      const Tensor pre = call_conv2d_prelu(x, weight, bias, std::nullopt, std::nullopt, 1);
      std::tie(grad_pre, grad_slope) = shuffle_backward.call(grad, pre, slope, r);
    } else {
      grad_pre = r > 1 ? at::pixel_unshuffle(grad, r) : grad;
    }
    auto [gx, gw, gb] = conv_grads(grad_pre, x, weight, bias,
                                   {needs(ctx, 0), needs(ctx, 1), needs(ctx, 2)});
    return {gx, gw, gb, needs(ctx, 3) ? grad_slope : Tensor(), was_given(ctx, 4) ? grad : Tensor(), Tensor()};
  }
};

struct Conv2dSiLU : public torch::autograd::Function<Conv2dSiLU> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const OptTensor& skip) {
    static const auto handle =
        op<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&)>("fastsr::conv2d_silu");
    at::AutoDispatchBelowADInplaceOrView guard;
    save_given(ctx, {true, true, given(bias), given(skip)});
    ctx->save_for_backward({x, weight, bias.value_or(Tensor()), skip.value_or(Tensor())});
    return handle.call(x, weight, bias, skip);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto gate_backward = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&)>(
        "fastsr::sigmoid_gate_backward");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1];
    const OptTensor bias = optional(saved[2]), skip = optional(saved[3]);
    const Tensor pre = call_conv2d_prelu(x, weight, bias, std::nullopt, std::nullopt, 1);
    auto [grad_pre, grad_skip] = gate_backward.call(grads[0], pre, skip);
    auto [gx, gw, gb] = conv_grads(grad_pre, x, weight, bias,
                                   {needs(ctx, 0), needs(ctx, 1), needs(ctx, 2)});
    return {gx, gw, gb, needs(ctx, 3) ? grad_skip : Tensor()};
  }
};

struct ShufflePReLU : public torch::autograd::Function<ShufflePReLU> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& slope, const OptTensor& residual,
                        int64_t r) {
    static const auto handle =
        op<Tensor(const Tensor&, const OptTensor&, const OptTensor&, int64_t)>("fastsr::shuffle_prelu");
    at::AutoDispatchBelowADInplaceOrView guard;
    save_given(ctx, {true, given(slope), given(residual)});
    ctx->saved_data["r"] = r;
    ctx->save_for_backward({x, slope.value_or(Tensor())});
    return handle.call(x, slope, residual, r);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                             int64_t)>("fastsr::shuffle_prelu_backward");
    const auto saved = ctx->get_saved_variables();
    const OptTensor slope = optional(saved[1]);
    auto [grad_x, grad_slope] = handle.call(grads[0], saved[0], slope, ctx->saved_data["r"].toInt());
    return {grad_x, needs(ctx, 1) ? grad_slope : Tensor(), was_given(ctx, 2) ? grads[0] : Tensor(), Tensor()};
  }
};

struct BatchNormPReLU : public torch::autograd::Function<BatchNormPReLU> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const OptTensor& slope, const OptTensor& residual, double eps) {
    static const auto handle =
        op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                              const OptTensor&, double)>("fastsr::batch_norm_prelu");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, var] = handle.call(x, weight, bias, slope, residual, eps);
    ctx->mark_non_differentiable({mean, var});
    save_given(ctx, {true, true, true, given(slope), given(residual)});
    ctx->saved_data["eps"] = eps;
    ctx->save_for_backward({x, mean, var, weight, bias, slope.value_or(Tensor())});
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle =
        op<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, const OptTensor&, double)>(
            "fastsr::batch_norm_prelu_backward");
    const auto saved = ctx->get_saved_variables();
    const OptTensor slope = optional(saved[5]);
    auto [gx, gw, gb, gs] = handle.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], slope,
                                        ctx->saved_data["eps"].toDouble());
    const auto keep = [&](int i, const Tensor& g) { return needs(ctx, i) ? g : Tensor(); };
    return {keep(0, gx), keep(1, gw), keep(2, gb), keep(3, gs), was_given(ctx, 4) ? grads[0] : Tensor(), Tensor()};
  }
};

struct MsePerImage : public torch::autograd::Function<MsePerImage> {
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, double scale, bool y_channel,
                        int64_t crop) {
    static const auto handle =
        op<Tensor(const Tensor&, const Tensor&, double, bool, int64_t)>("fastsr::mse_per_image");
    at::AutoDispatchBelowADInplaceOrView guard;
    save_given(ctx, {true, true});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["y_channel"] = y_channel;
    ctx->saved_data["crop"] = crop;
    ctx->save_for_backward({a, b});
    return handle.call(a, b, scale, y_channel, crop);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = op<Tensor(const Tensor&, const Tensor&, const Tensor&, double, bool, int64_t)>(
        "fastsr::mse_per_image_backward");
    const auto saved = ctx->get_saved_variables();
    const Tensor grad_a = handle.call(grads[0], saved[0], saved[1], ctx->saved_data["scale"].toDouble(),
                                      ctx->saved_data["y_channel"].toBool(), ctx->saved_data["crop"].toInt());
    return {needs(ctx, 0) ? grad_a : Tensor(),
            needs(ctx, 1) ? (-grad_a).to(saved[1].scalar_type()) : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor conv2d_prelu_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& slope,
                             const OptTensor& residual, int64_t shuffle) {
  return Conv2dPReLU::apply(x, weight, bias, slope, residual, shuffle);
}

Tensor conv2d_silu_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& skip) {
  return Conv2dSiLU::apply(x, weight, bias, skip);
}

Tensor shuffle_prelu_autograd(const Tensor& x, const OptTensor& slope, const OptTensor& residual, int64_t r) {
  return ShufflePReLU::apply(x, slope, residual, r);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_prelu_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                             const OptTensor& slope, const OptTensor& residual,
                                                             double eps) {
  const auto out = BatchNormPReLU::apply(x, weight, bias, slope, residual, eps);
  return {out[0], out[1], out[2]};
}

Tensor mse_per_image_autograd(const Tensor& a, const Tensor& b, double scale, bool y_channel, int64_t crop) {
  return MsePerImage::apply(a, b, scale, y_channel, crop);
}

// adam_step_ changes its parameters, moments and step counts in place: like ATen's in-place ops (and
// torch's fused Adam), it bumps their version counters, so autograd's check of saved tensors and
// caches keyed on a tensor's version see the change. Without this a parameter updated by it kept its
// version (the Winograd weight cache still saw the change: it also compares the values' fingerprint).
void adam_step_inplace(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                       double eps, double weight_decay) {
  static const auto handle = op<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                     double, double, double, double, double)>("fastsr::adam_step_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    handle.call(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay);
  }
  for (const at::TensorList list : {params, exp_avgs, exp_avg_sqs, steps})
    for (const Tensor& t : list) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsr, Autograd, m) {
  m.impl("conv2d_prelu", &conv2d_prelu_autograd);
  m.impl("conv2d_silu", &conv2d_silu_autograd);
  m.impl("shuffle_prelu", &shuffle_prelu_autograd);
  m.impl("batch_norm_prelu", &batch_norm_prelu_autograd);
  m.impl("mse_per_image", &mse_per_image_autograd);
}

TORCH_LIBRARY_IMPL(fastsr, ADInplaceOrView, m) { m.impl("adam_step_", &adam_step_inplace); }

}  // namespace fastsr
