// AVX512 copy of the max_pool2d kernels (see target_avx512.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx512.h"
#include "cpu/max_pool_kernel.h"
#endif
