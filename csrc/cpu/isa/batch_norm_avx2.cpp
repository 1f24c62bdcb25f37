// AVX2 copy of the batch-norm kernels (see target_avx2.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx2.h"
#include "cpu/batch_norm_kernel.h"
#endif
