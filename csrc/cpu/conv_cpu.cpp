// Direct convolutions for layers with very few output or input channels, where oneDNN's kernels
// leave most vector lanes empty: SRResNet's 9x9 tail (64 -> 3), its head (3 -> 64) and the tail's
// input gradient (a 3 -> 64 convolution with the flipped, transposed weight).
//
// Few outputs (1..4): vectorised over the reduction.
// With the input in NHWC, the receptive field of output pixel (oh, ow) in input row ih is ONE
// contiguous run of K * C_in floats (kw, ci), and the weights reordered to (co, kh, kw, ci) match
// it, so each (pixel, kh, co) term is a plain dot product. A block of P neighbouring pixels is
// done together: every weight vector loaded is used P times, every input vector CO times, and the
// P * CO accumulators stay in registers. The input rows are read from per-thread copies padded with
// `pad` zero pixels each side, so the pixels at the left and right borders are done in blocks too
// (clipping each border pixel's run instead left them to a one-accumulator loop: at 48x48 they were
// 8 of the 48 pixels a row and about 40% of the time). Each thread copies an input row once for
// the K output rows that read it; rows above and below the image are skipped.
//
// Few inputs (1..4, a kernel of 5x5 or more, output channels in chunks of 4 vectors): vectorised over
// the output channels. Each (kw, ci) term of a pixel's run is one input value, broadcast and
// multiplied into 4 vectors of output channels (weights reordered to (kh, kw, ci, co)); a block of P
// pixels keeps P x 4 sums in registers over all K * K * C_in terms, and each weight vector loaded
// serves P pixels. On a 2-core Zen 5 it runs the 9x9 3 -> 64 convolution 1.1x oneDNN's speed natively
// and 1.2-1.4x under AVX2; with 3x3 kernels, or chunks of 1 or 2 vectors, oneDNN was as fast or up to
// 2.4x faster, so those stay with oneDNN.
#include "conv_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
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

// The K input rows an output row reads, zero-padded to W + 2 pad pixels, one slot per row index
// mod K: consecutive output rows share K - 1 of them, so a thread copies each row once.
class PaddedRows {
 public:
  explicit PaddedRows(const Geometry& g)
      : g_(g), width_((g.W + 2 * g.pad) * g.C), data_(g.K * width_, 0.f), tag_(g.K, -1), rows_(g.K) {}

  // The rows output row oh of image n reads, for kh = 0..K-1 (`in` is (N, H, W, C) contiguous): pixel
  // iw at (iw + pad) * C, null above or below the image.
  const float* const* rows_for(const float* in, int64_t n, int64_t oh) {
    for (int64_t kh = 0; kh < g_.K; ++kh) {
      const int64_t ih = oh + kh - g_.pad;
      rows_[kh] = ih >= 0 && ih < g_.H ? get(in + n * g_.H * g_.W * g_.C, n, ih) : nullptr;
    }
    return rows_.data();
  }

 private:
  const float* get(const float* img, int64_t n, int64_t ih) {
    const int64_t slot = ih % g_.K, tag = n * g_.H + ih;
    float* row = data_.data() + slot * width_;
    if (tag_[slot] != tag) {
      std::memcpy(row + g_.pad * g_.C, img + ih * g_.W * g_.C, g_.W * g_.C * sizeof(float));
      tag_[slot] = tag;
    }
    return row;
  }

  const Geometry& g_;
  int64_t width_;
  std::vector<float> data_;  // the borders stay zero: copies write the middle
  std::vector<int64_t> tag_;
  std::vector<const float*> rows_;
};

// One block of P pixels from ow0 of one output row, over the kernel rows [kh_lo, kh_hi) whose
// padded input rows are rows[kh] (null above or below the image): adds the P * CO partial sums
// into sums.
template <int CO, int P>
void conv_block(const float* const* rows, const float* wt, const Geometry& g, int64_t ow0, int64_t kh_lo,
                int64_t kh_hi, float* sums) {
  V acc[P][CO];
  for (int p = 0; p < P; ++p)
    for (int co = 0; co < CO; ++co) acc[p][co] = V(0.f);
  const int64_t run = g.run(), vec_end = run - run % V::size();
  for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
    if (!rows[kh]) continue;
    const float* x = rows[kh] + ow0 * g.C;  // run start of pixel ow0 (padded coordinates)
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

// The last `count` (< kPixels) pixels of a row: the block of that size.
template <int CO, int P = kPixels - 1>
void conv_last_block(int64_t count, const float* const* rows, const float* wt, const Geometry& g, int64_t ow0,
                     int64_t kh_lo, int64_t kh_hi, float* sums) {
  if constexpr (P >= 1) {
    if (count == P) return conv_block<CO, P>(rows, wt, g, ow0, kh_lo, kh_hi, sums);
    conv_last_block<CO, P - 1>(count, rows, wt, g, ow0, kh_lo, kh_hi, sums);
  }
}

template <int CO>
void conv_rows(const float* in, const float* wt, const float* bias, const Geometry& g, int64_t N, float* out,
               int64_t out_pix_stride, int64_t out_c_stride, int64_t out_img_stride) {
  // Kernel rows are taken in groups whose weights (CO * rows * K * C floats) fit in ~16 KiB, so
  // they stay in L1 while a whole output row of blocks streams past (the full 9x9x64x3 kernel
  // is 62 KiB, more than L1); each group adds its partial sums into the row buffer.
  const int64_t group = std::max<int64_t>(1, 16384 / (CO * g.run() * static_cast<int64_t>(sizeof(float))));
  const int64_t full_end = g.W / kPixels * kPixels;
  at::parallel_for(0, N * g.H, grain_for(g.W * g.run() * CO), [&](int64_t begin, int64_t end) {
    std::vector<float> sums(g.W * CO);
    PaddedRows padded(g);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.H, oh = r % g.H;
      const float* const* rows = padded.rows_for(in, n, oh);
      std::fill(sums.begin(), sums.end(), 0.f);
      for (int64_t kh = 0; kh < g.K; kh += group) {
        const int64_t kh_end = std::min(g.K, kh + group);
        for (int64_t ow = 0; ow < full_end; ow += kPixels)
          conv_block<CO, kPixels>(rows, wt, g, ow, kh, kh_end, sums.data() + ow * CO);
        if (full_end < g.W)
          conv_last_block<CO>(g.W - full_end, rows, wt, g, full_end, kh, kh_end, sums.data() + full_end * CO);
      }
      float* dst = out + n * out_img_stride + oh * g.W * out_pix_stride;
      for (int64_t ow = 0; ow < g.W; ++ow)
        for (int co = 0; co < CO; ++co)
          dst[ow * out_pix_stride + co * out_c_stride] = sums[ow * CO + co] + (bias ? bias[co] : 0.f);
    }
  });
}

constexpr int64_t kMaxIn = 4;
// Few inputs: P * kInVectors sums + P broadcasts + the weight vector in use: 6 x 4 + 7 of AVX-512's
// 32, 3 x 4 + 4 of AVX2's 16.
constexpr int kInPixels = V::size() >= 16 ? 6 : 3;
constexpr int64_t kInVectors = 4;
constexpr int64_t kInMinKernel = 5;

// Output channels [co0, co0 + kInVectors * V::size()) of P pixels from ow0, over every kernel row, plus
// the bias (cout values, or null): stored into the output row `out` (pixels `cout` floats apart).
template <int P>
void in_block(const float* const* rows, const float* wt, const float* bias, const Geometry& g, int64_t cout,
              int64_t ow0, int64_t co0, float* out) {
  V acc[P][kInVectors];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < kInVectors; ++v) acc[p][v] = V(0.f);
  const int64_t run = g.run();
  for (int64_t kh = 0; kh < g.K; ++kh) {
    if (!rows[kh]) continue;
    const float* x = rows[kh] + ow0 * g.C;  // run start of pixel ow0 (padded coordinates)
    const float* w = wt + kh * run * cout + co0;
    for (int64_t t = 0; t < run; ++t) {
      V xb[P];
      for (int p = 0; p < P; ++p) xb[p] = in_register(V(x[p * g.C + t]));
      for (int v = 0; v < kInVectors; ++v) {
        const V wv = in_register(V::loadu(w + t * cout + v * V::size()));
        for (int p = 0; p < P; ++p) acc[p][v] = at::vec::fmadd(xb[p], wv, acc[p][v]);
      }
    }
  }
  for (int v = 0; v < kInVectors; ++v) {
    const V b = bias ? V::loadu(bias + co0 + v * V::size()) : V(0.f);
    for (int p = 0; p < P; ++p) (acc[p][v] + b).store(out + (ow0 + p) * cout + co0 + v * V::size());
  }
}

// The last `count` (< kInPixels) pixels of a row: the block of that size.
template <int P = kInPixels - 1>
void in_last_block(int64_t count, const float* const* rows, const float* wt, const float* bias, const Geometry& g,
                   int64_t cout, int64_t ow0, int64_t co0, float* out) {
  if constexpr (P >= 1) {
    if (count == P) return in_block<P>(rows, wt, bias, g, cout, ow0, co0, out);
    in_last_block<P - 1>(count, rows, wt, bias, g, cout, ow0, co0, out);
  }
}

// out: (N, H, W, cout) contiguous; wt: (kh, kw, ci, co).
void in_rows(const float* in, const float* wt, const float* bias, const Geometry& g, int64_t N, int64_t cout,
             float* out) {
  const int64_t chunk = kInVectors * V::size(), full_end = g.W / kInPixels * kInPixels;
  at::parallel_for(0, N * g.H, grain_for(g.W * g.run() * cout), [&](int64_t begin, int64_t end) {
    PaddedRows padded(g);
    for (int64_t r = begin; r < end; ++r) {
      const float* const* rows = padded.rows_for(in, r / g.H, r % g.H);
      float* row_out = out + r * g.W * cout;
      // Channel chunks outermost: a chunk's weights (K * K * C_in * chunk floats) stay in cache over the row.
      for (int64_t co0 = 0; co0 < cout; co0 += chunk) {
        for (int64_t ow = 0; ow < full_end; ow += kInPixels)
          in_block<kInPixels>(rows, wt, bias, g, cout, ow, co0, row_out);
        if (full_end < g.W) in_last_block(g.W - full_end, rows, wt, bias, g, cout, full_end, co0, row_out);
      }
    }
  });
}

// What both direct kernels read: the geometry, x as NHWC, the weight permuted to `order` and made
// contiguous, the bias as fp32 (null without one). The tensors are kept alive with the pointers.
struct DirectInputs {
  Geometry g;
  at::Tensor in_nhwc, wt_reordered, bias_fp32;
  const float *in, *wt, *bias;
};

DirectInputs direct_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::IntArrayRef order) {
  const int64_t K = weight.size(2);
  DirectInputs d{Geometry{x.size(2), x.size(3), x.size(1), K, K / 2, weight.size(0)},
                 x.contiguous(at::MemoryFormat::ChannelsLast), weight.permute(order).contiguous(),
                 bias ? bias->to(at::kFloat).contiguous() : at::Tensor(), nullptr, nullptr, nullptr};
  d.in = d.in_nhwc.const_data_ptr<float>();
  d.wt = d.wt_reordered.const_data_ptr<float>();
  d.bias = d.bias_fp32.defined() ? d.bias_fp32.const_data_ptr<float>() : nullptr;
  return d;
}

}  // namespace

bool few_in_conv_applies(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.dim() == 4 && weight.dim() == 4 &&
         weight.size(1) >= 1 && weight.size(1) <= kMaxIn && weight.size(1) == x.size(1) &&
         weight.size(0) % (kInVectors * V::size()) == 0 && weight.size(2) == weight.size(3) &&
         weight.size(2) % 2 == 1 && weight.size(2) >= kInMinKernel;
}

at::Tensor few_in_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(few_in_conv_applies(x, weight), "fastsr: few_in_conv does not apply to x ", x.sizes(), " ",
              x.scalar_type(), ", weight ", weight.sizes());
  const DirectInputs d = direct_inputs(x, weight, bias, {2, 3, 1, 0});  // weight as (kh, kw, ci, co)
  const Geometry& g = d.g;
  at::Tensor out = at::empty({x.size(0), g.CO, g.H, g.W}, x.options(), at::MemoryFormat::ChannelsLast);
  float* op = out.mutable_data_ptr<float>();
  in_rows(d.in, d.wt, d.bias, g, x.size(0), g.CO, op);
  return out;
}

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
  const DirectInputs d = direct_inputs(x, weight, bias, {0, 2, 3, 1});  // weight as (co, kh, kw, ci)
  const Geometry& g = d.g;
  const int64_t N = x.size(0), CO = g.CO, H = g.H, W = g.W;
  at::Tensor out = at::empty({N, CO, H, W}, x.options(), fmt);
  const bool cl = is_channels_last(fmt);
  const int64_t pix = cl ? CO : 1, cs = cl ? 1 : H * W, img = CO * H * W;
  float* op = out.mutable_data_ptr<float>();
  switch (CO) {
    case 1: conv_rows<1>(d.in, d.wt, d.bias, g, N, op, pix, cs, img); break;
    case 2: conv_rows<2>(d.in, d.wt, d.bias, g, N, op, pix, cs, img); break;
    case 3: conv_rows<3>(d.in, d.wt, d.bias, g, N, op, pix, cs, img); break;
    default: conv_rows<4>(d.in, d.wt, d.bias, g, N, op, pix, cs, img); break;
  }
  return out;
}

}  // namespace fastsr::cpu
