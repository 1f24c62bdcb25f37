// Interface between the portable dispatcher (softmax_xent.cpp) and the copies of the softmax
// cross-entropy kernels compiled once per instruction set (softmax_xent_kernel.h). Plain data only.
#pragma once

#include <cstdint>

namespace mtlfast::cpu::softmax_xent {

// N samples of C channels over P pixels: channel c of pixel p of sample n at
// n * C * P + c * P + p (NCHW) or n * C * P + p * C + c (channels-last).
struct Map {
  int64_t N, C, P;
  bool channels_last;
};

// forward:  lse and nll of the pixels [begin, end) of the flattened (N * P) pixels
// backward: grad_x of those pixels (every channel written); scale multiplies every kept pixel's
//           gradient, ignored pixels get 0
using ForwardFn = void (*)(const void* x, const int64_t* target, int64_t ignore, void* lse, void* nll, const Map&,
                           int64_t begin, int64_t end);
using BackwardFn = void (*)(const void* x, const int64_t* target, int64_t ignore, const void* lse, double scale,
                            void* grad_x, const Map&, int64_t begin, int64_t end);

struct DtypeKernels {
  ForwardFn forward;
  BackwardFn backward;
};

struct Kernels {
  DtypeKernels f32, f64;
};

namespace DEFAULT {
Kernels kernels();
}
#if defined(__x86_64__)
namespace AVX2 {
Kernels kernels();
}
namespace AVX512 {
Kernels kernels();
}
#endif

}  // namespace mtlfast::cpu::softmax_xent
