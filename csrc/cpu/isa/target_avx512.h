// Opens the AVX512 copy of an op's kernels: include it first in csrc/cpu/isa/<op>_avx512.cpp.
// setup.py compiles these translation units, and only them, with the flags of ATen's AVX512
// kernels (-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma) plus -mf16c, so the compiler's own
// feature macros select at::vec's AVX512 code; it then makes every symbol of the linked AVX512
// objects local except the kernels() entry points, so none of their inline functions can stand in
// for another object's.
#pragma once
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__FMA__) || !defined(__F16C__)
#error "compile csrc/cpu/isa/*_avx512.cpp with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c (setup.py does)"
#endif
// GCC's AVX-512 intrinsics initialise placeholder vectors with themselves (__m512i __Y = __Y), which
// -Wuninitialized reports wherever they are inlined. The same kernel code is compiled without them
// in the DEFAULT and AVX2 copies, where the warning still applies.
#pragma GCC diagnostic ignored "-Wuninitialized"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
