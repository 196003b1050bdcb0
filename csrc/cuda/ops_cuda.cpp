// Torch glue of the CUDA kernels (compiled only in CUDA builds of the extension): checks and
// prepares tensors, runs the convolution through ATen (cuDNN), and calls the launch functions
// of kernels.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "launch.h"

namespace fastsr {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "fastsr: CUDA kernels take fp32/fp64/fp16/bf16 tensors, got ", t.scalar_type());
  }
}

cuda::Shape shape_of(const at::Tensor& t, at::MemoryFormat fmt) {
  return {t.size(0), t.size(1), t.size(2), t.size(3), is_channels_last(fmt)};
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastsr: CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor epilogue(at::Tensor pre, const std::optional<at::Tensor>& slope, const std::optional<at::Tensor>& residual,
                    int64_t r, at::MemoryFormat fmt) {
  const int64_t N = pre.size(0), CP = pre.size(1), H = pre.size(2), W = pre.size(3);
  TORCH_CHECK(r >= 1 && CP % (r * r) == 0, "fastsr: ", CP, " channels are not divisible by shuffle**2 = ", r * r);
  const int64_t C = CP / (r * r);
  pre = pre.contiguous(fmt);
  at::Tensor out = at::empty({N, C, H * r, W * r}, pre.options(), fmt);
  at::Tensor res, s;
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes(), "fastsr: residual must have shape ", out.sizes(), ", got ",
                residual->sizes());
    res = residual->to(pre.scalar_type()).contiguous(fmt);
  }
  if (slope) s = per_channel_slope(slope->to(pre.device()), C, acc_type(pre.scalar_type()));
  check(cuda::shuffle_prelu_forward(dtype_of(pre), pre.const_data_ptr(), ptr_or_null(s), ptr_or_null(res),
                                    out.mutable_data_ptr(), shape_of(pre, fmt), r,
                                    c10::cuda::getCurrentCUDAStream().stream()),
        "shuffle_prelu_forward");
  return out;
}

at::Tensor conv2d_prelu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& slope, const std::optional<at::Tensor>& residual,
                             int64_t shuffle) {
  check_4d(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_format(x);
  at::Tensor pre = conv_same(x, weight, bias).contiguous(fmt);  // cuDNN adds the bias
  if (!slope && !residual && shuffle == 1) return pre;
  return epilogue(std::move(pre), slope, residual, shuffle, fmt);
}

at::Tensor conv2d_silu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& skip) {
  check_4d(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_format(x);
  at::Tensor y = conv_same(x, weight, bias).contiguous(fmt);  // cuDNN adds the bias
  const at::Tensor s = skip_like(skip, y, fmt);
  check(cuda::sigmoid_gate(dtype_of(y), y.mutable_data_ptr(), ptr_or_null(s), y.numel(),
                           c10::cuda::getCurrentCUDAStream().stream()),
        "sigmoid_gate");
  return y;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_gate_backward_cuda(const at::Tensor& grad, const at::Tensor& y,
                                                              const std::optional<at::Tensor>& skip) {
  const c10::cuda::CUDAGuard guard(y.device());
  const SigmoidGateGrads t = sigmoid_gate_grads(grad, y, skip);
  check(cuda::sigmoid_gate_backward(dtype_of(t.y), t.grad.const_data_ptr(), t.y.const_data_ptr(), ptr_or_null(t.skip),
                                    t.grad_y.mutable_data_ptr(), skip ? t.grad_skip.mutable_data_ptr() : nullptr,
                                    t.y.numel(), c10::cuda::getCurrentCUDAStream().stream()),
        "sigmoid_gate_backward");
  return t.result(skip);
}

at::Tensor shuffle_prelu_cuda(const at::Tensor& x, const std::optional<at::Tensor>& slope,
                              const std::optional<at::Tensor>& residual, int64_t r) {
  check_4d(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return epilogue(x, slope, residual, r, output_format(x));
}

std::tuple<at::Tensor, at::Tensor> shuffle_prelu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const std::optional<at::Tensor>& slope, int64_t r) {
  check_4d(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_format(x);
  const int64_t C = x.size(1) / (r * r);
  const at::Tensor xc = x.contiguous(fmt), g = grad_out.to(x.scalar_type()).contiguous(fmt);
  TORCH_CHECK(g.size(0) == x.size(0) && g.size(1) == C && g.size(2) == x.size(2) * r && g.size(3) == x.size(3) * r,
              "fastsr: grad_out has shape ", g.sizes());
  at::Tensor grad_x = at::empty_like(xc, fmt);
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor s = slope ? per_channel_slope(slope->to(x.device()), C, acc) : at::Tensor();
  check(cuda::shuffle_prelu_backward(dtype_of(xc), g.const_data_ptr(), xc.const_data_ptr(), ptr_or_null(s),
                                     grad_x.mutable_data_ptr(), shape_of(xc, fmt), r,
                                     c10::cuda::getCurrentCUDAStream().stream()),
        "shuffle_prelu_backward");
  if (!slope) return {grad_x, at::empty({0}, x.options())};
  // sum(grad * x) over x <= 0 (NaN included, as the kernel's test) per channel, by ATen's reduction:
  // deterministic, unlike atomics (gradcheck's reentrancy check failed on them on an H200).
  const at::Tensor unshuffled = r == 1 ? g : at::pixel_unshuffle(g, r);  // (N, C*r*r, H, W), like x
  const at::Tensor terms = (xc.to(acc) * unshuffled.to(acc)).masked_fill_(xc > 0, 0);
  const at::Tensor per_channel = terms.sum({0, 2, 3}).view({C, r * r}).sum(1);
  const at::Tensor grad_slope = slope->numel() == 1 ? per_channel.sum() : per_channel;
  return {grad_x, grad_slope.reshape(slope->sizes()).to(slope->scalar_type())};
}

// batch_norm_prelu's per-channel parameters as its kernels read them: C acc values each for weight
// and bias, and the slope's 1 or C values (undefined without one); no copies for the functional API's
// arguments, which are already so.
struct BnParams {
  at::Tensor weight, bias, slope;
  int64_t slope_count = 0;
};

// t's `count` values (reshape checks the count) as a contiguous vector of x's acc dtype on x's device.
at::Tensor acc_values(const at::Tensor& t, const at::Tensor& x, int64_t count) {
  return t.to(x.device(), acc_type(x.scalar_type())).reshape({count}).contiguous();
}

BnParams bn_params(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& slope) {
  const int64_t C = x.size(1);
  BnParams p;
  p.weight = acc_values(weight, x, C);
  p.bias = acc_values(bias, x, C);
  if (slope) {
    check_slope(*slope, C);
    p.slope_count = slope->numel();
    p.slope = acc_values(*slope, x, p.slope_count);
  }
  return p;
}

// Both directions: one kernel per pass and one for the per-channel step between them (kernels.cu),
// so a call launches 3 kernels forward and 4 backward (ATen ops for that step took about 20 more
// launches forward and 25 backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_prelu_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& slope,
    const std::optional<at::Tensor>& residual, double eps) {
  check_batch_norm_inputs(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor res;
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "fastsr: residual must have shape ", x.sizes());
    res = residual->to(x.scalar_type()).contiguous(fmt);
  }
  const cuda::Shape s = shape_of(xc, fmt);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor partial = at::empty({cuda::batch_norm_partial_blocks(s), 2, s.C}, x.options().dtype(at::kDouble));
  check(cuda::batch_norm_stats(dtype_of(xc), xc.const_data_ptr(), partial.mutable_data_ptr<double>(), s, stream),
        "batch_norm_stats");
  const BnParams p = bn_params(xc, weight, bias, slope);
  at::Tensor coef = at::empty({cuda::kBnCoefRows, s.C}, acc), mean = at::empty({s.C}, acc), var = at::empty({s.C}, acc);
  check(cuda::batch_norm_finalize(dtype_of(xc), partial.const_data_ptr<double>(), s, eps, p.weight.const_data_ptr(),
                                  p.bias.const_data_ptr(), ptr_or_null(p.slope), p.slope_count,
                                  coef.mutable_data_ptr(), mean.mutable_data_ptr(), var.mutable_data_ptr(), stream),
        "batch_norm_finalize");
  at::Tensor y = at::empty_like(xc, fmt);
  check(cuda::batch_norm_prelu_forward(dtype_of(xc), xc.const_data_ptr(), coef.const_data_ptr(), slope.has_value(),
                                       ptr_or_null(res), y.mutable_data_ptr(), s, stream),
        "batch_norm_prelu_forward");
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_prelu_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& slope, double eps) {
  check_batch_norm_inputs(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_format(x);
  const at::Tensor xc = x.contiguous(fmt), g = grad.to(x.scalar_type()).contiguous(fmt);
  TORCH_CHECK(g.sizes() == x.sizes(), "fastsr: grad has shape ", g.sizes(), ", x ", x.sizes());
  const cuda::Shape s = shape_of(xc, fmt);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  const bool act = slope.has_value();
  const BnParams p = bn_params(xc, weight, bias, slope);
  const at::Tensor mean_acc = acc_values(mean, xc, s.C), var_acc = acc_values(var, xc, s.C);
  at::Tensor coef = at::empty({cuda::kBnCoefRows, s.C}, acc);
  check(cuda::batch_norm_coefficients(dtype_of(xc), mean_acc.const_data_ptr(), var_acc.const_data_ptr(), s.C, eps,
                                      p.weight.const_data_ptr(), p.bias.const_data_ptr(), ptr_or_null(p.slope),
                                      p.slope_count, coef.mutable_data_ptr(), stream),
        "batch_norm_coefficients");
  at::Tensor partial = at::empty({cuda::batch_norm_partial_blocks(s), 3, s.C}, x.options().dtype(at::kDouble));
  check(cuda::batch_norm_prelu_grad_sums(dtype_of(xc), g.const_data_ptr(), xc.const_data_ptr(), coef.const_data_ptr(),
                                         act, partial.mutable_data_ptr<double>(), s, stream),
        "batch_norm_prelu_grad_sums");
  // Rounded from fp64 to the acc dtype in the kernel: the weight's own dtype as fastsr.functional passes
  // it (the CPU kernel rounds once to any weight dtype; a direct op call with bf16 weights rounds twice here).
  at::Tensor grad_weight = at::empty({s.C}, acc), grad_bias = at::empty({s.C}, acc);
  at::Tensor slope_sums = act ? at::empty({p.slope_count}, x.options().dtype(at::kDouble)) : at::Tensor();
  check(cuda::batch_norm_backward_finalize(dtype_of(xc), partial.const_data_ptr<double>(), s, coef.mutable_data_ptr(),
                                           grad_weight.mutable_data_ptr(), grad_bias.mutable_data_ptr(),
                                           act ? slope_sums.mutable_data_ptr<double>() : nullptr, p.slope_count,
                                           stream),
        "batch_norm_backward_finalize");
  at::Tensor grad_x = at::empty_like(xc, fmt);
  check(cuda::batch_norm_prelu_backward(dtype_of(xc), g.const_data_ptr(), xc.const_data_ptr(), coef.const_data_ptr(),
                                        act, grad_x.mutable_data_ptr(), s, stream),
        "batch_norm_prelu_backward");
  const at::Tensor grad_slope =
      act ? slope_sums.reshape(slope->sizes()).to(slope->scalar_type()) : at::empty({0}, x.options());
  return {grad_x, grad_weight.to(weight.scalar_type()), grad_bias.to(bias.scalar_type()), grad_slope};
}

void check_pair(const at::Tensor& a, const at::Tensor& b, bool y_channel, int64_t crop) {
  check_4d(a, "a");
  TORCH_CHECK(a.sizes() == b.sizes(), "fastsr: image batches differ in shape: ", a.sizes(), " vs ", b.sizes());
  TORCH_CHECK(!y_channel || a.size(1) == 3, "fastsr: y_channel needs RGB images (3 channels), got ", a.size(1));
  TORCH_CHECK(crop >= 0 && 2 * crop < a.size(2) && 2 * crop < a.size(3), "fastsr: crop_border=", crop,
              " leaves nothing of a ", a.size(2), "x", a.size(3), " image");
}

at::Tensor mse_per_image_cuda(const at::Tensor& a, const at::Tensor& b, double scale, bool y_channel, int64_t crop) {
  check_pair(a, b, y_channel, crop);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto fmt = output_format(a);
  const at::Tensor ac = a.contiguous(fmt), bc = b.to(a.scalar_type()).contiguous(fmt);
  const int64_t count = (y_channel ? 1 : a.size(1)) * (a.size(2) - 2 * crop) * (a.size(3) - 2 * crop);
  at::Tensor sums = at::zeros({a.size(0)}, a.options().dtype(at::kDouble));
  // The kernel's grid has one row per image (at most 65535): larger batches go in slices.
  constexpr int64_t kMaxImages = 65535;
  for (int64_t n0 = 0; n0 < a.size(0); n0 += kMaxImages) {
    const int64_t n1 = std::min(a.size(0), n0 + kMaxImages);
    const at::Tensor as = ac.slice(0, n0, n1), bs = bc.slice(0, n0, n1);
    check(cuda::squared_error_sums(dtype_of(as), as.const_data_ptr(), bs.const_data_ptr(),
                                   sums.slice(0, n0, n1).mutable_data_ptr<double>(), shape_of(as, fmt), crop,
                                   y_channel, c10::cuda::getCurrentCUDAStream().stream()),
          "squared_error_sums");
  }
  return (sums * (scale * scale / static_cast<double>(count))).to(acc_type(a.scalar_type()));
}

at::Tensor mse_per_image_backward_cuda(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, double scale,
                                       bool y_channel, int64_t crop) {
  check_pair(a, b, y_channel, crop);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto fmt = output_format(a);
  const at::Tensor ac = a.contiguous(fmt), bc = b.to(a.scalar_type()).contiguous(fmt);
  const int64_t count = (y_channel ? 1 : a.size(1)) * (a.size(2) - 2 * crop) * (a.size(3) - 2 * crop);
  const at::Tensor coef = (grad.to(at::kDouble) * (2.0 * scale * scale / static_cast<double>(count)))
                              .to(acc_type(a.scalar_type()))
                              .contiguous();
  at::Tensor out = at::empty_like(ac, fmt);
  check(cuda::squared_error_backward(dtype_of(ac), coef.const_data_ptr(), ac.const_data_ptr(), bc.const_data_ptr(),
                                     out.mutable_data_ptr(), shape_of(ac, fmt), crop, y_channel,
                                     c10::cuda::getCurrentCUDAStream().stream()),
        "squared_error_backward");
  return out;
}

at::Tensor to_uint8_cuda(const at::Tensor& x) {
  check_4d(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = at::empty({x.size(0), x.size(2), x.size(3), x.size(1)}, x.options().dtype(at::kByte));
  check(cuda::to_uint8(dtype_of(xc), xc.const_data_ptr(), out.mutable_data_ptr<uint8_t>(), shape_of(xc, fmt),
                       c10::cuda::getCurrentCUDAStream().stream()),
        "to_uint8");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsr, CUDA, m) {
  m.impl("conv2d_prelu", &conv2d_prelu_cuda);
  m.impl("conv2d_silu", &conv2d_silu_cuda);
  m.impl("sigmoid_gate_backward", &sigmoid_gate_backward_cuda);
  m.impl("shuffle_prelu", &shuffle_prelu_cuda);
  m.impl("shuffle_prelu_backward", &shuffle_prelu_backward_cuda);
  m.impl("batch_norm_prelu", &batch_norm_prelu_cuda);
  m.impl("batch_norm_prelu_backward", &batch_norm_prelu_backward_cuda);
  m.impl("mse_per_image", &mse_per_image_cuda);
  m.impl("mse_per_image_backward", &mse_per_image_backward_cuda);
  m.impl("to_uint8", &to_uint8_cuda);
}

}  // namespace fastsr
