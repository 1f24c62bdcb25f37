// AVX2 copy of the attention_distill kernels (see target_avx2.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx2.h"
#include "cpu/attention_distill_kernel.h"
#endif
