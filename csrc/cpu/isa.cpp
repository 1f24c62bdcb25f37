#include "cpu/isa.h"

#include <ATen/Version.h>
#include <torch/library.h>

namespace mtlfast::cpu {
namespace {

Isa detect() {
#if defined(__x86_64__) && !defined(MTLFAST_NO_ISA_COPIES)
  // The enum-valued at::native::get_cpu_capability() is not exported by libtorch; this one is.
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    return Isa::AVX512;
  }
  if (capability == "AVX2") {
    return Isa::AVX2;
  }
#endif
  return Isa::DEFAULT;
}

}  // namespace

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

std::string isa_name() {
  switch (isa()) {
    case Isa::AVX512:
      return "avx512";
    case Isa::AVX2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace mtlfast::cpu

// cpu_isa has no tensor argument to dispatch on, so it is registered for every backend.
TORCH_LIBRARY_IMPL(mtlfast_C, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &mtlfast::cpu::isa_name);
}
