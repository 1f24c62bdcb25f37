// The instruction set the CPU kernels dispatch to. Each op's arithmetic is compiled once per
// instruction set (csrc/cpu/<op>_default.cpp and csrc/cpu/isa/<op>_{avx2,avx512}.cpp, each in a
// namespace named after it, like ATen's CPU_CAPABILITY); its dispatcher picks the copy for isa().
#pragma once

#include <string>

namespace mtlfast::cpu {

enum class Isa { DEFAULT, AVX2, AVX512 };

// ATen's own choice for its CPU kernels (so ATEN_CPU_CAPABILITY lowers ours too), fixed at first use;
// DEFAULT in a build without the wide copies (MTLFAST_NO_ISA_COPIES).
Isa isa();

// "avx512", "avx2" or "default".
std::string isa_name();

}  // namespace mtlfast::cpu
