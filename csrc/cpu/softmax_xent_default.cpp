// The portable copy of the kernels: at::vec's DEFAULT implementation, compiled with the baseline
// flags like the dispatcher (setup.py gives only csrc/cpu/isa/*.cpp the wider -m flags).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/softmax_xent_kernel.h"
