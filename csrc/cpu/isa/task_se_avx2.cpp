// AVX2 copy of the task_se kernels (see target_avx2.h).
#if defined(__x86_64__)
#include "cpu/isa/target_avx2.h"
#include "cpu/task_se_kernel.h"
#endif
