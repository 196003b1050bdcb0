// Weight gradient of a 'same' convolution with few output channels (SRResNet's 9x9 tail, 64 -> 3):
//   dW[o, c, i, j] = sum over (n, h, w) of g[n, o, h, w] * x[n, c, h + i - p, w + j - p].
// oneDNN computes it at about 20 GFLOP/s on that shape (three output channels fill no vector lanes,
// as in the forward), most of a training step's backward. Here the input channels fill the lanes:
// the (tap, channel chunk) pairs are spread over threads, and for each tap every pixel adds
// g[pixel, o] * x[shifted pixel, chunk] to CO x NRV vector accumulators held in registers, flushed
// to fp64 after each image row (so a long sum keeps fp32's error per row only). fp32, channels_last.
// A thread runs all its taps over one band of kBandRows output rows before the next band, so the
// band's input rows come from cache, not memory, for every tap: tap by tap over the whole batch,
// 16 x 64 x 128 x 128 (a 67 MB input read 81 times) took 476 ms on one Zen 4 core, oneDNN 388.
// Each tap still visits the rows in the same order, so the sums are the same.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common.h"
#include "vec_util.h"
#include "winograd_cpu.h"

namespace fastsr {
namespace {

using V = at::vec::Vectorized<float>;
constexpr int64_t kVS = V::size();
// Vectors of input channels per chunk: accumulators CO x NRV + CO broadcasts + the input vector in use
// within the vector registers: 4 x 4 + 5 of AVX-512's 32; 3 x 4 + 4 of AVX2's 16 for SRResNet's three
// outputs (with 2 vectors its six accumulators left the FMA units waiting on each other: the FMAs'
// latency needs about ten independent sums), 4 x 2 + 5 for four.
constexpr int nrv_for(int co) { return kVS >= 16 || co <= 3 ? 4 : 2; }
constexpr int64_t kMaxOut = 4;
constexpr int64_t kBandRows = 8;

struct Shape {
  int64_t N, H, W, Cin, Cout, k;
};

// One tap (i, j), channels [c0, c0 + NRV * kVS), output rows [r0, r1) of image n: adds to dw[o][c]
// (fp64, o < CO).
template <int CO, int NRV>
void tap_chunk(const float* g, const float* x, const Shape& s, int64_t i, int64_t j, int64_t c0, int64_t n,
               int64_t r0, int64_t r1, double* dw) {
  const int64_t p = s.k / 2, h0 = std::max({int64_t(0), p - i, r0}), h1 = std::min({s.H, s.H + p - i, r1});
  const int64_t w0 = std::max<int64_t>(0, p - j), w1 = std::min(s.W, s.W + p - j);
  for (int64_t h = h0; h < h1; ++h) {
    V acc[CO][NRV];
    for (int o = 0; o < CO; ++o)
      for (int v = 0; v < NRV; ++v) acc[o][v] = V(0.f);
    const float* grow = g + ((n * s.H + h) * s.W) * s.Cout;
    const float* xrow = x + ((n * s.H + h + i - p) * s.W + (j - p)) * s.Cin + c0;
    for (int64_t w = w0; w < w1; ++w) {
      V gb[CO];
      for (int o = 0; o < CO; ++o) gb[o] = cpu::in_register(V(grow[w * s.Cout + o]));
      for (int v = 0; v < NRV; ++v) {
        const V xv = cpu::in_register(V::loadu(xrow + w * s.Cin + v * kVS));
        for (int o = 0; o < CO; ++o) acc[o][v] = at::vec::fmadd(gb[o], xv, acc[o][v]);
      }
    }
    float row[NRV * kVS];
    for (int o = 0; o < CO; ++o) {
      for (int v = 0; v < NRV; ++v) acc[o][v].store(row + v * kVS);
      for (int64_t c = 0; c < NRV * kVS; ++c) dw[o * NRV * kVS + c] += row[c];
    }
  }
}

// out: (C_out, C_in, k, k) at strides os (contiguous or channels_last).
template <int CO, int NRV>
void weight_grad(const float* g, const float* x, const Shape& s, float* out, const int64_t* os) {
  const int64_t chunk = NRV * kVS, chunks = s.Cin / chunk, taps = s.k * s.k;
  at::parallel_for(0, taps * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> dw((end - begin) * CO * chunk, 0.0);
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t r0 = 0; r0 < s.H; r0 += kBandRows)
        for (int64_t t = begin; t < end; ++t) {
          const int64_t tap = t / chunks, c0 = (t % chunks) * chunk;
          tap_chunk<CO, NRV>(g, x, s, tap / s.k, tap % s.k, c0, n, r0, std::min(s.H, r0 + kBandRows),
                             dw.data() + (t - begin) * CO * chunk);
        }
    for (int64_t t = begin; t < end; ++t) {
      const int64_t tap = t / chunks, c0 = (t % chunks) * chunk, i = tap / s.k, j = tap % s.k;
      const double* d = dw.data() + (t - begin) * CO * chunk;
      for (int o = 0; o < CO; ++o)
        for (int64_t c = 0; c < chunk; ++c)
          out[o * os[0] + (c0 + c) * os[1] + i * os[2] + j * os[3]] = static_cast<float>(d[o * chunk + c]);
    }
  });
}

// The widest chunk of input channels (nrv_for(CO), 2 or 1 vectors) that divides C_in.
template <int CO>
void weight_grad_chunked(const float* g, const float* x, const Shape& s, float* out, const int64_t* os) {
  constexpr int kNRV = nrv_for(CO);
  if (s.Cin % (kNRV * kVS) == 0) return weight_grad<CO, kNRV>(g, x, s, out, os);
  if (s.Cin % (2 * kVS) == 0) return weight_grad<CO, 2>(g, x, s, out, os);
  weight_grad<CO, 1>(g, x, s, out, os);
}

// The few-output direct kernel above; (C_out, C_in, k, k) in memory format fmt.
at::Tensor few_output_weight_grad(const at::Tensor& grad, const at::Tensor& x, int64_t kernel_size,
                                  at::MemoryFormat fmt) {
  const int64_t Cin = x.size(1), Cout = grad.size(1);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(cl), gc = grad.contiguous(cl);
  at::Tensor out = at::empty({Cout, Cin, kernel_size, kernel_size}, x.options(), fmt);
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const Shape s{x.size(0), x.size(2), x.size(3), Cin, Cout, kernel_size};
  const float* gp = gc.const_data_ptr<float>();
  const float* xp = xc.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  switch (Cout) {
    case 1: weight_grad_chunked<1>(gp, xp, s, op, os); break;
    case 2: weight_grad_chunked<2>(gp, xp, s, op, os); break;
    case 3: weight_grad_chunked<3>(gp, xp, s, op, os); break;
    default: weight_grad_chunked<4>(gp, xp, s, op, os); break;
  }
  return out;
}

// Two shapes: few outputs (1-4 channels, any odd kernel: the direct kernel above), and 3x3 with
// channels in multiples of 16 (SRResNet's body and upsample convs: Winograd F(2x2, 3x3) in
// winograd_cpu.cpp, or oneDNN's weight gradient where Winograd's "auto" mode declines a small
// image). The result is channels_last or contiguous as asked: the weight's layout, so autograd's
// gradient accumulation takes it as it is (in another layout it copies every gradient, and the fused
// Adam copies a channels_last gradient of a contiguous weight again).
at::Tensor conv2d_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t kernel_size,
                                  bool channels_last) {
  check_4d(x, "x");
  check_4d(grad, "grad");
  const int64_t Cin = x.size(1), Cout = grad.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat,
              "fastsr: conv2d_weight_grad takes fp32 tensors");
  TORCH_CHECK(kernel_size % 2 == 1 && kernel_size > 0, "fastsr: kernel_size must be odd, got ", kernel_size);
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(2) == x.size(2) && grad.size(3) == x.size(3),
              "fastsr: grad ", grad.sizes(), " does not match x ", x.sizes());
  const bool few = Cout >= 1 && Cout <= kMaxOut && Cin % kVS == 0;
  const bool winograd_shape = kernel_size == 3 && cpu::winograd_weight_grad_supported(grad, x);
  TORCH_CHECK(few || winograd_shape, "fastsr: conv2d_weight_grad serves 1 to ", kMaxOut,
              " output channels with input channels in multiples of ", kVS,
              ", or a 3x3 kernel with input and output channels in multiples of 16; got ", Cout, " and ", Cin,
              " channels, kernel ", kernel_size);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (few) return few_output_weight_grad(grad, x, kernel_size, fmt);
  if (cpu::winograd_weight_grad_applies(grad, x)) return cpu::winograd_weight_grad(grad, x, fmt);
  const at::Tensor weight = at::empty({Cout, Cin, 3, 3}, x.options(), fmt);  // its shape is all oneDNN reads
  return std::get<1>(at::convolution_backward(grad, x, weight, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0},
                                              1, {false, true, false}))
      .contiguous(fmt);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsr, CPU, m) { m.impl("conv2d_weight_grad", &conv2d_weight_grad_cpu); }

}  // namespace fastsr
