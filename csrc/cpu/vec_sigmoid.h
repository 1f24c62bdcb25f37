// A vectorised sigmoid shared by the kernel copies of every op. Included by the per-ISA kernel
// headers after at::vec, with CPU_CAPABILITY defined, so each instruction set gets its own copy.
#pragma once

#include <cmath>

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) before including vec_sigmoid.h"
#endif

namespace mtlfast::cpu::CPU_CAPABILITY {

// exp_u20 (a short polynomial, about 20 ulp) keeps sigmoid within 5e-7 relative of torch.sigmoid
// at a fraction of Sleef's cost; fexp_u20 is cheaper still but 1e-5 off. It clamps its input, which
// turns NaN into a finite value, so NaN logits are passed through explicitly, as torch.sigmoid does.
inline at::vec::Vectorized<float> sigmoid(const at::vec::Vectorized<float>& x) {
  const at::vec::Vectorized<float> one(1.f);
  const at::vec::Vectorized<float> sig = one / (one + x.neg().exp_u20());
  return at::vec::Vectorized<float>::blendv(sig, x, x.isnan());
}

// double only serves gradcheck, so exactness matters more than speed here.
inline at::vec::Vectorized<double> sigmoid(const at::vec::Vectorized<double>& x) {
  const at::vec::Vectorized<double> one(1.);
  return one / (one + x.neg().map(std::exp));
}

}  // namespace mtlfast::cpu::CPU_CAPABILITY
