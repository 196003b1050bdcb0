// Direct convolution vectorised over the reduction, for 1..4 output channels.
//
// With the input in NHWC, the receptive field of output pixel (oh, ow) in input row ih is ONE
// contiguous run of K * C_in floats (kw, ci), and the weights reordered to (co, kh, kw, ci) match
// it, so each (pixel, kh, co) term is a plain dot product. A block of P neighbouring pixels is
// done together: every weight vector loaded is used P times, every input vector CO times, and the
// P * CO accumulators stay in registers. The input rows are read from per-thread copies padded with
// `pad` zero pixels each side, so the pixels at the left and right borders are done in blocks too
// (clipping each border pixel's run instead left them to a one-accumulator loop: at 48x48 they were
// 8 of the 48 pixels a row and about 40% of the time). Each thread copies an input row once for
// the K output rows that read it; rows above and below the image are skipped.
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
  explicit PaddedRows(const Geometry& g) : g_(g), width_((g.W + 2 * g.pad) * g.C), data_(g.K * width_, 0.f), tag_(g.K, -1) {}

  // Row ih of image `img` (N, H, W, C contiguous), padded: pixel iw at (iw + pad) * C.
  const float* get(const float* img, int64_t n, int64_t ih) {
    const int64_t slot = ih % g_.K, tag = n * g_.H + ih;
    float* row = data_.data() + slot * width_;
    if (tag_[slot] != tag) {
      std::memcpy(row + g_.pad * g_.C, img + ih * g_.W * g_.C, g_.W * g_.C * sizeof(float));
      tag_[slot] = tag;
    }
    return row;
  }

 private:
  const Geometry& g_;
  int64_t width_;
  std::vector<float> data_;  // the borders stay zero: copies write the middle
  std::vector<int64_t> tag_;
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
    std::vector<const float*> rows(g.K);
    PaddedRows padded(g);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.H, oh = r % g.H;
      const float* img = in + n * g.H * g.W * g.C;
      for (int64_t kh = 0; kh < g.K; ++kh) {
        const int64_t ih = oh + kh - g.pad;
        rows[kh] = ih >= 0 && ih < g.H ? padded.get(img, n, ih) : nullptr;
      }
      std::fill(sums.begin(), sums.end(), 0.f);
      for (int64_t kh = 0; kh < g.K; kh += group) {
        const int64_t kh_end = std::min(g.K, kh + group);
        for (int64_t ow = 0; ow < full_end; ow += kPixels)
          conv_block<CO, kPixels>(rows.data(), wt, g, ow, kh, kh_end, sums.data() + ow * CO);
        if (full_end < g.W)
          conv_last_block<CO>(g.W - full_end, rows.data(), wt, g, full_end, kh, kh_end, sums.data() + full_end * CO);
      }
      float* dst = out + n * out_img_stride + oh * g.W * out_pix_stride;
      for (int64_t ow = 0; ow < g.W; ++ow)
        for (int co = 0; co < CO; ++co)
          dst[ow * out_pix_stride + co * out_c_stride] = sums[ow * CO + co] + (bias ? bias[co] : 0.f);
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
