// AVX512 copy of the batch-norm kernels (see target_avx512.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx512.h"
#include "cpu/batch_norm_kernel.h"
#endif
