// The portable copy of the kernels: baseline compiler flags and at::vec's DEFAULT implementation.
// It is a portable object (linked before csrc/cpu/isa), like the dispatcher.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/skip_fusion_kernel.h"
