// Opens the AVX2 copy of an op's kernels: include it first in csrc/cpu/isa/<op>_avx2.cpp. setup.py
// compiles these translation units, and only them, with -mavx2 -mfma -mf16c, so the compiler's own
// feature macros select at::vec's AVX2 code; it then makes every symbol of the linked AVX2 objects
// local except the kernels() entry points, so none of their inline functions can stand in for
// another object's.
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "compile csrc/cpu/isa/*_avx2.cpp with -mavx2 -mfma -mf16c (setup.py does)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
