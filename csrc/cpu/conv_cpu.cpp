// Direct convolution vectorised over the reduction, for 1..4 output channels.
//
// With the input in NHWC, the receptive field of output pixel (oh, ow) in input row ih is ONE
// contiguous run of K * C_in floats (kw, ci), and the weights reordered to (co, kh, kw, ci) match
// it, so each (pixel, kh, co) term is a plain dot product. A block of P neighbouring pixels is
// done together: every weight vector loaded is used P times, every input vector CO times, and the
// P * CO accumulators stay in registers. Borders just clip the run (kw range), so no padded copy
// of the input is ever made.
#include "conv_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "../common.h"
#include "vec_util.h"

namespace fastsr::cpu {
namespace {

using V = at::vec::Vectorized<float>;
constexpr int64_t kMaxOut = 4;
// Pixels per block: P * CO accumulators + CO weights + 1 input must fit the vector registers
// (16 with AVX2, 32 with AVX-512).
constexpr int kPixels = V::size() >= 16 ? 8 : 4;

struct Geometry {
  int64_t H, W, C, K, pad, CO;
  int64_t run() const { return K * C; }  // floats per (pixel, kh) dot product
};

// One block of P interior pixels (every kw tap inside the image) of output row oh, over the
// kernel rows [kh_lo, kh_hi): adds the P * CO partial sums into sums.
template <int CO, int P>
void conv_block(const float* in, const float* wt, const Geometry& g, int64_t oh, int64_t ow0, int64_t kh_lo,
                int64_t kh_hi, float* sums) {
  V acc[P][CO];
  for (int p = 0; p < P; ++p)
    for (int co = 0; co < CO; ++co) acc[p][co] = V(0.f);
  const int64_t run = g.run(), vec_end = run - run % V::size();
  for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
    const int64_t ih = oh + kh - g.pad;
    if (ih < 0 || ih >= g.H) continue;
    const float* x = in + (ih * g.W + ow0 - g.pad) * g.C;  // run start of pixel ow0
    const float* w = wt + kh * run;
    for (int64_t e = 0; e < vec_end; e += V::size()) {
      V wv[CO];
      for (int co = 0; co < CO; ++co) wv[co] = V::loadu(w + co * g.K * run + e);
      for (int p = 0; p < P; ++p) {
        const V xv = in_register(V::loadu(x + p * g.C + e));
        for (int co = 0; co < CO; ++co) acc[p][co] = at::vec::fmadd(xv, wv[co], acc[p][co]);
      }
    }
    // A run that is not a multiple of the vector width leaves a scalar tail.
    for (int p = 0; p < P; ++p)
      for (int co = 0; co < CO; ++co)
        for (int64_t e = vec_end; e < run; ++e) sums[p * CO + co] += x[p * g.C + e] * w[co * g.K * run + e];
  }
  for (int p = 0; p < P; ++p)
    for (int co = 0; co < CO; ++co) sums[p * CO + co] += at::vec::vec_reduce_all<float>(std::plus<V>(), acc[p][co]);
}

// One pixel anywhere (borders included): the run is clipped to the kw taps inside the image.
void conv_pixel(const float* in, const float* wt, const Geometry& g, int64_t oh, int64_t ow, float* sums) {
  const int64_t run = g.run();
  const int64_t kw_lo = std::max<int64_t>(0, g.pad - ow), kw_hi = std::min<int64_t>(g.K, g.W + g.pad - ow);
  const int64_t lo = kw_lo * g.C, hi = kw_hi * g.C;
  for (int64_t co = 0; co < g.CO; ++co) {
    V acc(0.f);
    float tail = 0.f;
    for (int64_t kh = 0; kh < g.K; ++kh) {
      const int64_t ih = oh + kh - g.pad;
      if (ih < 0 || ih >= g.H) continue;
      const float* x = in + (ih * g.W + ow - g.pad + kw_lo) * g.C;  // first tap inside the image
      const float* w = wt + (co * g.K + kh) * run + lo;
      const int64_t len = hi - lo;
      int64_t e = 0;
      for (; e + V::size() <= len; e += V::size()) acc = at::vec::fmadd(V::loadu(x + e), V::loadu(w + e), acc);
      for (; e < len; ++e) tail += x[e] * w[e];
    }
    sums[co] = at::vec::vec_reduce_all<float>(std::plus<V>(), acc) + tail;
  }
}

template <int CO>
void conv_rows(const float* in, const float* wt, const float* bias, const Geometry& g, int64_t N, float* out,
               int64_t out_pix_stride, int64_t out_c_stride, int64_t out_img_stride) {
  // Kernel rows are taken in groups whose weights (CO * rows * K * C floats) fit in ~16 KiB, so
  // they stay in L1 while a whole output row of blocks streams past (the full 9x9x64x3 kernel
  // is 62 KiB, more than L1); each group adds its partial sums into the row buffer.
  const int64_t group = std::max<int64_t>(1, 16384 / (CO * g.run() * static_cast<int64_t>(sizeof(float))));
  at::parallel_for(0, N * g.H, grain_for(g.W * g.run() * CO), [&](int64_t begin, int64_t end) {
    std::vector<float> row(g.W * CO);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.H, oh = r % g.H;
      const float* img = in + n * g.H * g.W * g.C;
      std::fill(row.begin(), row.end(), 0.f);
      // Border pixels (clipped runs) one at a time; interior pixels in blocks of kPixels, the
      // last partial block with the per-pixel path too.
      const int64_t lo = std::min(g.pad, g.W);
      const int64_t interior_end = lo + std::max<int64_t>(0, g.W - g.pad - lo) / kPixels * kPixels;
      for (int64_t ow = 0; ow < lo; ++ow) conv_pixel(img, wt, g, oh, ow, row.data() + ow * CO);
      for (int64_t ow = interior_end; ow < g.W; ++ow) conv_pixel(img, wt, g, oh, ow, row.data() + ow * CO);
      for (int64_t kh = 0; kh < g.K; kh += group) {
        for (int64_t ow = lo; ow < interior_end; ow += kPixels)
          conv_block<CO, kPixels>(img, wt, g, oh, ow, kh, std::min(g.K, kh + group), row.data() + ow * CO);
      }
      float* dst = out + n * out_img_stride + oh * g.W * out_pix_stride;
      for (int64_t ow = 0; ow < g.W; ++ow)
        for (int co = 0; co < CO; ++co)
          dst[ow * out_pix_stride + co * out_c_stride] = row[ow * CO + co] + (bias ? bias[co] : 0.f);
    }
  });
}

}  // namespace

bool few_out_conv_applies(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.dim() == 4 && weight.dim() == 4 &&
         weight.size(0) >= 1 && weight.size(0) <= kMaxOut && weight.size(1) == x.size(1) &&
         weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1 && weight.size(2) * x.size(1) >= V::size() &&
         x.size(1) >= 8;
}

at::Tensor few_out_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::MemoryFormat fmt) {
  TORCH_CHECK(few_out_conv_applies(x, weight), "fastsr: few_out_conv does not apply to x ", x.sizes(), " ",
              x.scalar_type(), ", weight ", weight.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), CO = weight.size(0), K = weight.size(2);
  const Geometry g{H, W, C, K, K / 2, CO};
  const at::Tensor in = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor wt = weight.permute({0, 2, 3, 1}).contiguous();  // (co, kh, kw, ci)
  at::Tensor b;
  if (bias) b = bias->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({N, CO, H, W}, x.options(), fmt);
  const bool cl = is_channels_last(fmt);
  const int64_t pix = cl ? CO : 1, cs = cl ? 1 : H * W, img = CO * H * W;
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  const float* ip = in.const_data_ptr<float>();
  const float* wp = wt.const_data_ptr<float>();
  switch (CO) {
    case 1: conv_rows<1>(ip, wp, bp, g, N, op, pix, cs, img); break;
    case 2: conv_rows<2>(ip, wp, bp, g, N, op, pix, cs, img); break;
    case 3: conv_rows<3>(ip, wp, bp, g, N, op, pix, cs, img); break;
    default: conv_rows<4>(ip, wp, bp, g, N, op, pix, cs, img); break;
  }
  return out;
}

}  // namespace fastsr::cpu
