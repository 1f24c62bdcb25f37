// AVX2 copy of the softmax cross-entropy kernels (see target_avx2.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx2.h"
#include "cpu/softmax_xent_kernel.h"
#endif
