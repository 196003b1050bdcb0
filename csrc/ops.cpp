// Operator schemas of the fastsr extension. Device kernels are registered per dispatch key in
// cpu/*.cpp and (CUDA builds only) cuda/ops_cuda.cpp, the autograd formulas in autograd.cpp; fake
// (meta) kernels are registered from Python in csrc/backend.py (fastsr.csrc.backend).
#include <torch/library.h>

TORCH_LIBRARY(fastsr, m) {
  // prelu(pixel_shuffle(conv2d(x, weight, bias, 'same'), shuffle), slope) + residual.
  m.def("conv2d_prelu(Tensor x, Tensor weight, Tensor? bias, Tensor? slope, Tensor? residual, int shuffle) -> Tensor");
  // y = conv2d(x, weight, bias, 'same'); silu(y), or with a skip SPAN's parameter-free attention
  // (y + skip) * (sigmoid(y) - 0.5).
  m.def("conv2d_silu(Tensor x, Tensor weight, Tensor? bias, Tensor? skip) -> Tensor");
  // Backward of conv2d_silu's activation at the conv output y: (grad_y, grad_skip); grad_skip is a
  // 0-element tensor without a skip.
  m.def("sigmoid_gate_backward(Tensor grad, Tensor y, Tensor? skip) -> (Tensor, Tensor)");
  // prelu(pixel_shuffle(x, r), slope) + residual: the epilogue alone (pixel_shuffle_prelu when
  // residual is None; the backward of conv2d_prelu recomputes the conv and reuses it).
  m.def("shuffle_prelu(Tensor x, Tensor? slope, Tensor? residual, int r) -> Tensor");
  // Backward of shuffle_prelu w.r.t. x and slope: (grad_x, grad_slope); grad_slope has slope's
  // shape (a 0-element tensor when slope is None).
  m.def("shuffle_prelu_backward(Tensor grad_out, Tensor x, Tensor? slope, int r) -> (Tensor, Tensor)");
  // Per-image mean of ((a - b) * scale)**2 over the image minus a crop border, on the BT.601 luma
  // when y_channel; (N,) in fp32 (fp64 for fp64 inputs).
  m.def("mse_per_image(Tensor a, Tensor b, float scale, bool y_channel, int crop) -> Tensor");
  // d(mse_per_image)/da given the (N,) upstream gradient; d/db is its negation.
  m.def("mse_per_image_backward(Tensor grad, Tensor a, Tensor b, float scale, bool y_channel, int crop) -> Tensor");
  // Training-mode BatchNorm (batch statistics over N, H, W) -> PReLU (none without a slope) -> +
  // residual: (y, mean, var), mean and the biased var (C,) in the accumulation dtype (for the running
  // statistics; not differentiable). weight and bias (C,) in the accumulation dtype.
  m.def("batch_norm_prelu(Tensor x, Tensor weight, Tensor bias, Tensor? slope, Tensor? residual, float eps) -> (Tensor, Tensor, Tensor)");
  // Backward of batch_norm_prelu's y w.r.t. x, weight, bias and slope given its saved mean and var:
  // (grad_x, grad_weight, grad_bias, grad_slope); grad_slope has slope's shape (0 elements without).
  m.def("batch_norm_prelu_backward(Tensor grad, Tensor x, Tensor mean, Tensor var, Tensor weight, Tensor bias, Tensor? slope, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Weight gradient of the 'same' convolution conv2d(x, weight) for the output gradient grad:
  // (C_out, C_in, k, k) fp32, channels_last or contiguous as asked (the weight's own layout, which
  // autograd's gradient accumulation keeps without a copy), for few output channels (a 9x9 tail
  // conv's 3) or a 3x3 kernel with input and output channels in multiples of 16 (CPU only).
  m.def("conv2d_weight_grad(Tensor grad, Tensor x, int kernel_size, bool channels_last) -> Tensor");
  // Adam's update in place for lists of parameters, their gradients, both moments and step counts
  // (each count gains 1 first): torch.optim.Adam's arithmetic with L2 weight decay (CPU, fp32; the
  // training step's optimizer, csrc/cpu/adam_cpu.cpp).
  m.def("adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
  // Float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C): clamp, * 255, round half to even.
  m.def("to_uint8(Tensor x) -> Tensor");
}
