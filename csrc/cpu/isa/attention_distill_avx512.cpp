// AVX512 copy of the attention_distill kernels (see target_avx512.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx512.h"
#include "cpu/attention_distill_kernel.h"
#endif
