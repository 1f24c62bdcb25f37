// AVX512 copy of the skip_fusion kernels (see target_avx512.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx512.h"
#include "cpu/skip_fusion_kernel.h"
#endif
