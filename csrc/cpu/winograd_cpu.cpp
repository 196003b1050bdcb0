// Winograd F(2x2, 3x3) for fp32 3x3 convolutions with many channels (see winograd_cpu.h for why
// F(2x2)). With d the 4x4 input tile, g the 3x3 kernel and
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1],
// the 2x2 output tile is A^T [ sum_ci (G g G^T) . (B^T d B) ] A: 16 small GEMMs
// (tiles x C_in) * (C_in x C_out): 16 multiplies per 4 outputs instead of 36, 2.25x fewer.
//
// Work is done in blocks of kTiles output tiles (tiles numbered over (n, tile row, tile column)),
// one block per step of an at::parallel_for, with per-thread scratch:
//   1. input transform: the block's 4x4 input tiles (NHWC, zero 'same' padding outside the image)
//      -> Vt[16][kTiles][C_in], vectorised over channels;
//   2. per chunk of CW (<= 64) output channels: 16 GEMMs Vt[e] * U[e][chunk] -> M[16][kTiles][CW]
//      with a register-blocked micro-kernel (MR tiles x NRV vectors of output channels; the
//      chunk of U, C_in * CW floats, stays in L1 while the block's tiles stream past);
//   3. output transform of the chunk, fused with bias, PReLU, residual and the pixel-shuffle
//      store (or conv2d_silu's SiLU / attention, Act in common.h). For a shuffle the output channels are reordered (i, j, c) instead of (c, i, j) (the
//      weights are permuted), so every vector of channels belongs to one sub-pixel and is stored
//      as one contiguous run of the NHWC output.
// U = G g G^T is computed in fp64 and rounded once, and cached per weight tensor (see
// WeightCache): at 64x64 inputs the transform was 20-30% of a call, and inference calls the
// same weights again and again.
// NCHW inputs are converted to NHWC once and the NHWC result converted back at the end.
// The weight gradient (training; winograd_weight_grad, below the forward) reuses the input transform
// and the micro-kernel: 1.6-1.9x oneDNN's weight gradient on Zen 4, 1.4-2.1x with AVX2.
#include "winograd_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "../common.h"
#include "vec_util.h"

namespace fastsr::cpu {
namespace {

using V = at::vec::Vectorized<float>;
constexpr int64_t kVS = V::size();
// Micro-kernel: MR tiles x NRV vectors of accumulators + NRV weight vectors + 1 broadcast must
// fit the vector registers: 6 x 4 (+5) of AVX-512's 32, 6 x 2 (+3) of AVX2's 16. Narrower chunks
// (32 output channels: RRDBNet's dense-block convs) use more tiles per step: 12 x 2 (+3) on
// AVX-512, 12 x 1 (+2) on AVX2, so each weight vector loaded feeds twice as many FMAs.
constexpr int kNRV = kVS >= 16 ? 4 : 2;
constexpr int mr_for(int nrv) { return nrv * 2 <= kNRV ? 12 : 6; }
constexpr int64_t kTiles = 36;  // tiles per block (a multiple of every MR)
// Channel counts must be multiples of this (a whole number of vectors in every ISA variant).
constexpr int64_t kChannelMultiple = 16;
// "auto" mode: at least this many input pixels over the batch; below it oneDNN's direct conv is used.
// Measured, 64 -> 64, 2 threads, Zen 4 AVX-512, with the weight transform recomputed each call (as
// after every optimizer step in training): 1x8x8 0.13 vs oneDNN 0.14 ms, 1x12x12 0.11 vs 0.17,
// 4x12x12 0.31 vs 0.42-0.49; at 1x4x4 the two are level (0.105 vs 0.089).
constexpr int64_t kMinPixels = 64;
// The weight gradient's blocks: at most 64 tiles (its GEMMs' depth; 64 tiles of 64 + 64 channels are
// 512 KB of transforms, kept in L2 for the GEMMs), and MR output channels per micro-kernel call:
// 8 x 2 vectors of accumulators (+3) of AVX-512's 32 registers, 4 x 2 (+3) of AVX2's 16.
constexpr int64_t kWeightGradTiles = 64;
constexpr int64_t kMinPartTiles = 32;
constexpr int kWeightGradMR = kVS >= 16 ? 8 : 4;

// 0: never, 1: auto (size threshold), 2: always when the shapes allow (tests). FASTSR_WINOGRAD
// sets the initial mode (0/off, 1/auto, 2/force); the _winograd_mode op changes it at run time.
int initial_mode() {
  const char* env = std::getenv("FASTSR_WINOGRAD");
  if (!env || !*env) return 1;
  if (!std::strcmp(env, "0") || !std::strcmp(env, "off")) return 0;
  if (!std::strcmp(env, "2") || !std::strcmp(env, "force")) return 2;
  return 1;
}
std::atomic<int> g_mode{initial_mode()};
std::atomic<int64_t> g_calls{0};

// C[MR][NRV * kVS] (+)= A[MR][K] * B[K][NRV * kVS]: A's element (r, k) at a[r * a_row + k * a_k], B's
// rows ldb apart, C's ldc apart; with `accumulate` the product is added to C, else it replaces C.
template <int MR, int NRV>
inline void micro_kernel(const float* __restrict__ a, int64_t a_row, int64_t a_k, const float* __restrict__ b,
                         int64_t ldb, float* __restrict__ c, int64_t ldc, int64_t K, bool accumulate) {
  V acc[MR][NRV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) acc[r][v] = accumulate ? V::loadu(c + r * ldc + v * kVS) : V(0.f);
  for (int64_t k = 0; k < K; ++k) {
    V bv[NRV];
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) bv[v] = in_register(V::loadu(b + k * ldb + v * kVS));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V av = in_register(V(a[r * a_row + k * a_k]));
#pragma GCC unroll 4
      for (int v = 0; v < NRV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) acc[r][v].store(c + r * ldc + v * kVS);
}

struct Plan {
  int64_t N, H, W, Cin, Cout, r, C;  // C = Cout / r^2, the output channels
  int64_t xsN, xsH, xsW;             // input strides (channels adjacent: a channels_last tensor or a
                                     // channel slice of one, read in place)
  int64_t TH, TW, tiles;             // tile grid (ceil(H/2) x ceil(W/2)) per image, total tiles
  int64_t CW, chunks;                // output-channel chunk width and count
};

// A float vector whose new elements are left uninitialised (std::vector zero-fills them): a
// transform writes every element, so zeroing its 256 KB (1 MB for a 64 -> 256 conv) first, after
// every optimizer step, was wasted.
template <typename T>
struct DefaultInit : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInit<U>;
  };
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using Floats = std::vector<float, DefaultInit<float>>;

// U[e][chunk][ci][CW] = (G g G^T)[e] for output channel chunk * CW + (index in chunk), output
// channels in shuffled order co' = s * C + c (s = i * r + j the sub-pixel), from weight[c r^2 + s].
// Paid after every optimizer step in training (~35 calls a step), so it is kept cheap: the weight is
// read in place at its strides (contiguous, channels_last, any view), 16 input channels at a time
// (one cache line of a channels_last weight per output channel and tap), into a block laid out
// (ci, tap, co') for the arithmetic. ATen's permuted copy to that layout was ~20 us of a 64 -> 64
// transform, and gathering tap by tap across the whole weight about as slow.
Floats transform_weights(const at::Tensor& weight, const Plan& p) {
  constexpr int64_t kBlock = 16;  // input channels gathered together (C_in is a multiple of 16)
  const float* wp = weight.const_data_ptr<float>();
  Floats U(16 * p.Cin * p.Cout);
  float* up = U.data();
  const int64_t Cin = p.Cin, Cout = p.Cout, CW = p.CW, chunks = p.chunks, s_ci = weight.stride(1);
  // Where output channel co' and tap (kh, kw) start in the weight, computed once.
  std::vector<int64_t> channel_at(Cout);
  for (int64_t co = 0; co < Cout; ++co) channel_at[co] = ((co % p.C) * p.r * p.r + co / p.C) * weight.stride(0);
  int64_t tap_at[9];
  for (int tap = 0; tap < 9; ++tap) tap_at[tap] = (tap / 3) * weight.stride(2) + (tap % 3) * weight.stride(3);
  at::parallel_for(0, Cin / kBlock, grain_for(kBlock * 16 * Cout * 16), [&](int64_t begin, int64_t end) {
    std::vector<float> taps(kBlock * 9 * Cout);  // [ci - ci0][kh * 3 + kw][co']
    double t[4][3][64];                          // G g for one chunk (CW <= 64)
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t ci0 = blk * kBlock;
      if (s_ci == 1) {
        // Input channels adjacent (channels_last): per tap, 16 x 16 (co', ci) tiles transposed in
        // vector registers. 16 shuffled channels co' from a multiple of 16 share one sub-pixel, so
        // their rows are evenly spaced in the weight.
        for (int64_t co0 = 0; co0 < Cout; co0 += kBlock)
          for (int tap = 0; tap < 9; ++tap)
            at::vec::transpose_mxn<float, kBlock, kBlock>(wp + channel_at[co0] + tap_at[tap] + ci0,
                                                          channel_at[co0 + 1] - channel_at[co0],
                                                          taps.data() + tap * Cout + co0, 9 * Cout);
      } else {
        for (int64_t co = 0; co < Cout; ++co)
          for (int tap = 0; tap < 9; ++tap) {
            const float* src = wp + channel_at[co] + tap_at[tap] + ci0 * s_ci;
            for (int64_t c = 0; c < kBlock; ++c) taps[(c * 9 + tap) * Cout + co] = src[c * s_ci];
          }
      }
      // Per (ci, chunk): the fp64 arithmetic with the chunk's channels innermost, contiguous in
      // `taps` and in U, so it vectorises.
      for (int64_t c = 0; c < kBlock; ++c)
        for (int64_t k = 0; k < chunks; ++k) {
          const int64_t ci = ci0 + c;
          const float* g = taps.data() + c * 9 * Cout + k * CW;  // tap (row, kw), channel cc at g[(row * 3 + kw) * Cout + cc]
          for (int kw = 0; kw < 3; ++kw)
            for (int64_t cc = 0; cc < CW; ++cc) {
              const double g0 = g[(0 * 3 + kw) * Cout + cc], g1 = g[(1 * 3 + kw) * Cout + cc],
                           g2 = g[(2 * 3 + kw) * Cout + cc];
              t[0][kw][cc] = g0;
              t[1][kw][cc] = 0.5 * (g0 + g1 + g2);
              t[2][kw][cc] = 0.5 * (g0 - g1 + g2);
              t[3][kw][cc] = g2;
            }
          for (int a = 0; a < 4; ++a) {
            float* u0 = up + (((a * 4 + 0) * chunks + k) * Cin + ci) * CW;
            const int64_t step = chunks * Cin * CW;  // from element (a, b) to (a, b + 1)
            for (int64_t cc = 0; cc < CW; ++cc) {
              const double t0 = t[a][0][cc], t1 = t[a][1][cc], t2 = t[a][2][cc];
              u0[cc] = static_cast<float>(t0);
              u0[step + cc] = static_cast<float>(0.5 * (t0 + t1 + t2));
              u0[2 * step + cc] = static_cast<float>(0.5 * (t0 - t1 + t2));
              u0[3 * step + cc] = static_cast<float>(t2);
            }
          }
        }
    }
  });
  return U;
}

// A fingerprint of the weight's values (fp32 words, position-weighted sums in eight lanes): part of
// the cache key because a buffer can be rewritten without its version counter moving. torch.compile's
// generated code writes an eval model's folded weights into reused buffers that way, and without
// this a compiled SRResNet got the previous call's transformed weights. Computed on every call: the
// lanes are eight independent sums, eight words a step, so they stay in registers (one sum per word
// index mod 4, indexed in memory, was one dependent load-add-store per word: in a perf profile of
// 4x64x12x12 calls it took 0.27 of the micro-kernel's time, now 0.045).
// A dense tensor (contiguous or channels_last) is read in memory order where it lies (its strides
// are in the key too): copying a channels_last 512x512x3x3 VGG weight first cost more than its conv.
uint64_t fingerprint(const at::Tensor& weight) {
  const at::Tensor w = weight.is_non_overlapping_and_dense() ? weight : weight.contiguous();
  const auto* words = reinterpret_cast<const uint32_t*>(w.const_data_ptr<float>());
  const int64_t n = w.numel();
  constexpr int kLanes = 8;
  uint64_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += (uint64_t(words[i + j]) + 1) * uint64_t(2 * (i + j) + 1);
  for (; i < n; ++i) lane[i % kLanes] += (uint64_t(words[i]) + 1) * uint64_t(2 * i + 1);
  uint64_t h = 0;
  for (int j = 0; j < kLanes; ++j) h = (h ^ lane[j]) * 0x9E3779B97F4A7C15ull + (h >> 29);
  return h;
}

// Transformed weights per weight tensor. An entry is valid while the weight's storage is alive
// (weak reference) and its version counter unchanged (an in-place update, e.g. an optimizer step,
// bumps it), for the same data pointer, values (fingerprint), sizes, strides and shuffle; anything
// else recomputes.
// Inference tensors have no version counter and are never cached. Bounded by kCacheBytes:
// expired entries go first, then the oldest.
class WeightCache {
 public:
  using Value = std::shared_ptr<const Floats>;

  template <typename Make>
  Value get(const at::Tensor& weight, int64_t shuffle, Make make) {
    if (weight.is_inference()) return std::make_shared<const Floats>(make());
    Key key{weight.data_ptr(), weight._version(), fingerprint(weight), weight.sizes().vec(), weight.strides().vec(),
            shuffle};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const Entry& e : entries_)
        if (e.key == key && !e.storage.expired()) return e.value;
    }
    Value value = std::make_shared<const Floats>(make());
    std::lock_guard<std::mutex> lock(mutex_);
    insert(Entry{weight.storage().getWeakStorageImpl(),
                 std::move(key), value});
    return value;
  }

 private:
  static constexpr size_t kCacheBytes = size_t(1) << 30;
  struct Key {
    const void* data;
    uint32_t version;
    uint64_t values;
    std::vector<int64_t> sizes, strides;
    int64_t shuffle;
    bool operator==(const Key& o) const {
      return data == o.data && version == o.version && values == o.values && sizes == o.sizes &&
             strides == o.strides && shuffle == o.shuffle;
    }
  };
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    Key key;
    Value value;
  };

  void insert(Entry entry) {
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [&](const Entry& e) { return e.storage.expired() || e.key.data == entry.key.data; }),
                   entries_.end());
    const size_t add = entry.value->size() * sizeof(float);
    while (!entries_.empty() && bytes() + add > kCacheBytes) entries_.erase(entries_.begin());
    entries_.push_back(std::move(entry));
  }
  size_t bytes() const {
    size_t total = 0;
    for (const Entry& e : entries_) total += e.value->size() * sizeof(float);
    return total;
  }

  std::mutex mutex_;
  std::vector<Entry> entries_;
};

WeightCache& weight_cache() {
  static WeightCache cache;
  return cache;
}

// Input transform of tile `tile` (global index) into Vt[e][slot][ci], element e at vt + e * estride.
inline void input_tile(const float* __restrict__ x, const Plan& p, int64_t tile, float* __restrict__ vt,
                       int64_t slot, int64_t estride) {
  const int64_t n = tile / (p.TH * p.TW), ty = (tile / p.TW) % p.TH, tx = tile % p.TW;
  const int64_t h0 = 2 * ty - 1, w0 = 2 * tx - 1, Cin = p.Cin;
  const float* img = x + n * p.xsN;
  const float* src[4][4];
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) {
      const int64_t ih = h0 + a, iw = w0 + b;
      src[a][b] = (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) ? img + ih * p.xsH + iw * p.xsW : nullptr;
    }
  float* dst = vt + slot * Cin;
  for (int64_t ci = 0; ci < Cin; ci += kVS) {
    V d[4][4];
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < 4; ++b) d[a][b] = src[a][b] ? V::loadu(src[a][b] + ci) : V(0.f);
    V t[4][4];
    for (int b = 0; b < 4; ++b) {
      t[0][b] = d[0][b] - d[2][b];
      t[1][b] = d[1][b] + d[2][b];
      t[2][b] = d[2][b] - d[1][b];
      t[3][b] = d[1][b] - d[3][b];
    }
    for (int a = 0; a < 4; ++a) {
      (t[a][0] - t[a][2]).store(dst + (a * 4 + 0) * estride + ci);
      (t[a][1] + t[a][2]).store(dst + (a * 4 + 1) * estride + ci);
      (t[a][2] - t[a][1]).store(dst + (a * 4 + 2) * estride + ci);
      (t[a][1] - t[a][3]).store(dst + (a * 4 + 3) * estride + ci);
    }
  }
}

struct Epilogue {
  const float* bias;          // Cout values in shuffled order, or null
  const float* slope;         // C values (per output channel), or null
  const float* res;           // residual (N, H r, W r, C), channels adjacent, or null
  int64_t rsN, rsH, rsW;      // its strides (a channel slice of a buffer is read in place)
  float* out;                 // NHWC output (N, H r, W r, C), contiguous
  Act act;                    // kPReLU: slope, then + res; kSiLU / kAttention: res is the skip
};

inline V finish(V v, const Epilogue& ep, int64_t co, int64_t c, int64_t res_off) {
  if (ep.bias) v = v + V::loadu(ep.bias + co);
  if (ep.act != Act::kPReLU) return sigmoid_gate(v, ep.res ? ep.res + res_off : nullptr);
  if (ep.slope) {
    const V s = V::loadu(ep.slope + c);
    v = V::blendv(v * s, v, v > V(0.f));
  }
  if (ep.res) v = v + V::loadu(ep.res + res_off);
  return v;
}

// Output transform of tile `tile` from M[e][slot][CW] (channels chunk * CW ...), fused epilogue.
inline void output_tile(const float* __restrict__ m, const Plan& p, int64_t tile, int64_t slot, int64_t chunk,
                        const Epilogue& ep) {
  const int64_t n = tile / (p.TH * p.TW), ty = (tile / p.TW) % p.TH, tx = tile % p.TW;
  const int64_t OH = p.H * p.r, OW = p.W * p.r;
  const bool in_h1 = 2 * ty + 1 < p.H, in_w1 = 2 * tx + 1 < p.W;
  const int64_t estride = kTiles * p.CW;
  const float* src = m + slot * p.CW;
  for (int64_t cc = 0; cc < p.CW; cc += kVS) {
    const int64_t co = chunk * p.CW + cc, s = co / p.C, c = co % p.C, si = s / p.r, sj = s % p.r;
    V mm[4][4];
    for (int e = 0; e < 16; ++e) mm[e / 4][e % 4] = V::loadu(src + e * estride + cc);
    V r0[4], r1[4];
    for (int b = 0; b < 4; ++b) {
      r0[b] = mm[0][b] + mm[1][b] + mm[2][b];
      r1[b] = mm[1][b] - mm[2][b] - mm[3][b];
    }
    const V y[2][2] = {{r0[0] + r0[1] + r0[2], r0[1] - r0[2] - r0[3]},
                       {r1[0] + r1[1] + r1[2], r1[1] - r1[2] - r1[3]}};
    for (int i = 0; i < 2; ++i) {
      if (i == 1 && !in_h1) break;
      const int64_t oh = (2 * ty + i) * p.r + si;
      for (int j = 0; j < 2; ++j) {
        if (j == 1 && !in_w1) break;
        const int64_t ow = (2 * tx + j) * p.r + sj;
        const int64_t off = ((n * OH + oh) * OW + ow) * p.C + c;
        const int64_t res_off = n * ep.rsN + oh * ep.rsH + ow * ep.rsW + c;
        finish(y[i][j], ep, co, c, res_off).store(ep.out + off);
      }
    }
  }
}

template <int NRV>
void gemm_chunk(const float* vt, const float* u, float* m, const Plan& p, int64_t rows) {
  constexpr int MR = mr_for(NRV);
  for (int e = 0; e < 16; ++e) {
    const float* a = vt + e * kTiles * p.Cin;
    const float* b = u + e * p.chunks * p.Cin * p.CW;
    float* c = m + e * kTiles * p.CW;
    for (int64_t t0 = 0; t0 < rows; t0 += MR)
      for (int64_t col = 0; col < p.CW; col += NRV * kVS)
        micro_kernel<MR, NRV>(a + t0 * p.Cin, p.Cin, 1, b + col, p.CW, c + t0 * p.CW + col, p.CW, p.Cin, false);
  }
}

// A thread's scratch of at least n floats, kept for its next calls instead of ~300 KB allocated and
// zero-filled per thread and call (with U's zero-fill, memset was ~3% of the micro-kernel's time in a
// perf profile of training-sized 4x64x12x12 calls). Rows past a block's last tile hold stale values:
// the GEMM rows they feed are never stored.
enum Scratch { kInputTiles, kProducts, kScratchSlots };
float* thread_scratch(Scratch slot, int64_t n) {
  thread_local std::vector<float> buffers[kScratchSlots];
  std::vector<float>& buf = buffers[slot];
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

void run(const float* x, const float* U, const Plan& p, const Epilogue& ep) {
  const int64_t blocks = (p.tiles + kTiles - 1) / kTiles;
  const int nrv = static_cast<int>(std::min<int64_t>(kNRV, p.CW / kVS));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    float* vt = thread_scratch(kInputTiles, 16 * kTiles * p.Cin);
    float* m = thread_scratch(kProducts, 16 * kTiles * p.CW);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t_begin = blk * kTiles, nt = std::min(kTiles, p.tiles - t_begin);
      const int64_t mr = mr_for(nrv), rows = (nt + mr - 1) / mr * mr;
      for (int64_t s = 0; s < nt; ++s) input_tile(x, p, t_begin + s, vt, s, kTiles * p.Cin);
      for (int64_t k = 0; k < p.chunks; ++k) {
        const float* uk = U + k * p.Cin * p.CW;
        switch (nrv) {
          case 4: gemm_chunk<4 <= kNRV ? 4 : 1>(vt, uk, m, p, rows); break;
          case 3: gemm_chunk<3 <= kNRV ? 3 : 1>(vt, uk, m, p, rows); break;
          case 2: gemm_chunk<2>(vt, uk, m, p, rows); break;
          default: gemm_chunk<1>(vt, uk, m, p, rows); break;
        }
        for (int64_t s = 0; s < nt; ++s) output_tile(m, p, t_begin + s, s, k, ep);
      }
    }
  });
}

// The weight gradient (winograd_weight_grad): with Z = A dY A^T the output gradient's 2x2 tile
// carried back through the output transform and V = B^T d B the input tile as in the forward,
// dL/dU[e] = sum over tiles of Z[e] V[e]^T (16 GEMMs per block of tiles, summed), then
// dL/dg = G^T (dL/dU) G.

// Z of output-gradient tile `tile` (zero outside the image) into Zt[e][slot][co], element e at zt + e * estride.
inline void grad_tile(const float* __restrict__ g, const int64_t gs[3], const Plan& p, int64_t tile,
                      float* __restrict__ zt, int64_t slot, int64_t estride) {
  const int64_t n = tile / (p.TH * p.TW), ty = (tile / p.TW) % p.TH, tx = tile % p.TW;
  const float* src[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const int64_t oh = 2 * ty + i, ow = 2 * tx + j;
      src[i][j] = (oh < p.H && ow < p.W) ? g + n * gs[0] + oh * gs[1] + ow * gs[2] : nullptr;
    }
  float* dst = zt + slot * p.Cout;
  for (int64_t co = 0; co < p.Cout; co += kVS) {
    V y[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) y[i][j] = src[i][j] ? V::loadu(src[i][j] + co) : V(0.f);
    V t[4][2];  // A y
    for (int j = 0; j < 2; ++j) {
      t[0][j] = y[0][j];
      t[1][j] = y[0][j] + y[1][j];
      t[2][j] = y[0][j] - y[1][j];
      t[3][j] = V(0.f) - y[1][j];
    }
    for (int a = 0; a < 4; ++a) {  // (A y) A^T
      t[a][0].store(dst + (a * 4 + 0) * estride + co);
      (t[a][0] + t[a][1]).store(dst + (a * 4 + 1) * estride + co);
      (t[a][0] - t[a][1]).store(dst + (a * 4 + 2) * estride + co);
      (V(0.f) - t[a][1]).store(dst + (a * 4 + 3) * estride + co);
    }
  }
}

// M[e] (C_out x C_in) += Zt[e]^T Vt[e] over a block's nt tiles (element e of Zt / Vt bt tiles apart),
// for e = 0..15. Rows MR output channels, columns NRV vectors of input channels.
template <int NRV>
void weight_grad_gemm(const float* zt, const float* vt, float* m, const Plan& p, int64_t nt, int64_t bt) {
  for (int e = 0; e < 16; ++e) {
    const float* a = zt + e * bt * p.Cout;
    const float* b = vt + e * bt * p.Cin;
    float* c = m + e * p.Cout * p.Cin;
    for (int64_t row = 0; row < p.Cout; row += kWeightGradMR)
      for (int64_t col = 0; col < p.Cin; col += NRV * kVS)
        micro_kernel<kWeightGradMR, NRV>(a + row, 1, p.Cout, b + col, p.Cin, c + row * p.Cin + col, p.Cin, nt, true);
  }
}

// out[co][ci] = G^T M[.][co][ci] G (3x3 from the 16 GEMM results), M summed over the `parts`
// partials of contiguous tile ranges (each 16 x C_out x C_in), in fp64 and rounded once, written at
// `out`'s strides os. Input channels innermost, so the arithmetic vectorises.
void weight_grad_output(const float* partial, int64_t parts, const Plan& p, float* out, const int64_t os[4]) {
  const int64_t Cin = p.Cin, Cout = p.Cout, estride = Cout * Cin;
  at::parallel_for(0, Cout, grain_for(16 * Cin * 4 * parts), [&](int64_t begin, int64_t end) {
    std::vector<double> m(16 * Cin), t(4 * 3 * Cin);  // m[e][ci]; t[a][kw][ci] = (M G)[a][kw]
    for (int64_t co = begin; co < end; ++co) {
      for (int e = 0; e < 16; ++e) {
        const float* src = partial + e * estride + co * Cin;
        double* me = m.data() + e * Cin;
        for (int64_t ci = 0; ci < Cin; ++ci) me[ci] = src[ci];
        for (int64_t part = 1; part < parts; ++part)
          for (int64_t ci = 0; ci < Cin; ++ci) me[ci] += src[part * 16 * estride + ci];
      }
      for (int a = 0; a < 4; ++a) {
        const double *m0 = m.data() + a * 4 * Cin, *m1 = m0 + Cin, *m2 = m1 + Cin, *m3 = m2 + Cin;
        double* ta = t.data() + a * 3 * Cin;
        for (int64_t ci = 0; ci < Cin; ++ci) {
          ta[ci] = m0[ci] + 0.5 * (m1[ci] + m2[ci]);
          ta[Cin + ci] = 0.5 * (m1[ci] - m2[ci]);
          ta[2 * Cin + ci] = 0.5 * (m1[ci] + m2[ci]) + m3[ci];
        }
      }
      for (int kw = 0; kw < 3; ++kw)
        for (int64_t ci = 0; ci < Cin; ++ci) {
          const double t0 = t[kw * Cin + ci], t1 = t[(3 + kw) * Cin + ci], t2 = t[(6 + kw) * Cin + ci],
                       t3 = t[(9 + kw) * Cin + ci];
          float* o = out + co * os[0] + ci * os[1] + kw * os[3];
          o[0] = static_cast<float>(t0 + 0.5 * (t1 + t2));
          o[os[2]] = static_cast<float>(0.5 * (t1 - t2));
          o[2 * os[2]] = static_cast<float>(0.5 * (t1 + t2) + t3);
        }
    }
  });
}

}  // namespace

// Channels adjacent in memory (stride 1), rows and pixels at any stride: read in place.
static bool channels_adjacent(const at::Tensor& t) { return t.stride(1) == 1; }

// The shapes and dtypes the kernel handles, whatever the mode.
static bool supported(const at::Tensor& x, const at::Tensor& weight, int64_t shuffle) {
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat || x.dim() != 4 || weight.dim() != 4)
    return false;
  if (weight.size(2) != 3 || weight.size(3) != 3 || weight.size(1) != x.size(1) || shuffle < 1) return false;
  const int64_t cin = x.size(1), cout = weight.size(0), rr = shuffle * shuffle;
  if (cout % rr != 0 || cin % kChannelMultiple != 0 || (cout / rr) % kChannelMultiple != 0 || cin == 0 ||
      cout == 0)
    return false;
  return x.size(0) > 0 && x.size(2) > 0 && x.size(3) > 0;
}

// Whether the mode takes a call the kernel supports, on input x: never (0), always (2), or in "auto"
// from kMinPixels pixels over the batch.
static bool mode_takes(const at::Tensor& x) {
  const int mode = g_mode.load(std::memory_order_relaxed);
  return mode == 2 || (mode == 1 && x.size(0) * x.size(2) * x.size(3) >= kMinPixels);
}

bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, int64_t shuffle) {
  return supported(x, weight, shuffle) && mode_takes(x);
}

at::Tensor winograd_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& slope, const std::optional<at::Tensor>& residual,
                           int64_t shuffle, at::MemoryFormat fmt, Act act) {
  TORCH_CHECK(supported(x, weight, shuffle), "fastsr: winograd does not apply to x ",
              x.sizes(), ", weight ", weight.sizes());
  TORCH_CHECK(act == Act::kPReLU || (shuffle == 1 && !slope), "fastsr: SiLU / attention take no shuffle or slope");
  g_calls.fetch_add(1, std::memory_order_relaxed);
  Plan p;
  p.N = x.size(0), p.Cin = x.size(1), p.H = x.size(2), p.W = x.size(3), p.Cout = weight.size(0), p.r = shuffle;
  p.C = p.Cout / (p.r * p.r);
  p.TH = (p.H + 1) / 2, p.TW = (p.W + 1) / 2, p.tiles = p.N * p.TH * p.TW;
  // Chunks as wide as the register block allows (SPAN's 48 channels: one chunk of 3 AVX-512 vectors,
  // not three of one, which would load a broadcast per FMA).
  p.CW = p.Cout % 64 == 0 ? 64 : p.Cout % 48 == 0 ? 48 : p.Cout % 32 == 0 ? 32 : 16;
  p.chunks = p.Cout / p.CW;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor xin = channels_adjacent(x) ? x : x.contiguous(cl);
  p.xsN = xin.stride(0), p.xsH = xin.stride(2), p.xsW = xin.stride(3);
  const auto U = weight_cache().get(weight, shuffle, [&] { return transform_weights(weight, p); });
  at::Tensor out = at::empty({p.N, p.C, p.H * p.r, p.W * p.r}, x.options(), cl);
  at::Tensor b, s, res;
  if (bias) {
    TORCH_CHECK(bias->numel() == p.Cout, "fastsr: bias must have ", p.Cout, " elements, got ", bias->numel());
    // Shuffled order: b'[s * C + c] = bias[c * r^2 + s].
    b = bias->to(at::kFloat).reshape({p.C, p.r * p.r}).t().contiguous();
  }
  if (slope) s = per_channel_slope(*slope, p.C, at::kFloat);
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes(), "fastsr: residual must have shape ", out.sizes(), ", got ",
                residual->sizes());
    res = residual->to(at::kFloat);
    if (!channels_adjacent(res)) res = res.contiguous(cl);
  }
  Epilogue ep{b.defined() ? b.const_data_ptr<float>() : nullptr, s.defined() ? s.const_data_ptr<float>() : nullptr,
              res.defined() ? res.const_data_ptr<float>() : nullptr, 0, 0, 0, out.mutable_data_ptr<float>(), act};
  if (res.defined()) ep.rsN = res.stride(0), ep.rsH = res.stride(2), ep.rsW = res.stride(3);
  run(xin.const_data_ptr<float>(), U->data(), p, ep);
  return is_channels_last(fmt) ? out : out.contiguous(fmt);
}

bool winograd_weight_grad_supported(const at::Tensor& grad, const at::Tensor& x) {
  if (x.scalar_type() != at::kFloat || grad.scalar_type() != at::kFloat || x.dim() != 4 || grad.dim() != 4)
    return false;
  if (x.size(1) % kChannelMultiple != 0 || grad.size(1) % kChannelMultiple != 0 || x.size(1) == 0 || grad.size(1) == 0)
    return false;
  return grad.size(0) == x.size(0) && grad.size(2) == x.size(2) && grad.size(3) == x.size(3);
}

bool winograd_weight_grad_applies(const at::Tensor& grad, const at::Tensor& x) {
  return winograd_weight_grad_supported(grad, x) && x.numel() > 0 && mode_takes(x);  // no tiles: oneDNN's zeros
}

at::Tensor winograd_weight_grad(const at::Tensor& grad, const at::Tensor& x, at::MemoryFormat fmt) {
  TORCH_CHECK(winograd_weight_grad_applies(grad, x), "fastsr: winograd weight gradient does not apply to grad ",
              grad.sizes(), ", x ", x.sizes());
  g_calls.fetch_add(1, std::memory_order_relaxed);
  Plan p{};
  p.N = x.size(0), p.Cin = x.size(1), p.H = x.size(2), p.W = x.size(3), p.Cout = grad.size(1), p.r = 1, p.C = p.Cout;
  p.TH = (p.H + 1) / 2, p.TW = (p.W + 1) / 2, p.tiles = p.N * p.TH * p.TW;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor xin = channels_adjacent(x) ? x : x.contiguous(cl);
  const at::Tensor gin = channels_adjacent(grad) ? grad : grad.contiguous(cl);
  p.xsN = xin.stride(0), p.xsH = xin.stride(2), p.xsW = xin.stride(3);
  const int64_t gs[3] = {gin.stride(0), gin.stride(2), gin.stride(3)};
  // The tiles are split into `parts` contiguous ranges, each summed into its own partial M: at most
  // one per thread, and at least kMinPartTiles tiles each (a 64-thread machine would otherwise zero
  // and add up 64 partials for a 144-tile conv). A range is done in blocks of at most
  // kWeightGradTiles, transformed into the thread's buffers and at once multiplied, so the transforms
  // stay in cache for the GEMMs (transforming all tiles first wrote 4x the input and the gradient to
  // memory: 2x slower than oneDNN at 16x48x48).
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.tiles / kMinPartTiles));
  const int64_t per_part = (p.tiles + parts - 1) / parts;
  const int64_t blocks_per_part = (per_part + kWeightGradTiles - 1) / kWeightGradTiles;
  const int64_t bt = (per_part + blocks_per_part - 1) / blocks_per_part;
  std::vector<float> partial(parts * 16 * p.Cout * p.Cin, 0.f);
  const float* xp = xin.const_data_ptr<float>();
  const float* gp = gin.const_data_ptr<float>();
  const bool two = p.Cin % (2 * kVS) == 0;
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> vt(16 * bt * p.Cin), zt(16 * bt * p.Cout);
    for (int64_t part = begin; part < end; ++part) {
      float* m = partial.data() + part * 16 * p.Cout * p.Cin;
      const int64_t last = std::min(p.tiles, (part + 1) * per_part);
      for (int64_t t0 = part * per_part; t0 < last; t0 += bt) {
        const int64_t nt = std::min(bt, last - t0);
        for (int64_t s = 0; s < nt; ++s) {
          input_tile(xp, p, t0 + s, vt.data(), s, bt * p.Cin);
          grad_tile(gp, gs, p, t0 + s, zt.data(), s, bt * p.Cout);
        }
        if (two) weight_grad_gemm<2>(zt.data(), vt.data(), m, p, nt, bt);
        else weight_grad_gemm<1>(zt.data(), vt.data(), m, p, nt, bt);
      }
    }
  });
  at::Tensor out = at::empty({p.Cout, p.Cin, 3, 3}, x.options(), fmt);
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  weight_grad_output(partial.data(), parts, p, out.mutable_data_ptr<float>(), os);
  return out;
}

namespace {
int64_t winograd_mode_op(int64_t mode) {
  return mode >= 0 && mode <= 2 ? g_mode.exchange(static_cast<int>(mode)) : g_mode.load();
}
int64_t winograd_calls_op() { return g_calls.load(); }
}  // namespace

}  // namespace fastsr::cpu

// Introspection for tests and benchmarks: _winograd_mode(m) sets the mode (0 off, 1 auto,
// 2 force; -1 only reads it) and returns the previous one; _winograd_calls() counts the
// convolutions and weight gradients the Winograd path has served in this process.
TORCH_LIBRARY_FRAGMENT(fastsr, m) {
  m.def("_winograd_mode(int mode) -> int", &fastsr::cpu::winograd_mode_op);
  m.def("_winograd_calls() -> int", &fastsr::cpu::winograd_calls_op);
}
