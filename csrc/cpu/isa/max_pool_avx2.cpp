// AVX2 copy of the max_pool2d kernels (see target_avx2.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx2.h"
#include "cpu/max_pool_kernel.h"
#endif
