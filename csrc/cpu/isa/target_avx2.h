// Switches the rest of the including translation unit to AVX2: include it first, before any
// other header. setup.py has global compiler flags only, so each csrc/cpu/isa/*.cpp copy of a
// kernel turns its instruction set on here: AVX2 with FMA and F16C (fp16 conversion), which every AVX2 CPU that ATen dispatches to has.
#pragma once
#if !defined(__GNUC__) || defined(__clang__)
#error "csrc/cpu/isa relies on GCC's #pragma GCC target"
#endif
#pragma GCC target("avx2,fma,f16c")
// In C++ (unlike C) g++ does not update the feature macros for #pragma GCC target, yet at::vec,
// Sleef and GCC's intrinsic headers choose their code from them: define what those flags would.
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __POPCNT__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
