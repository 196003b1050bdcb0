// CPU kernels of batch_norm_prelu: training-mode BatchNorm (batch statistics) -> PReLU -> + residual,
// and its backward, in two passes each way instead of the five to seven of BatchNorm2d + PReLU + add.
//   forward:  per-channel sums of x and x^2 (fp64 across elements) -> mean, var; then one pass
//             y = prelu(xhat * weight + bias) + residual, xhat = (x - mean) * invstd (torch's order of
//             operations, so the activation's kink falls where torch's does).
//   backward: one pass for the per-channel sums of g' and g' * xhat (g' = the gradient through the
//             PReLU) and the slope's gradient; then one pass for
//             grad_x = weight * invstd * (g' - mean(g') - xhat * mean(g' * xhat)).
// NCHW or channels_last (common.h's output_format), fp32 / fp64 / fp16 / bf16 (fp32 arithmetic).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common.h"

namespace fastsr {
namespace {

template <typename T>
using acc_t = at::opmath_type<T>;

// P pixels of C channels, dense in one memory format: channels_last stores element (p, c) at
// p * C + c; NCHW stores it at (n * C + c) * HW + hw.
struct Layout {
  int64_t N, C, HW;
  bool cl;
  int64_t count() const { return N * HW; }  // elements per channel
};

// fn(kCL, thread, c0, offset, len) over runs of consecutive elements, spread over threads:
// channels_last, one pixel (element k of the run is channel k); NCHW, one plane (channel c0).
template <typename F>
void for_each_run(const Layout& L, const F& fn) {
  if (L.cl) {
    at::parallel_for(0, L.count(), grain_for(L.C), [&](int64_t begin, int64_t end) {
      const int thread = at::get_thread_num();
      for (int64_t p = begin; p < end; ++p) fn(std::true_type{}, thread, 0, p * L.C, L.C);
    });
  } else {
    at::parallel_for(0, L.N * L.C, grain_for(L.HW), [&](int64_t begin, int64_t end) {
      const int thread = at::get_thread_num();
      for (int64_t i = begin; i < end; ++i) fn(std::false_type{}, thread, i % L.C, i * L.HW, L.HW);
    });
  }
}

// K per-channel sums in fp64, one block of C per thread, added up at the end: out[k * C + c].
template <int K>
struct ChannelSums {
  explicit ChannelSums(int64_t C) : C(C), partial(static_cast<size_t>(at::get_num_threads()) * K * C, 0.0) {}
  double* of(int thread, int k) { return partial.data() + (static_cast<int64_t>(thread) * K + k) * C; }
  std::vector<double> total() const {
    std::vector<double> out(K * C, 0.0);
    for (size_t i = 0; i < partial.size(); ++i) out[i % (K * C)] += partial[i];
    return out;
  }
  int64_t C;
  std::vector<double> partial;
};

// A per-channel tensor's values as doubles, and doubles as a tensor of the given dtype, without
// intermediate conversion tensors: at 64 channels each .to() cost more than the arithmetic (eight a
// call, a few percent of a CPU training step).
std::vector<double> to_doubles(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::vector<double> out(static_cast<size_t>(c.numel()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fastsr_to_doubles", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[i]);
  });
  return out;
}

at::Tensor from_doubles(const double* v, int64_t n, const at::TensorOptions& options) {
  at::Tensor out = at::empty({n}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastsr_from_doubles", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return out;
}

// Per-channel coefficients in the arithmetic dtype A.
template <typename A>
struct Coefs {
  // Without an activation the slope is 1 (prelu(v, 1) = v): the loops stay free of branches and
  // of loads that depend on a flag, which is what lets the compiler vectorise them.
  std::vector<A> mean, invstd, weight, bias, slope;
};

template <typename A>
Coefs<A> coefficients(const std::vector<double>& mean, const std::vector<double>& var, const at::Tensor& weight,
                      const at::Tensor& bias, const std::optional<at::Tensor>& slope, double eps) {
  const int64_t C = static_cast<int64_t>(mean.size());
  const std::vector<double> w = to_doubles(weight), b = to_doubles(bias);
  std::vector<double> s(C, 1.0);
  if (slope) {
    check_slope(*slope, C);
    const std::vector<double> given = to_doubles(*slope);
    for (int64_t c = 0; c < C; ++c) s[c] = given[given.size() == 1 ? 0 : c];
  }
  Coefs<A> k;
  for (int64_t c = 0; c < C; ++c) {
    k.mean.push_back(static_cast<A>(mean[c]));
    k.invstd.push_back(static_cast<A>(1.0 / std::sqrt(var[c] + eps)));
    k.weight.push_back(static_cast<A>(w[c]));
    k.bias.push_back(static_cast<A>(b[c]));
    k.slope.push_back(static_cast<A>(s[c]));
  }
  return k;
}

// One element's way through the layer: xhat = (x - mean) * invstd, v = xhat * weight + bias, and
// g' = the gradient g through prelu(v) (the slope is loaded whatever the sign: a select, not a branch).
template <typename A>
struct Through {
  A xhat, v, gp;
};

template <typename A>
inline Through<A> through(A x, A g, A mean, A invstd, A weight, A bias, A slope) {
  const A xhat = (x - mean) * invstd, v = xhat * weight + bias;
  return {xhat, v, v > A(0) ? g : g * slope};
}

template <typename T>
void statistics(const T* x, const Layout& L, std::vector<double>& mean, std::vector<double>& var) {
  ChannelSums<2> sums(L.C);
  for_each_run(L, [&](auto cl, int thread, int64_t c0, int64_t off, int64_t len) {
    double* __restrict__ s = sums.of(thread, 0) + c0;
    double* __restrict__ q = sums.of(thread, 1) + c0;
    const T* __restrict__ xr = x + off;
    if constexpr (decltype(cl)::value) {
      for (int64_t k = 0; k < len; ++k) {
        const double v = static_cast<double>(xr[k]);
        s[k] += v;
        q[k] += v * v;
      }
    } else {
      double a = 0.0, b = 0.0;
      for (int64_t k = 0; k < len; ++k) {
        const double v = static_cast<double>(xr[k]);
        a += v;
        b += v * v;
      }
      s[0] += a;
      q[0] += b;
    }
  });
  const std::vector<double> total = sums.total();
  const double n = static_cast<double>(L.count());
  mean.resize(L.C);
  var.resize(L.C);
  for (int64_t c = 0; c < L.C; ++c) {
    mean[c] = total[c] / n;
    var[c] = std::max(0.0, total[L.C + c] / n - mean[c] * mean[c]);
  }
}

// fp32 channels_last pixels in explicit vectors: GCC's vectorisation of the generic loops depends on
// the ISA (with -mavx2 it left them scalar, 15x slower than this); the generic loops serve fp64 and NCHW.
// Every channel runs through the same vector arithmetic, a pixel's last n < Vf::size() channels with
// masked loads and stores, and the multiply-adds are explicit (fmadd). A scalar loop served those
// channels; GCC vectorised it behind a run-time alias check against the per-channel coefficients, so
// a channel's rounding (FMA contraction or not) depended on where the heap had put them: identical
// calls differed in the last bit, and an 8-channel model did not resume training bit-identically on
// AVX-512. Left to contraction, the masked and the full vectors rounded differently too.
using Vf = at::vec::Vectorized<float>;

// Channels [c, c + n) of a pixel, n <= Vf::size(): the count of the vector starting at channel c.
inline int64_t lanes(int64_t c, int64_t C) { return std::min<int64_t>(Vf::size(), C - c); }

inline Vf normalised(const float* x, const Coefs<float>& k, int64_t c, int64_t n) {
  return (Vf::loadu(x + c, n) - Vf::loadu(k.mean.data() + c, n)) * Vf::loadu(k.invstd.data() + c, n);
}

// through() for the channels [c, c + n) of one pixel.
inline Through<Vf> through(const float* x, const float* g, const Coefs<float>& k, int64_t c, int64_t n) {
  const Vf gv = Vf::loadu(g + c, n), xhat = normalised(x, k, c, n);
  const Vf v = at::vec::fmadd(xhat, Vf::loadu(k.weight.data() + c, n), Vf::loadu(k.bias.data() + c, n));
  return {xhat, v, Vf::blendv(gv * Vf::loadu(k.slope.data() + c, n), gv, v > Vf(0.f))};
}

void normalise_pixel(const float* x, const float* res, float* y, const Coefs<float>& k, int64_t C) {
  for (int64_t c = 0; c < C; c += Vf::size()) {
    const int64_t n = lanes(c, C);
    const Vf weight = Vf::loadu(k.weight.data() + c, n), bias = Vf::loadu(k.bias.data() + c, n);
    Vf v = at::vec::fmadd(normalised(x, k, c, n), weight, bias);
    v = Vf::blendv(v * Vf::loadu(k.slope.data() + c, n), v, v > Vf(0.f));
    if (res) v = v + Vf::loadu(res + c, n);
    v.store(y + c, n);
  }
}

template <typename T>
void normalise(const T* x, const T* res, T* y, const Layout& L, const Coefs<acc_t<T>>& k) {
  using A = acc_t<T>;
  for_each_run(L, [&](auto cl, int, int64_t c0, int64_t off, int64_t len) {
    constexpr bool kCL = decltype(cl)::value;
    const A* __restrict__ mean = k.mean.data() + c0;
    const A* __restrict__ invstd = k.invstd.data() + c0;
    const A* __restrict__ weight = k.weight.data() + c0;
    const A* __restrict__ bias = k.bias.data() + c0;
    const A* __restrict__ slope = k.slope.data() + c0;
    const T* __restrict__ xr = x + off;
    T* __restrict__ yr = y + off;
    if constexpr (kCL && std::is_same_v<T, float>) return normalise_pixel(xr, res ? res + off : nullptr, yr, k, len);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t c = kCL ? j : 0;
      A v = (static_cast<A>(xr[j]) - mean[c]) * invstd[c] * weight[c] + bias[c];
      const A slope_c = slope[c];
      v = v > A(0) ? v : v * slope_c;
      if (res) v += static_cast<A>(res[off + j]);
      yr[j] = static_cast<T>(v);
    }
  });
}

// Pass 1 of the backward: sums of g', g' * xhat and g * v where v <= 0 (the slope's gradient).
// Accumulated in the arithmetic dtype over up to kFlushEvery pixels (so the loop vectorises),
// then added into fp64 per thread.
constexpr int64_t kFlushEvery = 64;

// One fp32 channels_last pixel of pass 1 in explicit vectors: GCC leaves the generic loop scalar,
// with a mispredicted branch per element at the activation's kink (10x slower than this).
void gradient_sums_pixel(const float* g, const float* x, const Coefs<float>& k, float* sg, float* sgx, float* ss,
                         int64_t C) {
  for (int64_t c = 0; c < C; c += Vf::size()) {
    const int64_t n = lanes(c, C);
    const auto [xhat, v, gp] = through(x, g, k, c, n);
    (Vf::loadu(sg + c, n) + gp).store(sg + c, n);
    at::vec::fmadd(gp, xhat, Vf::loadu(sgx + c, n)).store(sgx + c, n);
    (Vf::loadu(ss + c, n) + Vf::blendv(Vf::loadu(g + c, n) * v, Vf(0.f), v > Vf(0.f))).store(ss + c, n);
  }
}

template <typename T>
std::vector<double> gradient_sums(const T* g, const T* x, const Layout& L, const Coefs<acc_t<T>>& k) {
  using A = acc_t<T>;
  ChannelSums<3> sums(L.C);
  const int64_t C = L.C;
  std::vector<A> buf(sums.partial.size(), A(0));  // per thread, like sums.partial
  std::vector<int64_t> pending(at::get_num_threads(), 0);
  const auto flush = [&](int thread) {
    A* b = buf.data() + thread * 3 * C;
    double* d = sums.of(thread, 0);
    for (int64_t i = 0; i < 3 * C; ++i) d[i] += b[i], b[i] = A(0);
    pending[thread] = 0;
  };
  for_each_run(L, [&](auto cl, int thread, int64_t c0, int64_t off, int64_t len) {
    constexpr bool kCL = decltype(cl)::value;
    A* __restrict__ sg = buf.data() + thread * 3 * C + c0;
    A* __restrict__ sgx = sg + C;
    A* __restrict__ ss = sg + 2 * C;
    const A *__restrict__ mean = k.mean.data() + c0, *__restrict__ invstd = k.invstd.data() + c0;
    const A *__restrict__ weight = k.weight.data() + c0, *__restrict__ bias = k.bias.data() + c0;
    const A* __restrict__ slope = k.slope.data() + c0;
    const T* __restrict__ gr = g + off;
    const T* __restrict__ xr = x + off;
    if constexpr (kCL && std::is_same_v<T, float>) {
      gradient_sums_pixel(gr, xr, k, sg, sgx, ss, len);
      len = 0;
    }
    for (int64_t j = 0; j < len; ++j) {
      const int64_t c = kCL ? j : 0;
      const A gv = static_cast<A>(gr[j]);
      const auto [xhat, v, gp] = through(static_cast<A>(xr[j]), gv, mean[c], invstd[c], weight[c], bias[c], slope[c]);
      sg[c] += gp;
      sgx[c] += gp * xhat;
      ss[c] += v > A(0) ? A(0) : gv * v;
      if (!kCL && (j + 1) % kFlushEvery == 0) flush(thread);
    }
    if (kCL ? ++pending[thread] == kFlushEvery : true) flush(thread);
  });
  for (int t = 0; t < at::get_num_threads(); ++t) flush(t);
  return sums.total();
}

void input_gradient_pixel(const float* g, const float* x, float* out, const Coefs<float>& k, const float* gain,
                          const float* mg, const float* mgx, int64_t C) {
  for (int64_t c = 0; c < C; c += Vf::size()) {
    const int64_t n = lanes(c, C);
    const auto [xhat, v, gp] = through(x, g, k, c, n);
    const Vf centred = at::vec::fnmadd(xhat, Vf::loadu(mgx + c, n), gp - Vf::loadu(mg + c, n));
    (Vf::loadu(gain + c, n) * centred).store(out + c, n);
  }
}

// Pass 2: grad_x = weight * invstd * (g' - mean(g') - xhat * mean(g' * xhat)).
template <typename T>
void input_gradient(const T* g, const T* x, T* gx, const Layout& L, const Coefs<acc_t<T>>& k,
                    const std::vector<double>& sums, const at::Tensor& weight) {
  using A = acc_t<T>;
  const double n = static_cast<double>(L.count());
  std::vector<A> gain(L.C), mg(L.C), mgx(L.C);
  for (int64_t c = 0; c < L.C; ++c) {
    gain[c] = static_cast<A>(static_cast<double>(k.weight[c]) * static_cast<double>(k.invstd[c]));
    mg[c] = static_cast<A>(sums[c] / n);
    mgx[c] = static_cast<A>(sums[L.C + c] / n);
  }
  for_each_run(L, [&](auto cl, int, int64_t c0, int64_t off, int64_t len) {
    constexpr bool kCL = decltype(cl)::value;
    const A *__restrict__ mean = k.mean.data() + c0, *__restrict__ invstd = k.invstd.data() + c0;
    const A *__restrict__ weight = k.weight.data() + c0, *__restrict__ bias = k.bias.data() + c0;
    const A *__restrict__ slope = k.slope.data() + c0, *__restrict__ gn = gain.data() + c0;
    const A *__restrict__ mgc = mg.data() + c0, *__restrict__ mgxc = mgx.data() + c0;
    const T* __restrict__ gr = g + off;
    const T* __restrict__ xr = x + off;
    T* __restrict__ out = gx + off;
    if constexpr (kCL && std::is_same_v<T, float>) return input_gradient_pixel(gr, xr, out, k, gn, mgc, mgxc, len);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t c = kCL ? j : 0;
      const auto [xhat, v, gp] = through(static_cast<A>(xr[j]), static_cast<A>(gr[j]), mean[c], invstd[c], weight[c],
                                         bias[c], slope[c]);
      out[j] = static_cast<T>(gn[c] * (gp - mgc[c] - xhat * mgxc[c]));
    }
  });
}

// fp16 and bf16 run through the fp32 kernels: their arithmetic is fp32 anyway, and GCC leaves the
// loops that convert each element scalar (measured 10x slower than converting the tensor first).
bool is_reduced(const at::Tensor& x) { return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16; }

Layout layout_of(const at::Tensor& x, at::MemoryFormat fmt) {
  return Layout{x.size(0), x.size(1), x.size(2) * x.size(3), is_channels_last(fmt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_prelu_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& slope,
    const std::optional<at::Tensor>& residual, double eps) {
  check_batch_norm_inputs(x, weight, bias);
  if (is_reduced(x)) {  // fp16 / bf16: the vectorised fp32 kernels (the same arithmetic), then one rounding
    auto [y, mean, var] = batch_norm_prelu_cpu(x.to(at::kFloat), weight, bias, slope, residual, eps);
    return {y.to(x.scalar_type()), mean, var};
  }
  const auto fmt = output_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor res;
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "fastsr: residual must have shape ", x.sizes());
    res = residual->to(x.scalar_type()).contiguous(fmt);
  }
  at::Tensor y = at::empty_like(xc, fmt);
  const Layout L = layout_of(x, fmt);
  std::vector<double> mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastsr_batch_norm_prelu", [&] {
    statistics(xc.const_data_ptr<scalar_t>(), L, mean, var);
    const auto k = coefficients<acc_t<scalar_t>>(mean, var, weight, bias, slope, eps);
    normalise(xc.const_data_ptr<scalar_t>(), res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
              y.mutable_data_ptr<scalar_t>(), L, k);
  });
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  return {y, from_doubles(mean.data(), L.C, acc), from_doubles(var.data(), L.C, acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_prelu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& slope, double eps) {
  check_batch_norm_inputs(x, weight, bias);
  if (is_reduced(x)) {
    auto [gx, gw, gb, gs] = batch_norm_prelu_backward_cpu(grad.to(at::kFloat), x.to(at::kFloat), mean, var, weight,
                                                          bias, slope, eps);
    return {gx.to(x.scalar_type()), gw, gb, gs};
  }
  const auto fmt = output_format(x);
  const at::Tensor xc = x.contiguous(fmt), g = grad.to(x.scalar_type()).contiguous(fmt);
  TORCH_CHECK(g.sizes() == x.sizes(), "fastsr: grad has shape ", g.sizes(), ", x ", x.sizes());
  const std::vector<double> mv = to_doubles(mean), vv = to_doubles(var);
  TORCH_CHECK(static_cast<int64_t>(mv.size()) == x.size(1) && static_cast<int64_t>(vv.size()) == x.size(1),
              "fastsr: mean and var must have ", x.size(1), " elements");
  const Layout L = layout_of(x, fmt);
  at::Tensor grad_x = at::empty_like(xc, fmt);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastsr_batch_norm_prelu_backward", [&] {
    const auto k = coefficients<acc_t<scalar_t>>(mv, vv, weight, bias, slope, eps);
    sums = gradient_sums(g.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), L, k);
    input_gradient(g.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                   L, k, sums, weight);
  });
  const int64_t C = L.C;
  // sums holds, per channel, sum(g'), sum(g' * xhat) and the slope's gradient, in blocks of C.
  at::Tensor grad_slope = at::empty({0}, x.options());
  if (slope) {
    const double* per_channel = sums.data() + 2 * C;
    double total = 0.0;
    for (int64_t c = 0; c < C; ++c) total += per_channel[c];
    const bool shared = slope->numel() == 1;
    grad_slope = from_doubles(shared ? &total : per_channel, shared ? 1 : C, slope->options()).reshape(slope->sizes());
  }
  return {grad_x, from_doubles(sums.data() + C, C, weight.options()), from_doubles(sums.data(), C, bias.options()),
          grad_slope};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsr, CPU, m) {
  m.impl("batch_norm_prelu", &batch_norm_prelu_cpu);
  m.impl("batch_norm_prelu_backward", &batch_norm_prelu_backward_cpu);
}

}  // namespace fastsr
