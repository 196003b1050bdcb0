// CPU kernels of the fastsr ops: at::parallel_for over rows, at::vec::Vectorized inner loops on
// the contiguous (fp32) cases, scalar loops elsewhere. Layouts: NCHW or channels_last (NHWC),
// decided by common.h's output_format(); every kernel handles both.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "conv_cpu.h"
#include "vec_util.h"
#include "winograd_cpu.h"

namespace fastsr {
namespace {

using at::vec::Vectorized;
template <typename T>
using acc_t = at::opmath_type<T>;

template <typename A>
inline A prelu(A v, A s) {
  return v > A(0) ? v : v * s;
}

// dst[i] = prelu(src[i], slope) + res[i] for a contiguous run. The slope is one value (s0) or,
// when `slopes` is set, one per element (the channels of one NHWC pixel). dst may alias src.
template <typename T>
void prelu_run(const T* src, bool activate, const acc_t<T>* slopes, acc_t<T> s0, const T* res, T* dst, int64_t len) {
  using A = acc_t<T>;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    using V = Vectorized<float>;
    const V zero(0.f), s0v(s0);
    for (; i + V::size() <= len; i += V::size()) {
      V v = V::loadu(src + i);
      if (activate) {
        const V s = slopes ? V::loadu(slopes + i) : s0v;
        v = V::blendv(v * s, v, v > zero);
      }
      if (res) v = v + V::loadu(res + i);
      v.store(dst + i);
    }
  }
  for (; i < len; ++i) {
    A v = static_cast<A>(src[i]);
    if (activate) v = prelu(v, slopes ? slopes[i] : s0);
    if (res) v += static_cast<A>(res[i]);
    dst[i] = static_cast<T>(v);
  }
}

// Visits pixel_shuffle(x, r) once, as contiguous-ish runs: fn(thread, Run) for x (N, C*r*r, H, W)
// and the output (N, C, H*r, W*r), both contiguous in the same format. Element k of a run is
// out[out + k * out_step] <- x[in + k * in_step], output channel c0 + k * c_step. Output rows are
// spread over threads; `thread` indexes per-thread scratch (at::get_thread_num(), once per chunk).
struct Run {
  int64_t out, out_step, in, in_step, len, c0, c_step;
};

template <typename F>
void for_each_shuffled(int64_t N, int64_t C, int64_t H, int64_t W, int64_t r, bool cl, const F& fn) {
  const int64_t OH = H * r, OW = W * r, CP = C * r * r, rr = r * r;
  if (cl) {  // a run is the C channels of one output pixel (reads strided by r*r)
    at::parallel_for(0, N * OH, grain_for(OW * C), [&](int64_t begin, int64_t end) {
      const int thread = at::get_thread_num();
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / OH, oh = row % OH, h = oh / r, i = oh % r;
        for (int64_t w = 0; w < W; ++w)
          for (int64_t j = 0; j < r; ++j)
            fn(thread, Run{(row * OW + w * r + j) * C, 1, ((n * H + h) * W + w) * CP + i * r + j, rr, C, 0, 1});
      }
    });
  } else {  // a run is one input row of one sub-pixel plane (writes strided by r)
    at::parallel_for(0, N * C * OH, grain_for(OW), [&](int64_t begin, int64_t end) {
      const int thread = at::get_thread_num();
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / (C * OH), c = (row / OH) % C, oh = row % OH, h = oh / r, i = oh % r;
        for (int64_t j = 0; j < r; ++j)
          fn(thread, Run{row * OW + j, r, ((n * CP + c * rr + i * r + j) * H + h) * W, 1, W, c, 0});
      }
    });
  }
}

template <typename T>
void shuffle_prelu_kernel(const T* x, const acc_t<T>* slope, const T* res, T* out, int64_t N, int64_t C, int64_t H,
                          int64_t W, int64_t r, bool cl) {
  using A = acc_t<T>;
  const bool activate = slope != nullptr;
  if (r == 1) {
    // No shuffle: a purely elementwise pass (in place when out == x), vectorised per row.
    if (cl) {
      at::parallel_for(0, N * H, grain_for(W * C), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          for (int64_t w = 0; w < W; ++w) {
            const int64_t off = (row * W + w) * C;
            prelu_run<T>(x + off, activate, slope, A(0), res ? res + off : nullptr, out + off, C);
          }
        }
      });
    } else {
      at::parallel_for(0, N * C, grain_for(H * W), [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t off = plane * H * W;
          const A s = activate ? slope[plane % C] : A(0);
          prelu_run<T>(x + off, activate, nullptr, s, res ? res + off : nullptr, out + off, H * W);
        }
      });
    }
    return;
  }
  // Pixel shuffle, NCHW (epilogue() sends channels_last to ATen's pixel_shuffle first):
  // out[n, c, h*r+i, w*r+j] = x[n, c*r*r + i*r + j, h, w], one input row of one sub-pixel plane at a
  // time: the PReLU over the contiguous row into a per-thread buffer (vectorised for fp32), then the
  // store strided by r, + residual, rounded once.
  TORCH_CHECK(!cl, "fastsr: shuffle_prelu_kernel shuffles NCHW only");
  std::vector<A> scratch(at::get_num_threads() * W);
  for_each_shuffled(N, C, H, W, r, /*cl=*/false, [&](int thread, const Run& run) {
    A* buf = scratch.data() + thread * W;
    const T* src = x + run.in;
    const T* rp = res ? res + run.out : nullptr;
    T* dst = out + run.out;
    const A s0 = activate ? slope[run.c0] : A(0);
    if constexpr (std::is_same_v<T, A>) {
      prelu_run<T>(src, activate, nullptr, s0, nullptr, buf, run.len);
    } else {
      for (int64_t k = 0; k < run.len; ++k) {
        const A v = static_cast<A>(src[k]);
        buf[k] = activate ? prelu(v, s0) : v;
      }
    }
    for (int64_t k = 0; k < run.len; ++k)
      dst[k * run.out_step] = static_cast<T>(rp ? buf[k] + static_cast<A>(rp[k * run.out_step]) : buf[k]);
  });
}

// The shared epilogue: prelu(pixel_shuffle(pre, r), slope) + residual in one pass over memory
// (two for channels_last with a shuffle).
// `pre` is consumed: with r == 1 the result is written over it.
at::Tensor epilogue(at::Tensor pre, const std::optional<at::Tensor>& slope, const std::optional<at::Tensor>& residual,
                    int64_t r, at::MemoryFormat fmt, bool may_overwrite) {
  const int64_t N = pre.size(0), CP = pre.size(1), H = pre.size(2), W = pre.size(3);
  TORCH_CHECK(r >= 1 && CP % (r * r) == 0, "fastsr: ", CP, " channels are not divisible by shuffle**2 = ", r * r);
  const int64_t C = CP / (r * r);
  pre = pre.contiguous(fmt);  // a no-op for the convolution outputs, which follow x's format
  if (r > 1 && is_channels_last(fmt)) {
    // ATen's channels_last pixel_shuffle (a vectorised transpose), then PReLU + residual in one pass
    // over its output: 4x256x24x24 fp32 0.06 + 0.04 ms. One strided pass did both in 0.14 ms with
    // AVX-512 (gathers) and 1.5 ms with AVX2, where the loop stayed scalar and branched on each sign.
    return epilogue(at::pixel_shuffle(pre, r).contiguous(fmt), slope, residual, 1, fmt, /*may_overwrite=*/true);
  }
  if (!slope && !residual && r == 1) return pre;
  at::Tensor out = (r == 1 && may_overwrite) ? pre : at::empty({N, C, H * r, W * r}, pre.options(), fmt);
  at::Tensor res;
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes(), "fastsr: residual must have shape ", out.sizes(), ", got ",
                residual->sizes());
    res = residual->to(pre.scalar_type()).contiguous(fmt);
  }
  const auto acc = acc_type(pre.scalar_type());
  at::Tensor s = slope ? per_channel_slope(*slope, C, acc) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "fastsr_shuffle_prelu", [&] {
    shuffle_prelu_kernel<scalar_t>(pre.const_data_ptr<scalar_t>(), s.defined() ? s.const_data_ptr<acc_t<scalar_t>>() : nullptr,
                                   res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
                                   out.mutable_data_ptr<scalar_t>(), N, C, H, W, r, is_channels_last(fmt));
  });
  return out;
}

// conv2d(x, weight, bias, 'same') outside Winograd's shapes: fastsr's direct kernels for convs with very
// few output channels (the 64 -> 3 tail, vectorised over the reduction) or input channels (the 3 -> 64
// head, vectorised over output channels), oneDNN for the rest. In `fmt` or channels_last.
at::Tensor direct_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::MemoryFormat fmt) {
  if (cpu::few_out_conv_applies(x, weight)) return cpu::few_out_conv(x, weight, bias, fmt);
  if (cpu::few_in_conv_applies(x, weight)) return cpu::few_in_conv(x, weight, bias);
  return conv_same(x, weight, bias);
}

at::Tensor conv2d_prelu_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& slope, const std::optional<at::Tensor>& residual,
                            int64_t shuffle) {
  check_4d(x, "x");
  const auto fmt = output_format(x);
  // fp32 3x3 convs with many channels: Winograd F(2x2, 3x3) with the whole epilogue fused into
  // its output transform (winograd_cpu.cpp).
  if (cpu::winograd_applies(x, weight, shuffle))
    return cpu::winograd_conv2d(x, weight, bias, slope, residual, shuffle, fmt);
  // The bias goes into the convolution (added in-register); activation, residual and the
  // pixel-shuffle store are the single pass over the conv output.
  return epilogue(direct_conv(x, weight, bias, fmt), slope, residual, shuffle, fmt, /*may_overwrite=*/true);
}

// y = silu(y), or (y + skip) * (sigmoid(y) - 0.5) with a skip, in place over `len` elements in
// memory order (y and skip contiguous in the same format).
template <typename T>
void sigmoid_gate_run(T* y, const T* skip, int64_t len) {
  using A = acc_t<T>;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + Vectorized<float>::size() <= len; i += Vectorized<float>::size())
      cpu::sigmoid_gate(Vectorized<float>::loadu(y + i), skip ? skip + i : nullptr).store(y + i);
  }
  for (; i < len; ++i) {
    const A s = skip ? static_cast<A>(skip[i]) : A(0);
    y[i] = static_cast<T>(cpu::sigmoid_gate(static_cast<A>(y[i]), skip ? &s : nullptr));
  }
}

at::Tensor conv2d_silu_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& skip) {
  check_4d(x, "x");
  const auto fmt = output_format(x);
  const Act act = skip ? Act::kAttention : Act::kSiLU;
  // SPAN's 48-channel 3x3 convs: the activation is fused into Winograd's output transform.
  if (cpu::winograd_applies(x, weight, 1)) return cpu::winograd_conv2d(x, weight, bias, std::nullopt, skip, 1, fmt, act);
  at::Tensor y = direct_conv(x, weight, bias, fmt).contiguous(fmt);
  const at::Tensor s = skip_like(skip, y, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fastsr_conv2d_silu", [&] {
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t* sp = s.defined() ? s.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, y.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      sigmoid_gate_run<scalar_t>(yp + begin, sp ? sp + begin : nullptr, end - begin);
    });
  });
  return y;
}

// d/dy of (y + a) * (sigmoid(y) - b) is gate + (y + a) * sig * (1 - sig) with sig = sigmoid(y),
// gate = sig - b; d/da is gate. (a, b) = (0, 0) for SiLU, (skip, 0.5) for the attention.
std::tuple<at::Tensor, at::Tensor> sigmoid_gate_backward_cpu(const at::Tensor& grad, const at::Tensor& y,
                                                             const std::optional<at::Tensor>& skip) {
  const SigmoidGateGrads t = sigmoid_gate_grads(grad, y, skip);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fastsr_sigmoid_gate_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* yp = t.y.const_data_ptr<scalar_t>();
    const scalar_t* gp = t.grad.const_data_ptr<scalar_t>();
    const scalar_t* sp = t.skip.defined() ? t.skip.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gy = t.grad_y.mutable_data_ptr<scalar_t>();
    scalar_t* gs = skip ? t.grad_skip.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, t.y.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const A v = static_cast<A>(yp[i]), gv = static_cast<A>(gp[i]);
        const A sig = A(1) / (A(1) + std::exp(-v));
        const A gate = sp ? sig - A(0.5) : sig;
        const A shifted = sp ? v + static_cast<A>(sp[i]) : v;
        gy[i] = static_cast<scalar_t>(gv * (gate + shifted * sig * (A(1) - sig)));
        if (gs) gs[i] = static_cast<scalar_t>(gv * gate);
      }
    });
  });
  return t.result(skip);
}

// One input pixel's output gradient in its own channel order: out[c * rr + i * r + j] = the
// gradient at output pixel (h * r + i, w * r + j), channel c; `sub` points at sub-pixel (0, 0) of
// an (OH = H r, OW = W r, C) channels_last gradient, rows OW * C apart. For r = 2 four vectors
// (one per sub-pixel) are interleaved twice, which puts them in pixel_shuffle's order.
void gather_unshuffled(const float* sub, int64_t row, int64_t C, int64_t r, float* out) {
  using V = Vectorized<float>;
  int64_t c = 0;
  if (r == 2) {
    const float *s0 = sub, *s1 = sub + C, *s2 = sub + row, *s3 = sub + row + C;
    for (; c + V::size() <= C; c += V::size()) {
      const auto [a0, a1] = at::vec::interleave2(V::loadu(s0 + c), V::loadu(s2 + c));
      const auto [b0, b1] = at::vec::interleave2(V::loadu(s1 + c), V::loadu(s3 + c));
      const auto [o0, o1] = at::vec::interleave2(a0, b0);
      const auto [o2, o3] = at::vec::interleave2(a1, b1);
      float* dst = out + 4 * c;
      o0.store(dst);
      o1.store(dst + V::size());
      o2.store(dst + 2 * V::size());
      o3.store(dst + 3 * V::size());
    }
  }
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t cc = c; cc < C; ++cc) out[cc * r * r + i * r + j] = sub[i * row + j * C + cc];
}

// PReLU's backward after a pixel_shuffle(r), fp32 channels_last, in one pass over x's N * H * W
// pixels of CP = C r^2 channels: grad_x = g where x > 0, else slope * g, with g the output gradient
// (N, C, H r, W r) read at each channel's shuffled position (r = 1: g's own pixel). Returns the
// slope's gradient per channel c (channel e of a pixel belongs to c = e / r^2), (C,) fp64. The
// slope's sums are fp32 over up to kPixelsPerFlush pixels (so the loop vectorises), then fp64 per thread.
at::Tensor prelu_backward_pixels(const float* x, const float* grad_out, float* grad_x, const float* slope, int64_t N,
                                 int64_t H, int64_t W, int64_t C, int64_t r) {
  using V = Vectorized<float>;
  constexpr int64_t kPixelsPerFlush = 64;
  const int64_t rr = r * r, CP = C * rr, P = N * H * W, row = W * r * C;
  std::vector<float> expanded(CP);  // the slope of each of a pixel's channels
  for (int64_t e = 0; e < CP; ++e) expanded[e] = slope[e / rr];
  const int64_t threads = at::get_num_threads();
  std::vector<double> partial(threads * CP, 0.0);
  at::parallel_for(0, P, grain_for(CP), [&](int64_t begin, int64_t end) {
    double* total = partial.data() + at::get_thread_num() * CP;
    std::vector<float> sums(CP, 0.f), unshuffled(r > 1 ? CP : 0);
    for (int64_t p0 = begin; p0 < end; p0 += kPixelsPerFlush) {
      for (int64_t p = p0; p < std::min(end, p0 + kPixelsPerFlush); ++p) {
        const float* xp = x + p * CP;
        float* gxp = grad_x + p * CP;
        const float* gp = grad_out + p * CP;
        if (r > 1) {
          const int64_t n = p / (H * W), h = p / W % H, w = p % W;
          gather_unshuffled(grad_out + (n * H * r + h * r) * row + w * r * C, row, C, r, unshuffled.data());
          gp = unshuffled.data();
        }
        int64_t e = 0;
        for (; e + V::size() <= CP; e += V::size()) {
          const V v = V::loadu(xp + e), gv = V::loadu(gp + e), positive = v > V(0.f);
          V::blendv(gv * V::loadu(expanded.data() + e), gv, positive).store(gxp + e);
          (V::loadu(sums.data() + e) + V::blendv(v * gv, V(0.f), positive)).store(sums.data() + e);
        }
        for (; e < CP; ++e) {
          const bool positive = xp[e] > 0.f;
          sums[e] += positive ? 0.f : xp[e] * gp[e];
          gxp[e] = positive ? gp[e] : expanded[e] * gp[e];
        }
      }
      for (int64_t e = 0; e < CP; ++e) total[e] += sums[e];
      std::fill(sums.begin(), sums.end(), 0.f);
    }
  });
  at::Tensor per_channel = at::zeros({C}, at::TensorOptions().dtype(at::kDouble));
  double* out = per_channel.mutable_data_ptr<double>();
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t e = 0; e < CP; ++e) out[e / rr] += partial[t * CP + e];
  return per_channel;
}

// The slope's gradient from its per-channel sums (C,) fp64: summed when the slope is shared, in the
// slope's shape and dtype.
at::Tensor slope_gradient(const at::Tensor& per_channel, const at::Tensor& slope) {
  const at::Tensor g = slope.numel() == 1 ? per_channel.sum() : per_channel;
  return g.reshape(slope.sizes()).to(slope.scalar_type());
}

at::Tensor shuffle_prelu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& slope,
                             const std::optional<at::Tensor>& residual, int64_t r) {
  check_4d(x, "x");
  const auto fmt = output_format(x);
  if (!slope && !residual && r == 1) return x.contiguous(fmt).clone(fmt);  // an op never returns its input
  return epilogue(x, slope, residual, r, fmt, /*may_overwrite=*/false);
}

std::tuple<at::Tensor, at::Tensor> shuffle_prelu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const std::optional<at::Tensor>& slope, int64_t r) {
  check_4d(x, "x");
  const auto fmt = output_format(x);
  const int64_t N = x.size(0), CP = x.size(1), H = x.size(2), W = x.size(3), C = CP / (r * r);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous(fmt);
  TORCH_CHECK(g.sizes() == at::IntArrayRef({N, C, H * r, W * r}), "fastsr: grad_out has shape ", g.sizes());
  at::Tensor grad_x = at::empty_like(xc, fmt);
  if (!slope) {  // the gradient un-shuffled
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastsr_unshuffle", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
      for_each_shuffled(N, C, H, W, r, is_channels_last(fmt), [&](int, const Run& run) {
        for (int64_t k = 0; k < run.len; ++k) gx[run.in + k * run.in_step] = gp[run.out + k * run.out_step];
      });
    });
    return {grad_x, at::empty({0}, x.options())};
  }
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor s = per_channel_slope(*slope, C, acc);
  if (x.scalar_type() == at::kFloat && is_channels_last(fmt)) {
    // fp32 channels_last (training's case): one vectorised pass over x's own layout, each pixel's
    // gradient gathered from its shuffled positions on the way. The strided per-element pass below
    // took 8x the forward's time at 16x256x64x64; un-shuffling into grad_x first, then the pass, 1.9x
    // this one's at 16x256x48x48.
    const at::Tensor per_channel = prelu_backward_pixels(xc.const_data_ptr<float>(), g.const_data_ptr<float>(),
                                                         grad_x.mutable_data_ptr<float>(), s.const_data_ptr<float>(),
                                                         N, H, W, C, r);
    return {grad_x, slope_gradient(per_channel, *slope)};
  }
  at::Tensor total = at::zeros({C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastsr_shuffle_prelu_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const A* sp = s.const_data_ptr<A>();
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    // Per-thread partial sums of the slope gradient, added up after the parallel pass.
    const int64_t threads = at::get_num_threads();
    std::vector<double> partial(threads * C, 0.0);
    // As in the forward: the layout is a compile-time constant inside the loop.
    auto body = [&](auto layout, int thread, const Run& run) {
      constexpr bool kCL = decltype(layout)::value;
      const int64_t in_step = kCL ? run.in_step : 1, out_step = kCL ? 1 : run.out_step;
      const scalar_t* __restrict__ xr = xp + run.in;
      const scalar_t* __restrict__ gr = gp + run.out;
      scalar_t* __restrict__ gxr = gx + run.in;
      const A* __restrict__ sr = sp + run.c0;
      double* __restrict__ acc = partial.data() + thread * C + run.c0;
      double plane_acc = 0.0;  // NCHW: the whole run is one channel
      for (int64_t k = 0; k < run.len; ++k) {
        const A v = static_cast<A>(xr[k * in_step]), gv = static_cast<A>(gr[k * out_step]);
        const bool pos = v > A(0);
        gxr[k * in_step] = static_cast<scalar_t>(pos ? gv : sr[kCL ? k : 0] * gv);
        const double contribution = pos ? 0.0 : static_cast<double>(v * gv);
        if (kCL) acc[k] += contribution; else plane_acc += contribution;
      }
      if (!kCL) acc[0] += plane_acc;
    };
    for_each_shuffled(N, C, H, W, r, is_channels_last(fmt), [&](int thread, const Run& run) {
      if (is_channels_last(fmt)) body(std::true_type{}, thread, run); else body(std::false_type{}, thread, run);
    });
    double* tp = total.mutable_data_ptr<double>();
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t c = 0; c < C; ++c) tp[c] += partial[t * C + c];
  });
  return {grad_x, slope_gradient(total, *slope)};
}

// ---------------------------------------------------------------------------------------------
// mse / psnr: one pass, per-row partial sums (fp32 vectors inside a block, fp64 across blocks).

template <typename T>
double sq_diff_sum(const T* a, const T* b, int64_t len) {
  double total = 0.0;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    using V = Vectorized<float>;
    constexpr int64_t kBlock = 64 * V::size();  // fp32 partial sums stay short, then go to fp64
    while (i + 4 * V::size() <= len) {
      V s0(0.f), s1(0.f), s2(0.f), s3(0.f);
      const int64_t stop = std::min(len, i + kBlock);
      for (; i + 4 * V::size() <= stop; i += 4 * V::size()) {
        const V d0 = V::loadu(a + i) - V::loadu(b + i);
        const V d1 = V::loadu(a + i + V::size()) - V::loadu(b + i + V::size());
        const V d2 = V::loadu(a + i + 2 * V::size()) - V::loadu(b + i + 2 * V::size());
        const V d3 = V::loadu(a + i + 3 * V::size()) - V::loadu(b + i + 3 * V::size());
        s0 = at::vec::fmadd(d0, d0, s0);
        s1 = at::vec::fmadd(d1, d1, s1);
        s2 = at::vec::fmadd(d2, d2, s2);
        s3 = at::vec::fmadd(d3, d3, s3);
      }
      total += static_cast<double>(at::vec::vec_reduce_all<float>(std::plus<V>(), (s0 + s1) + (s2 + s3)));
    }
  }
  for (; i < len; ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    total += d * d;
  }
  return total;
}

// Sum over one row of squared luma differences; the three colour samples of pixel p are at
// x[c * cstride + p * pstride].
template <typename T>
double y_sq_diff_sum(const T* a, const T* b, int64_t npix, int64_t pstride, int64_t cstride) {
  using A = acc_t<T>;
  const A w0 = A(kYWeights[0]), w1 = A(kYWeights[1]), w2 = A(kYWeights[2]);
  double total = 0.0;
  int64_t p = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (pstride == 1) {
      using V = Vectorized<float>;
      const V v0(w0), v1(w1), v2(w2);
      while (p + V::size() <= npix) {
        V s(0.f);
        const int64_t stop = std::min(npix, p + 64 * V::size());
        for (; p + V::size() <= stop; p += V::size()) {
          const V d0 = V::loadu(a + p) - V::loadu(b + p);
          const V d1 = V::loadu(a + cstride + p) - V::loadu(b + cstride + p);
          const V d2 = V::loadu(a + 2 * cstride + p) - V::loadu(b + 2 * cstride + p);
          const V dy = at::vec::fmadd(d2, v2, at::vec::fmadd(d1, v1, d0 * v0));
          s = at::vec::fmadd(dy, dy, s);
        }
        total += static_cast<double>(at::vec::vec_reduce_all<float>(std::plus<V>(), s));
      }
    }
  }
  for (; p < npix; ++p) {
    const int64_t o = p * pstride;
    const A dy = w0 * (static_cast<A>(a[o]) - static_cast<A>(b[o])) +
                 w1 * (static_cast<A>(a[o + cstride]) - static_cast<A>(b[o + cstride])) +
                 w2 * (static_cast<A>(a[o + 2 * cstride]) - static_cast<A>(b[o + 2 * cstride]));
    total += static_cast<double>(dy) * static_cast<double>(dy);
  }
  return total;
}

// Geometry of the region the reductions cover: the image minus `crop` pixels on each side.
struct Region {
  int64_t N, C, H, W, crop, h, w;  // h, w: cropped extent
  bool cl, y;
  int64_t offset(int64_t n, int64_t c, int64_t hh, int64_t ww) const {  // hh, ww: in the full image
    return cl ? ((n * H + hh) * W + ww) * C + c : ((n * C + c) * H + hh) * W + ww;
  }
  int64_t count() const { return (y ? 1 : C) * h * w; }
};

Region make_region(const at::Tensor& a, const at::Tensor& b, bool y_channel, int64_t crop, at::MemoryFormat fmt) {
  check_4d(a, "a");
  TORCH_CHECK(a.sizes() == b.sizes(), "fastsr: image batches differ in shape: ", a.sizes(), " vs ", b.sizes());
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3);
  TORCH_CHECK(!y_channel || C == 3, "fastsr: y_channel needs RGB images (3 channels), got ", C);
  TORCH_CHECK(crop >= 0 && 2 * crop < H && 2 * crop < W, "fastsr: crop_border=", crop, " leaves nothing of a ", H,
              "x", W, " image");
  return Region{N, C, H, W, crop, H - 2 * crop, W - 2 * crop, is_channels_last(fmt), y_channel};
}

at::Tensor mse_per_image_cpu(const at::Tensor& a, const at::Tensor& b, double scale, bool y_channel, int64_t crop) {
  const auto fmt = output_format(a);
  const Region g = make_region(a, b, y_channel, crop, fmt);
  const at::Tensor ac = a.contiguous(fmt), bc = b.to(a.scalar_type()).contiguous(fmt);
  // One "row" is a contiguous run: an NHWC image row, or one channel's row of an NCHW image
  // (with y_channel, NCHW rows cover the three planes at once).
  const int64_t rows_per_image = (g.cl || g.y) ? g.h : g.C * g.h;
  std::vector<double> partial(g.N * rows_per_image);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "fastsr_mse", [&] {
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * rows_per_image, grain_for(g.w * g.C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / rows_per_image, k = row % rows_per_image;
        const int64_t c = (g.cl || g.y) ? 0 : k / g.h, hh = g.crop + k % g.h;
        const int64_t o = g.offset(n, c, hh, g.crop);
        if (!g.y) {
          partial[row] = sq_diff_sum(ap + o, bp + o, g.cl ? g.w * g.C : g.w);
        } else if (g.cl) {
          partial[row] = y_sq_diff_sum(ap + o, bp + o, g.w, /*pstride=*/3, /*cstride=*/1);
        } else {
          partial[row] = y_sq_diff_sum(ap + o, bp + o, g.w, /*pstride=*/1, /*cstride=*/g.H * g.W);
        }
      }
    });
  });
  const auto acc = acc_type(a.scalar_type());
  at::Tensor out = at::empty({g.N}, a.options().dtype(at::kDouble));
  double* op = out.mutable_data_ptr<double>();
  const double norm = scale * scale / static_cast<double>(g.count());
  for (int64_t n = 0; n < g.N; ++n) {
    double s = 0.0;
    for (int64_t k = 0; k < rows_per_image; ++k) s += partial[n * rows_per_image + k];
    op[n] = s * norm;
  }
  return out.to(acc);
}

at::Tensor mse_per_image_backward_cpu(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, double scale,
                                      bool y_channel, int64_t crop) {
  const auto fmt = output_format(a);
  const Region g = make_region(a, b, y_channel, crop, fmt);
  const at::Tensor ac = a.contiguous(fmt), bc = b.to(a.scalar_type()).contiguous(fmt);
  TORCH_CHECK(grad.numel() == g.N, "fastsr: grad must have one value per image (", g.N, "), got ", grad.numel());
  // d mean(((a - b) * s)^2) / da = 2 s^2 (a - b) / count, times the upstream gradient per image.
  const at::Tensor coef = grad.to(at::kDouble).contiguous() * (2.0 * scale * scale / static_cast<double>(g.count()));
  const double* cp = coef.const_data_ptr<double>();
  at::Tensor out = at::zeros_like(ac, fmt);  // zero in the cropped border
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "fastsr_mse_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.h, grain_for(g.w * g.C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.h, hh = g.crop + row % g.h;
        const A k = static_cast<A>(cp[n]);
        for (int64_t ww = g.crop; ww < g.crop + g.w; ++ww) {
          if (g.y) {
            A dy = A(0);
            for (int64_t c = 0; c < 3; ++c) {
              const int64_t o = g.offset(n, c, hh, ww);
              dy += A(kYWeights[c]) * (static_cast<A>(ap[o]) - static_cast<A>(bp[o]));
            }
            for (int64_t c = 0; c < 3; ++c) op[g.offset(n, c, hh, ww)] = static_cast<scalar_t>(k * dy * A(kYWeights[c]));
          } else {
            for (int64_t c = 0; c < g.C; ++c) {
              const int64_t o = g.offset(n, c, hh, ww);
              op[o] = static_cast<scalar_t>(k * (static_cast<A>(ap[o]) - static_cast<A>(bp[o])));
            }
          }
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// to_uint8: clamp to [0, 1], scale by 255, round half to even (the default FP rounding mode that
// nearbyint uses), NaN -> 0. Computed in fp32 (fp64 for fp64 input).

template <typename T>
inline uint8_t quantize(T x) {
  using A = acc_t<T>;
  A v = static_cast<A>(x);
  v = v > A(0) ? (v < A(1) ? v : A(1)) : A(0);  // NaN fails both tests -> 0
  return static_cast<uint8_t>(std::nearbyint(v * A(255)));
}

at::Tensor to_uint8_cpu(const at::Tensor& x) {
  check_4d(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto fmt = output_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = at::empty({N, H, W, C}, x.options().dtype(at::kByte));
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastsr_to_uint8", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    if (is_channels_last(fmt)) {  // same element order: a flat elementwise pass
      at::parallel_for(0, N * H * W * C, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) op[i] = quantize(xp[i]);
      });
    } else {  // NCHW -> NHWC: read each plane row contiguously, write interleaved
      at::parallel_for(0, N * H, grain_for(W * C), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t n = row / H, h = row % H;
          uint8_t* dst = op + row * W * C;
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* src = xp + ((n * C + c) * H + h) * W;
            for (int64_t w = 0; w < W; ++w) dst[w * C + c] = quantize(src[w]);
          }
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsr, CPU, m) {
  m.impl("conv2d_prelu", &conv2d_prelu_cpu);
  m.impl("conv2d_silu", &conv2d_silu_cpu);
  m.impl("sigmoid_gate_backward", &sigmoid_gate_backward_cpu);
  m.impl("shuffle_prelu", &shuffle_prelu_cpu);
  m.impl("shuffle_prelu_backward", &shuffle_prelu_backward_cpu);
  m.impl("mse_per_image", &mse_per_image_cpu);
  m.impl("mse_per_image_backward", &mse_per_image_backward_cpu);
  m.impl("to_uint8", &to_uint8_cpu);
}

}  // namespace fastsr
