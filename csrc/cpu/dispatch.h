// What every op's CPU dispatcher does before its kernels run: pick the copy of the kernels for the
// running instruction set, then the entry for the tensors' dtype. Dispatchers only (it needs ATen);
// the per-ISA kernel copies never include it.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "cpu/isa.h"

namespace mtlfast::cpu {

// The kernel table that make() of the running instruction set's copy returns, made once. Table
// has one member per dtype: f32, f64, f16, bf16.
template <typename Table>
Table for_isa(Table (*portable)(), Table (*avx2)(), Table (*avx512)()) {
  switch (isa()) {
    case Isa::AVX512:
      return avx512();
    case Isa::AVX2:
      return avx2();
    default:
      return portable();
  }
}

// The copies of an op's kernel table, from the function `fn` that each of the namespaces DEFAULT,
// AVX2 and AVX512 (x86-64 only) defines. setup.py defines MTLFAST_NO_ISA_COPIES where it cannot
// build the wide copies sealed off from the rest (not x86-64 Linux, no objcopy).
#if defined(__x86_64__) && !defined(MTLFAST_NO_ISA_COPIES)
#define MTLFAST_ISA_TABLE(fn) ::mtlfast::cpu::for_isa(&DEFAULT::fn, &AVX2::fn, &AVX512::fn)
#else
#define MTLFAST_ISA_TABLE(fn) ::mtlfast::cpu::for_isa(&DEFAULT::fn, &DEFAULT::fn, &DEFAULT::fn)
#endif

template <typename Table>
const auto& for_dtype(const Table& table, const char* op, c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat:
      return table.f32;
    case c10::kDouble:
      return table.f64;
    case c10::kHalf:
      return table.f16;
    case c10::kBFloat16:
      return table.bf16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (expected float32, float64, float16 or bfloat16)");
  }
}

// The same for a table of float32 and float64 entries only (f32, f64).
template <typename Table>
const auto& for_float_dtype(const Table& table, const char* op, c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat:
      return table.f32;
    case c10::kDouble:
      return table.f64;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (expected float32 or float64)");
  }
}

}  // namespace mtlfast::cpu
