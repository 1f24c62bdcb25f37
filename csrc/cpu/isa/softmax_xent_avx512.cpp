// AVX512 copy of the softmax cross-entropy kernels (see target_avx512.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx512.h"
#include "cpu/softmax_xent_kernel.h"
#endif
