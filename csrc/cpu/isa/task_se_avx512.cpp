// AVX512 copy of the task_se kernels (see target_avx512.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx512.h"
#include "cpu/task_se_kernel.h"
#endif
