// adam_step_: Adam's update (torch.optim.Adam's arithmetic, L2 weight decay, no amsgrad) for a whole
// list of fp32 CPU parameters in one parallel pass: the training step's optimizer.
//
// Why not torch.optim.Adam(fused=True): its CPU kernel opens one parallel region per tensor, reads
// each step count with item(), and copies every gradient that is not NCHW-contiguous (channels_last
// ones included) into a buffer it never reads: 2.15 ms an update for SRResNet's 126 channels_last
// parameters (1.55 M values) on a 2-core Zen 5, 1.36 ms when they are contiguous. Here every tensor is
// walked in its own memory order (param, grad and both moments share strides and are dense, so element
// i of one is element i of the others), cut into chunks that the threads share.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastsr {
namespace {

using Vec = at::vec::Vectorized<float>;

// Chunks of at most this many values: 64 KB of each of the four arrays, and many chunks for the
// threads to share.
constexpr int64_t kChunk = 16384;

struct Scalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay, eps, step_size, bias_correction2_sqrt;
};

// The same tensor's step count seen by this update (torch.optim.Adam counts each parameter's own).
Scalars scalars_for(double step, double lr, double beta1, double beta2, double eps, double weight_decay) {
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  return {float(beta1), float(beta2), float(1.0 - beta1), float(1.0 - beta2), float(weight_decay), float(eps),
          float(lr / bias_correction1), float(std::sqrt(bias_correction2))};
}

// torch.optim.Adam's single-tensor order of operations, in fp32, on Vec::size() values (n of them
// valid in the last, masked vector of a tensor):
//   g = grad + weight_decay * p;  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2;
//   p -= step_size * m / (sqrt(v) / sqrt(bias_correction2) + eps).
// Every value runs through this one vector code, with the multiply-adds explicit (fmadd): a scalar
// loop for a tensor's last values rounded them differently (FMA contraction) from the same values
// inside a vector, and GCC may vectorise such a loop behind a run-time alias check, which makes the
// choice depend on heap addresses (see batch_norm_prelu_cpu.cpp).
void adam_math(float* p, const float* g, float* m, float* v, int64_t n, const Scalars& s) {
  Vec pv = Vec::loadu(p, n), gv = Vec::loadu(g, n), mv = Vec::loadu(m, n), vv = Vec::loadu(v, n);
  if (s.weight_decay != 0.f) gv = at::vec::fmadd(Vec(s.weight_decay), pv, gv);
  mv = at::vec::fmadd(Vec(s.one_minus_beta1), gv - mv, mv);
  vv = at::vec::fmadd(Vec(s.beta2), vv, Vec(s.one_minus_beta2) * (gv * gv));
  pv = pv - Vec(s.step_size) * mv / (vv.sqrt() / Vec(s.bias_correction2_sqrt) + Vec(s.eps));
  pv.store(p, n), mv.store(m, n), vv.store(v, n);
}

void update(float* p, const float* g, float* m, float* v, int64_t n, const Scalars& s) {
  for (int64_t i = 0; i < n; i += Vec::size())
    adam_math(p + i, g + i, m + i, v + i, std::min<int64_t>(Vec::size(), n - i), s);
}

void check_list(const at::TensorList params, const at::TensorList others, const char* name) {
  TORCH_CHECK(others.size() == params.size(), "fastsr: adam_step_ got ", params.size(), " params but ",
              others.size(), " ", name);
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor &p = params[t], &o = others[t];
    TORCH_CHECK(o.device().is_cpu() && o.scalar_type() == at::kFloat, "fastsr: adam_step_ takes fp32 CPU ", name);
    TORCH_CHECK(o.sizes() == p.sizes() && o.strides() == p.strides(), "fastsr: adam_step_ needs ", name,
                " with their parameter's shape and strides (tensor ", t, ")");
  }
}

// Adds 1 to a parameter's step count (a CPU scalar tensor, fp32 as torch.optim.Adam keeps it, or fp64)
// and returns it. Written directly: an add_ and an item() each would cost ~2 us a parameter.
double count_step(const at::Tensor& step) {
  TORCH_CHECK(step.numel() == 1 && step.device().is_cpu(), "fastsr: adam_step_ needs CPU scalar step counts");
  if (step.scalar_type() == at::kDouble) return *step.data_ptr<double>() += 1.0;
  TORCH_CHECK(step.scalar_type() == at::kFloat, "fastsr: adam_step_ needs fp32 or fp64 step counts");
  return *step.data_ptr<float>() += 1.0f;
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                   double eps, double weight_decay) {
  for (const at::Tensor& p : params)
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_non_overlapping_and_dense(),
                "fastsr: adam_step_ takes dense fp32 CPU parameters");
  check_list(params, grads, "grads");
  check_list(params, exp_avgs, "exp_avgs");
  check_list(params, exp_avg_sqs, "exp_avg_sqs");
  TORCH_CHECK(steps.size() == params.size(), "fastsr: adam_step_ needs one step count per parameter");
  std::vector<Scalars> coeffs;
  struct Chunk { int64_t tensor, begin, end; };
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < params.size(); ++t) {
    coeffs.push_back(scalars_for(count_step(steps[t]), lr, beta1, beta2, eps, weight_decay));
    for (int64_t b = 0; b < params[t].numel(); b += kChunk)
      chunks.push_back({int64_t(t), b, std::min(b + kChunk, params[t].numel())});
  }
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& k = chunks[c];
      const int64_t n = k.end - k.begin;
      update(params[k.tensor].data_ptr<float>() + k.begin, grads[k.tensor].const_data_ptr<float>() + k.begin,
             exp_avgs[k.tensor].data_ptr<float>() + k.begin, exp_avg_sqs[k.tensor].data_ptr<float>() + k.begin, n,
             coeffs[k.tensor]);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsr, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace fastsr
