// AVX512 copy of the winograd_conv transforms (see target_avx512.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx512.h"
#include "cpu/winograd_conv_kernel.h"
#endif
