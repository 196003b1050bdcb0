// at::vec helpers shared by the CPU kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>

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

}  // namespace fastsr::cpu
