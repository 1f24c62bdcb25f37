// Interface between the portable dispatcher (max_pool.cpp) and the copies of the max-pooling
// kernels compiled once per instruction set (max_pool_kernel.h). Plain data only.
#pragma once

#include <cstdint>

namespace mtlfast::cpu::max_pool {

// `planes` contiguous (H, W) input planes pooled into (OH, OW) output planes: output (oy, ox) is the
// window of rows oy * sh - ph + [0, kh) and columns ox * sw - pw + [0, kw), clipped to the plane.
struct Pool {
  int64_t H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw;
};

// forward:  out and offsets (ky * kw + kx of each output's maximum) of the planes [begin, end)
// backward: grad_x of the planes [begin, end) = each grad_out added at its offset's input pixel
//           (grad_x's planes are overwritten); returns false if an offset lies outside its window
//           or the plane (offsets not made by forward), having skipped it
using ForwardFn = void (*)(const void* x, void* out, std::uint8_t* offsets, const Pool&, int64_t begin, int64_t end);
using BackwardFn = bool (*)(const void* grad_out, const std::uint8_t* offsets, void* grad_x, const Pool&, int64_t begin,
                            int64_t end);

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

}  // namespace mtlfast::cpu::max_pool
