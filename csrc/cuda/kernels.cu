// CUDA kernels of the fastsr ops. CUDA headers only (no torch), so this file compiles with plain
// `nvcc -c` on machines without a GPU or a CUDA build of torch (tests/test_cpp.py does that for
// sm_80 and sm_90). Offsets are int64: gigapixel tensors pass 2**31 elements.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace fastsr::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 8;  // grid-stride loops cover the rest
// BT.601 luma weights as in fastsr/constants.py (MATLAB rgb2ycbcr on [0, 1] data).
__constant__ double kYWeights[3] = {65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0};

// Element type <-> accumulation type.
template <typename T>
struct Acc {
  using type = float;
  __device__ static float load(T v) { return static_cast<float>(v); }
  __device__ static T store(float v) { return static_cast<T>(v); }
};
template <>
struct Acc<double> {
  using type = double;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};
template <>
struct Acc<__half> {
  using type = float;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

__host__ __device__ inline int64_t offset(const Shape& s, int64_t n, int64_t c, int64_t h, int64_t w) {
  return s.channels_last ? ((n * s.H + h) * s.W + w) * s.C + c : ((n * s.C + c) * s.H + h) * s.W + w;
}

// Decodes a linear index in memory order of shape s into (n, c, h, w).
__device__ inline void decode(const Shape& s, int64_t i, int64_t& n, int64_t& c, int64_t& h, int64_t& w) {
  if (s.channels_last) {
    c = i % s.C;
    i /= s.C;
    w = i % s.W;
    i /= s.W;
    h = i % s.H;
    n = i / s.H;
  } else {
    w = i % s.W;
    i /= s.W;
    h = i % s.H;
    i /= s.H;
    c = i % s.C;
    n = i / s.C;
  }
}

inline unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

#define FASTSR_GRID_STRIDE(i, total)                                                            \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (total); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename T>
__global__ void shuffle_prelu_fwd_kernel(const T* __restrict__ x, const typename Acc<T>::type* __restrict__ slope,
                                         const T* __restrict__ res, T* __restrict__ out, Shape in, Shape os,
                                         int64_t r) {
  using A = typename Acc<T>::type;
  const int64_t total = os.N * os.C * os.H * os.W;
  FASTSR_GRID_STRIDE(i, total) {
    int64_t n, c, oh, ow;
    decode(os, i, n, c, oh, ow);
    const int64_t src = offset(in, n, c * r * r + (oh % r) * r + ow % r, oh / r, ow / r);
    A v = Acc<T>::load(x[src]);
    if (slope != nullptr && !(v > A(0))) v *= slope[c];
    if (res != nullptr) v += Acc<T>::load(res[i]);
    out[i] = Acc<T>::store(v);
  }
}

template <typename T>
__global__ void shuffle_prelu_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                         const typename Acc<T>::type* __restrict__ slope, T* __restrict__ grad_x,
                                         Shape in, Shape os, int64_t r) {
  using A = typename Acc<T>::type;
  const int64_t total = in.N * in.C * in.H * in.W;
  FASTSR_GRID_STRIDE(i, total) {
    int64_t n, cp, h, w;
    decode(in, i, n, cp, h, w);
    const int64_t c = cp / (r * r), k = cp % (r * r);
    const A gv = Acc<T>::load(g[offset(os, n, c, h * r + k / r, w * r + k % r)]);
    const bool pass = slope == nullptr || Acc<T>::load(x[i]) > A(0);
    grad_x[i] = Acc<T>::store(pass ? gv : slope[c] * gv);
  }
}

// Region element e of image n: (c, h, w) of the cropped region in memory-friendly order.
__device__ inline int64_t region_offset(const Shape& s, int64_t n, int64_t e, int64_t crop, int64_t rh, int64_t rw,
                                        int64_t channels) {
  int64_t c, h, w;
  if (s.channels_last) {
    c = e % channels;
    e /= channels;
    w = e % rw;
    h = e / rw;
  } else {
    w = e % rw;
    e /= rw;
    h = e % rh;
    c = e / rh;
  }
  return offset(s, n, c, h + crop, w + crop);
}

template <typename T>
__global__ void squared_error_kernel(const T* __restrict__ a, const T* __restrict__ b, double* __restrict__ sums,
                                     Shape s, int64_t crop, bool y_channel) {
  using A = typename Acc<T>::type;
  const int64_t n = blockIdx.y, rh = s.H - 2 * crop, rw = s.W - 2 * crop;
  const int64_t channels = y_channel ? 1 : s.C, total = channels * rh * rw;
  const int64_t cstep = s.channels_last ? 1 : s.H * s.W;  // offset between colour samples of a pixel
  double acc = 0.0;
  FASTSR_GRID_STRIDE(e, total) {
    const int64_t o = region_offset(s, n, e, crop, rh, rw, channels);
    A d;
    if (y_channel) {
      d = A(0);
      for (int c = 0; c < 3; ++c)
        d += A(kYWeights[c]) * (Acc<T>::load(a[o + c * cstep]) - Acc<T>::load(b[o + c * cstep]));
    } else {
      d = Acc<T>::load(a[o]) - Acc<T>::load(b[o]);
    }
    acc += static_cast<double>(d) * static_cast<double>(d);
  }
  // Block reduction: warp shuffles, then one value per warp through shared memory.
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  __shared__ double warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0;
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) atomicAdd(sums + n, acc);
  }
}

template <typename T>
__global__ void squared_error_bwd_kernel(const typename Acc<T>::type* __restrict__ coef, const T* __restrict__ a,
                                         const T* __restrict__ b, T* __restrict__ grad_a, Shape s, int64_t crop,
                                         bool y_channel) {
  using A = typename Acc<T>::type;
  const int64_t total = s.N * s.C * s.H * s.W;
  FASTSR_GRID_STRIDE(i, total) {
    int64_t n, c, h, w;
    decode(s, i, n, c, h, w);
    if (h < crop || h >= s.H - crop || w < crop || w >= s.W - crop) {
      grad_a[i] = Acc<T>::store(A(0));
      continue;
    }
    A d;
    if (y_channel) {
      d = A(0);
      for (int k = 0; k < 3; ++k) {
        const int64_t o = offset(s, n, k, h, w);
        d += A(kYWeights[k]) * (Acc<T>::load(a[o]) - Acc<T>::load(b[o]));
      }
      d *= A(kYWeights[c]);
    } else {
      d = Acc<T>::load(a[i]) - Acc<T>::load(b[i]);
    }
    grad_a[i] = Acc<T>::store(coef[n] * d);
  }
}

template <typename T>
__global__ void sigmoid_gate_kernel(T* __restrict__ y, const T* __restrict__ skip, int64_t total) {
  using A = typename Acc<T>::type;
  FASTSR_GRID_STRIDE(i, total) {
    const A v = Acc<T>::load(y[i]);
    const A sig = A(1) / (A(1) + exp(-v));
    y[i] = Acc<T>::store(skip != nullptr ? (v + Acc<T>::load(skip[i])) * (sig - A(0.5)) : v * sig);
  }
}

template <typename T>
__global__ void sigmoid_gate_bwd_kernel(const T* __restrict__ g, const T* __restrict__ y, const T* __restrict__ skip,
                                        T* __restrict__ grad_y, T* __restrict__ grad_skip, int64_t total) {
  using A = typename Acc<T>::type;
  FASTSR_GRID_STRIDE(i, total) {
    const A v = Acc<T>::load(y[i]), gv = Acc<T>::load(g[i]);
    const A sig = A(1) / (A(1) + exp(-v));
    const A gate = skip != nullptr ? sig - A(0.5) : sig;
    const A shifted = skip != nullptr ? v + Acc<T>::load(skip[i]) : v;
    grad_y[i] = Acc<T>::store(gv * (gate + shifted * sig * (A(1) - sig)));
    if (grad_skip != nullptr) grad_skip[i] = Acc<T>::store(gv * gate);
  }
}

template <typename T>
__global__ void to_uint8_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, Shape s) {
  using A = typename Acc<T>::type;
  const int64_t total = s.N * s.C * s.H * s.W;
  FASTSR_GRID_STRIDE(i, total) {  // i walks the (N, H, W, C) output
    const int64_t c = i % s.C, w = (i / s.C) % s.W, h = (i / (s.C * s.W)) % s.H, n = i / (s.C * s.W * s.H);
    A v = Acc<T>::load(x[offset(s, n, c, h, w)]);
    v = v > A(0) ? (v < A(1) ? v : A(1)) : A(0);  // NaN fails both tests -> 0
    out[i] = static_cast<uint8_t>(rint(v * A(255)));  // rint: round half to even
  }
}

// ---- batch_norm_prelu ------------------------------------------------------------------------
// Every kernel walks a tile of channels: block (bx, by) takes channels by * tc + [0, tc) (then
// strides by gridDim.y tiles) and, for each, the pixels p = bx * rows + ty + k * gridDim.x * rows of
// the N * H * W; thread t is (tx, ty) = (t % tc, t / tc), rows = kThreads / tc. NCHW uses tc = 1
// (a block reads runs of one plane), channels_last tc = the power of two >= C up to 32 (a warp
// reads adjacent channels of 32 / tc pixels). A thread keeps one channel, so its per-channel
// coefficients stay in registers, and the sums need no atomics: deterministic.
constexpr int kWarps = kThreads / 32;
constexpr int64_t kReduceBlocks = 1024;  // ~one wave on an H100/H200; rows of `partial` = this / tiles
constexpr int64_t kApplyBlocks = 4096;
constexpr int64_t kMinPixelsPerThread = 4;

struct Tile {
  int tc, tx, ty, rows;
  __device__ explicit Tile(int tile_channels)
      : tc(tile_channels), tx(threadIdx.x % tile_channels), ty(threadIdx.x / tile_channels),
        rows(kThreads / tile_channels) {}
};

// f(offset) for each pixel of channel c that this thread takes. (n, hw) = divmod(p, HW) are kept
// up to date by additions (no int64 division per element).
template <typename F>
__device__ inline void for_each_pixel(const Shape& s, int64_t c, const Tile& t, F&& f) {
  const int64_t HW = s.H * s.W, P = s.N * HW;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * t.rows + t.ty;
  const int64_t step = static_cast<int64_t>(gridDim.x) * t.rows;
  if (start >= P) return;
  const int64_t dn = step / HW, dhw = step % HW;
  int64_t n = start / HW, hw = start % HW;
  for (int64_t p = start; p < P; p += step) {
    f(s.channels_last ? p * s.C + c : (n * s.C + c) * HW + hw);
    n += dn;
    hw += dhw;
    if (hw >= HW) hw -= HW, ++n;
  }
}

// Adds acc[k] up over the threads of channel c (the tile's rows) and stores the block's sums at
// partial[(blockIdx.x * K + k) * C + c]. Every thread of the block calls it (it synchronises).
template <int K>
__device__ inline void store_tile_sums(double (&acc)[K], double* smem, double* __restrict__ partial, int64_t C,
                                       int64_t c, const Tile& t) {
  for (int off = 16; off >= t.tc; off /= 2)  // within a warp: lanes tx, tx + tc, ... share a channel
    for (int k = 0; k < K; ++k) acc[k] += __shfl_down_sync(0xffffffffu, acc[k], off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane < t.tc)
    for (int k = 0; k < K; ++k) smem[(k * kWarps + warp) * 32 + lane] = acc[k];
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < t.tc && c < C) {  // thread tx of row 0, channel c
    for (int k = 0; k < K; ++k) {
      double sum = 0.0;
      for (int w = 0; w < kWarps; ++w) sum += smem[(k * kWarps + w) * 32 + t.tx];
      partial[(static_cast<int64_t>(blockIdx.x) * K + k) * C + c] = sum;
    }
  }
  __syncthreads();  // smem is reused by the next channel tile
}

// Products and sums rounded one at a time where a sum follows: nvcc would fuse a * b + c into an
// FMA, and the CPU kernel (built without FP contraction) rounds the product first.
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }

// One channel's coefficients (launch.h's coef rows).
template <typename A>
struct BnChannel {
  A mean, invstd, weight, bias, slope;
  __device__ BnChannel(const A* __restrict__ coef, int64_t C, int64_t c, bool act)
      : mean(coef[kBnMean * C + c]), invstd(coef[kBnInvstd * C + c]), weight(coef[kBnWeight * C + c]),
        bias(coef[kBnBias * C + c]), slope(act ? coef[kBnSlope * C + c] : A(1)) {}
  // v = xhat * weight + bias, xhat = (x - mean) * invstd.
  __device__ A affine(A x, A& xhat) const {
    xhat = mul_rn(x - mean, invstd);
    return add_rn(mul_rn(xhat, weight), bias);
  }
};

template <typename T>
__global__ void bn_stats_kernel(const T* __restrict__ x, double* __restrict__ partial, Shape s, int tc) {
  __shared__ double smem[2 * kWarps * 32];
  const Tile t(tc);
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * tc; c0 < s.C; c0 += static_cast<int64_t>(gridDim.y) * tc) {
    const int64_t c = c0 + t.tx;
    double acc[2] = {0.0, 0.0};
    if (c < s.C) {
      for_each_pixel(s, c, t, [&](int64_t o) {
        const double v = static_cast<double>(Acc<T>::load(x[o]));
        acc[0] += v;
        acc[1] += v * v;
      });
    }
    store_tile_sums<2>(acc, smem, partial, s.C, c, t);
  }
}

template <typename T>
__global__ void bn_prelu_fwd_kernel(const T* __restrict__ x, const typename Acc<T>::type* __restrict__ coef, bool act,
                                    const T* __restrict__ res, T* __restrict__ y, Shape s, int tc) {
  using A = typename Acc<T>::type;
  const Tile t(tc);
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * tc; c0 < s.C; c0 += static_cast<int64_t>(gridDim.y) * tc) {
    const int64_t c = c0 + t.tx;
    if (c >= s.C) continue;
    const BnChannel<A> k(coef, s.C, c, act);
    for_each_pixel(s, c, t, [&](int64_t o) {
      A xhat;
      A v = k.affine(Acc<T>::load(x[o]), xhat);
      if (act && !(v > A(0))) v = mul_rn(v, k.slope);
      if (res != nullptr) v += Acc<T>::load(res[o]);
      y[o] = Acc<T>::store(v);
    });
  }
}

template <typename T>
__global__ void bn_prelu_grad_sums_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                          const typename Acc<T>::type* __restrict__ coef, bool act,
                                          double* __restrict__ partial, Shape s, int tc) {
  using A = typename Acc<T>::type;
  __shared__ double smem[3 * kWarps * 32];
  const Tile t(tc);
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * tc; c0 < s.C; c0 += static_cast<int64_t>(gridDim.y) * tc) {
    const int64_t c = c0 + t.tx;
    double acc[3] = {0.0, 0.0, 0.0};
    if (c < s.C) {
      const BnChannel<A> k(coef, s.C, c, act);
      for_each_pixel(s, c, t, [&](int64_t o) {
        const A gv = Acc<T>::load(g[o]);
        A xhat;
        const A v = k.affine(Acc<T>::load(x[o]), xhat);
        const bool neg = act && !(v > A(0));
        const A gp = neg ? mul_rn(gv, k.slope) : gv;
        acc[0] += static_cast<double>(gp);
        acc[1] += static_cast<double>(gp * xhat);
        if (neg) acc[2] += static_cast<double>(gv * v);
      });
    }
    store_tile_sums<3>(acc, smem, partial, s.C, c, t);
  }
}

template <typename T>
__global__ void bn_prelu_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                    const typename Acc<T>::type* __restrict__ coef, bool act, T* __restrict__ grad_x,
                                    Shape s, int tc) {
  using A = typename Acc<T>::type;
  const Tile t(tc);
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * tc; c0 < s.C; c0 += static_cast<int64_t>(gridDim.y) * tc) {
    const int64_t c = c0 + t.tx;
    if (c >= s.C) continue;
    const BnChannel<A> k(coef, s.C, c, act);
    const A gain = coef[kBnGain * s.C + c], mg = coef[kBnMeanGrad * s.C + c], mgx = coef[kBnMeanGradXhat * s.C + c];
    for_each_pixel(s, c, t, [&](int64_t o) {
      const A gv = Acc<T>::load(g[o]);
      A xhat;
      const A v = k.affine(Acc<T>::load(x[o]), xhat);
      const A gp = act && !(v > A(0)) ? mul_rn(gv, k.slope) : gv;
      grad_x[o] = Acc<T>::store(gain * (gp - mg - mul_rn(xhat, mgx)));
    });
  }
}

// The per-channel steps between the passes, on the device: done with ATen ops on the (K, C) sums
// they took about 20 small launches forward and 25 backward per call, and a small training step on
// a GPU is bound by the host's launches (an H200 ran SRResNet's bf16 step at 0.62x eager with them).
// Per-channel arithmetic in fp64 with explicit roundings (no FMA contraction), rounded once to the
// acc type, as the ATen version did.

// sum over the partial rows b of partial[(b * K + k) * C + c], in row order (deterministic).
__device__ inline double row_sum(const double* __restrict__ partial, int64_t blocks, int K, int k, int64_t C,
                                 int64_t c) {
  double sum = 0.0;
  for (int64_t b = 0; b < blocks; ++b) sum += partial[(b * K + k) * C + c];
  return sum;
}

// coef rows kBnMean..kBnSlope from the batch statistics (slope row only when slope != nullptr).
template <typename A>
__device__ inline void store_bn_coefficients(A* __restrict__ coef, int64_t C, int64_t c, double mean, double var,
                                             double eps, const A* __restrict__ weight, const A* __restrict__ bias,
                                             const A* __restrict__ slope, int64_t slope_count) {
  coef[kBnMean * C + c] = static_cast<A>(mean);
  coef[kBnInvstd * C + c] = static_cast<A>(__drcp_rn(__dsqrt_rn(__dadd_rn(var, eps))));
  coef[kBnWeight * C + c] = weight[c];
  coef[kBnBias * C + c] = bias[c];
  if (slope != nullptr) coef[kBnSlope * C + c] = slope[slope_count == 1 ? 0 : c];
}

// Forward: mean and biased variance from pass 1's sums (K = 2), the coefficients of pass 2, and
// the statistics the op returns. One thread per channel.
template <typename A>
__global__ void bn_finalize_fwd_kernel(const double* __restrict__ partial, int64_t blocks, int64_t C, double count,
                                       double eps, const A* __restrict__ weight, const A* __restrict__ bias,
                                       const A* __restrict__ slope, int64_t slope_count, A* __restrict__ coef,
                                       A* __restrict__ mean_out, A* __restrict__ var_out) {
  FASTSR_GRID_STRIDE(c, C) {
    const double mean = __ddiv_rn(row_sum(partial, blocks, 2, 0, C, c), count);
    const double biased = __dsub_rn(__ddiv_rn(row_sum(partial, blocks, 2, 1, C, c), count), __dmul_rn(mean, mean));
    const double var = biased < 0.0 ? 0.0 : biased;  // rounding can make it negative; NaN stays NaN
    store_bn_coefficients(coef, C, c, mean, var, eps, weight, bias, slope, slope_count);
    mean_out[c] = static_cast<A>(mean);
    var_out[c] = static_cast<A>(var);
  }
}

// Backward, before pass 1: the coefficients from the saved statistics. One thread per channel.
template <typename A>
__global__ void bn_coefficients_kernel(const A* __restrict__ mean, const A* __restrict__ var, int64_t C, double eps,
                                       const A* __restrict__ weight, const A* __restrict__ bias,
                                       const A* __restrict__ slope, int64_t slope_count, A* __restrict__ coef) {
  FASTSR_GRID_STRIDE(c, C) {
    store_bn_coefficients(coef, C, c, static_cast<double>(mean[c]), static_cast<double>(var[c]), eps, weight, bias,
                          slope, slope_count);
  }
}

// Backward, after pass 1 (K = 3 sums: g', g' * xhat, g * v where v <= 0): pass 2's rows (gain from
// the invstd the kernels use), the weight and bias gradients, and the slope's gradient in fp64 (per
// channel, or their total for a shared slope: one block, so the total is summed in a fixed order).
template <typename A>
__global__ void bn_finalize_bwd_kernel(const double* __restrict__ partial, int64_t blocks, int64_t C, double count,
                                       A* __restrict__ coef, A* __restrict__ grad_weight, A* __restrict__ grad_bias,
                                       double* __restrict__ grad_slope, int64_t slope_count) {
  __shared__ double slope_sums[kThreads];
  double slope_sum = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const double s0 = row_sum(partial, blocks, 3, 0, C, c), s1 = row_sum(partial, blocks, 3, 1, C, c);
    const double weight = coef[kBnWeight * C + c], invstd = coef[kBnInvstd * C + c];
    coef[kBnGain * C + c] = static_cast<A>(__dmul_rn(weight, invstd));
    coef[kBnMeanGrad * C + c] = static_cast<A>(__ddiv_rn(s0, count));
    coef[kBnMeanGradXhat * C + c] = static_cast<A>(__ddiv_rn(s1, count));
    grad_weight[c] = static_cast<A>(s1);
    grad_bias[c] = static_cast<A>(s0);
    if (grad_slope != nullptr) {
      const double s2 = row_sum(partial, blocks, 3, 2, C, c);
      if (slope_count == 1)
        slope_sum += s2;
      else
        grad_slope[c] = s2;
    }
  }
  if (grad_slope == nullptr || slope_count != 1) return;
  slope_sums[threadIdx.x] = slope_sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (unsigned t = 0; t < blockDim.x; ++t) total += slope_sums[t];
    grad_slope[0] = total;
  }
}

// The grid of the channel-tile kernels: ~target_blocks blocks, at least kMinPixelsPerThread pixels
// per thread where there are that many.
struct TileGrid {
  int tc;
  dim3 grid;
};

TileGrid tile_grid(const Shape& s, int64_t target_blocks) {
  int tc = 1;
  if (s.channels_last)
    while (tc < 32 && tc < s.C) tc *= 2;
  const int64_t rows = kThreads / tc, pixels = s.N * s.H * s.W;
  const int64_t tiles = (s.C + tc - 1) / tc;
  const int64_t by = tiles < 1 ? 1 : (tiles > 65535 ? 65535 : tiles);
  int64_t bx = target_blocks / by;
  const int64_t useful = (pixels + rows * kMinPixelsPerThread - 1) / (rows * kMinPixelsPerThread);
  bx = bx < useful ? bx : useful;
  bx = bx < 1 ? 1 : (bx > kMaxBlocks ? kMaxBlocks : bx);
  return {tc, dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))};
}

// Runs f with the element type named by dtype.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t shuffle_prelu_forward(DType dtype, const void* x, const void* slope, const void* res, void* out, Shape in,
                                  int64_t r, cudaStream_t stream) {
  const Shape os{in.N, in.C / (r * r), in.H * r, in.W * r, in.channels_last};
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    shuffle_prelu_fwd_kernel<T><<<blocks_for(os.N * os.C * os.H * os.W), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const A*>(slope), static_cast<const T*>(res), static_cast<T*>(out), in,
        os, r);
  });
}

cudaError_t sigmoid_gate(DType dtype, void* y, const void* skip, int64_t numel, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    sigmoid_gate_kernel<T><<<blocks_for(numel), kThreads, 0, stream>>>(static_cast<T*>(y), static_cast<const T*>(skip),
                                                                        numel);
  });
}

cudaError_t sigmoid_gate_backward(DType dtype, const void* grad, const void* y, const void* skip, void* grad_y,
                                  void* grad_skip, int64_t numel, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    sigmoid_gate_bwd_kernel<T><<<blocks_for(numel), kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(y), static_cast<const T*>(skip), static_cast<T*>(grad_y),
        static_cast<T*>(grad_skip), numel);
  });
}

cudaError_t shuffle_prelu_backward(DType dtype, const void* grad_out, const void* x, const void* slope, void* grad_x,
                                   Shape in, int64_t r, cudaStream_t stream) {
  const Shape os{in.N, in.C / (r * r), in.H * r, in.W * r, in.channels_last};
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    shuffle_prelu_bwd_kernel<T><<<blocks_for(in.N * in.C * in.H * in.W), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_out), static_cast<const T*>(x), static_cast<const A*>(slope),
        static_cast<T*>(grad_x), in, os, r);
  });
}

cudaError_t squared_error_sums(DType dtype, const void* a, const void* b, double* sums, Shape s, int64_t crop,
                               bool y_channel, cudaStream_t stream) {
  const int64_t per_image = (y_channel ? 1 : s.C) * (s.H - 2 * crop) * (s.W - 2 * crop);
  int64_t bx = (per_image + kThreads * 8 - 1) / (kThreads * 8);  // ~8 elements per thread, rest by striding
  bx = bx < 1 ? 1 : (bx > 4096 ? 4096 : bx);
  if (s.N > 65535) return cudaErrorInvalidValue;  // grid.y limit; the glue splits larger batches
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(s.N));
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    squared_error_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(b), sums, s,
                                                           crop, y_channel);
  });
}

cudaError_t squared_error_backward(DType dtype, const void* coef, const void* a, const void* b, void* grad_a, Shape s,
                                   int64_t crop, bool y_channel, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    squared_error_bwd_kernel<T><<<blocks_for(s.N * s.C * s.H * s.W), kThreads, 0, stream>>>(
        static_cast<const A*>(coef), static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(grad_a), s,
        crop, y_channel);
  });
}

cudaError_t to_uint8(DType dtype, const void* x, uint8_t* out, Shape s, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    to_uint8_kernel<T><<<blocks_for(s.N * s.C * s.H * s.W), kThreads, 0, stream>>>(static_cast<const T*>(x), out, s);
  });
}

int64_t batch_norm_partial_blocks(Shape s) { return tile_grid(s, kReduceBlocks).grid.x; }

cudaError_t batch_norm_stats(DType dtype, const void* x, double* partial, Shape s, cudaStream_t stream) {
  if (s.C <= 0) return cudaSuccess;
  const TileGrid g = tile_grid(s, kReduceBlocks);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    bn_stats_kernel<T><<<g.grid, kThreads, 0, stream>>>(static_cast<const T*>(x), partial, s, g.tc);
  });
}

cudaError_t batch_norm_prelu_forward(DType dtype, const void* x, const void* coef, bool act, const void* res, void* y,
                                     Shape s, cudaStream_t stream) {
  if (s.C <= 0) return cudaSuccess;
  const TileGrid g = tile_grid(s, kApplyBlocks);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    bn_prelu_fwd_kernel<T><<<g.grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const A*>(coef), act,
                                                            static_cast<const T*>(res), static_cast<T*>(y), s, g.tc);
  });
}

cudaError_t batch_norm_prelu_grad_sums(DType dtype, const void* grad, const void* x, const void* coef, bool act,
                                       double* partial, Shape s, cudaStream_t stream) {
  if (s.C <= 0) return cudaSuccess;
  const TileGrid g = tile_grid(s, kReduceBlocks);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    bn_prelu_grad_sums_kernel<T><<<g.grid, kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const A*>(coef), act, partial, s, g.tc);
  });
}

cudaError_t batch_norm_prelu_backward(DType dtype, const void* grad, const void* x, const void* coef, bool act,
                                      void* grad_x, Shape s, cudaStream_t stream) {
  if (s.C <= 0) return cudaSuccess;
  const TileGrid g = tile_grid(s, kApplyBlocks);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    bn_prelu_bwd_kernel<T><<<g.grid, kThreads, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(x),
                                                            static_cast<const A*>(coef), act,
                                                            static_cast<T*>(grad_x), s, g.tc);
  });
}

// Runs f with the accumulation type of dtype (fp64 for kFloat64, else fp32).
template <typename F>
cudaError_t dispatch_acc(DType dtype, F&& f) {
  if (dtype == DType::kFloat64)
    f(double{});
  else
    f(float{});
  return cudaGetLastError();
}

cudaError_t batch_norm_finalize(DType dtype, const double* partial, Shape s, double eps, const void* weight,
                                const void* bias, const void* slope, int64_t slope_count, void* coef, void* mean,
                                void* var, cudaStream_t stream) {
  if (s.C <= 0) return cudaSuccess;
  const int64_t blocks = batch_norm_partial_blocks(s);
  const double count = static_cast<double>(s.N * s.H * s.W);
  return dispatch_acc(dtype, [&](auto tag) {
    using A = decltype(tag);
    bn_finalize_fwd_kernel<A><<<blocks_for(s.C), kThreads, 0, stream>>>(
        partial, blocks, s.C, count, eps, static_cast<const A*>(weight), static_cast<const A*>(bias),
        static_cast<const A*>(slope), slope_count, static_cast<A*>(coef), static_cast<A*>(mean), static_cast<A*>(var));
  });
}

cudaError_t batch_norm_coefficients(DType dtype, const void* mean, const void* var, int64_t C, double eps,
                                    const void* weight, const void* bias, const void* slope, int64_t slope_count,
                                    void* coef, cudaStream_t stream) {
  if (C <= 0) return cudaSuccess;
  return dispatch_acc(dtype, [&](auto tag) {
    using A = decltype(tag);
    bn_coefficients_kernel<A><<<blocks_for(C), kThreads, 0, stream>>>(
        static_cast<const A*>(mean), static_cast<const A*>(var), C, eps, static_cast<const A*>(weight),
        static_cast<const A*>(bias), static_cast<const A*>(slope), slope_count, static_cast<A*>(coef));
  });
}

cudaError_t batch_norm_backward_finalize(DType dtype, const double* partial, Shape s, void* coef, void* grad_weight,
                                         void* grad_bias, double* grad_slope, int64_t slope_count,
                                         cudaStream_t stream) {
  if (s.C <= 0) return cudaSuccess;
  const int64_t blocks = batch_norm_partial_blocks(s);
  const double count = static_cast<double>(s.N * s.H * s.W);
  return dispatch_acc(dtype, [&](auto tag) {
    using A = decltype(tag);
    bn_finalize_bwd_kernel<A><<<1, kThreads, 0, stream>>>(partial, blocks, s.C, count, static_cast<A*>(coef),
                                                          static_cast<A*>(grad_weight), static_cast<A*>(grad_bias),
                                                          grad_slope, slope_count);
  });
}

}  // namespace fastsr::cuda
