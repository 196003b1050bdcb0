// at::vec helpers shared by the CPU kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace fastsr::cpu {

// Load once, use many times: left alone, GCC folds a vector load into each FMA that uses it,
// which makes register-blocked loops bound by load ports instead of FMA units (conv_cpu.cpp's
// tail kernel: 27 loads per 24 FMAs at P = 8, CO = 3). The empty asm keeps the value in a register.
inline at::vec::Vectorized<float> in_register(at::vec::Vectorized<float> v) {
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  asm("" : "+v"(r));
  return at::vec::Vectorized<float>(r);
#elif defined(__GNUC__) && defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  asm("" : "+x"(r));
  return at::vec::Vectorized<float>(r);
#else
  return v;
#endif
}

// conv2d_silu's activation on a vector: SiLU y * sigmoid(y), or with a skip SPAN's attention
// (y + skip) * (sigmoid(y) - 0.5). exp() is Sleef's 1-ulp one; exp(-y) = inf gives sigmoid 0.
inline at::vec::Vectorized<float> sigmoid_gate(at::vec::Vectorized<float> y, const float* skip) {
  using V = at::vec::Vectorized<float>;
  const V one(1.f);
  const V sig = one / (one + y.neg().exp());
  return skip ? (y + V::loadu(skip)) * (sig - V(0.5f)) : y * sig;
}

// The same in scalar form (fp64, and the accumulation of fp16/bf16).
template <typename A>
inline A sigmoid_gate(A y, const A* skip) {
  const A sig = A(1) / (A(1) + std::exp(-y));
  return skip ? (y + *skip) * (sig - A(0.5)) : y * sig;
}

}  // namespace fastsr::cpu
