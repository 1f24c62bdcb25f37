// Interface between the portable dispatcher (batch_norm.cpp) and the copies of the batch-norm
// kernels compiled once per instruction set (batch_norm_kernel.h). Plain data only.
#pragma once

#include <cstdint>

namespace mtlfast::cpu::batch_norm {

// N images of C channels of P pixels; NCHW: x[(n * C + c) * P + p]; channels-last: x[(n * P + p) *
// C + c]. Rows: the N * P pixels of channels-last data as one index r = n * P + p.
struct Shape {
  int64_t N, C, P;
};

// NCHW, channels [begin, end), each channel whole:
//   stats_nchw: mean[c], var[c] (biased) in double
//   affine_nchw: out = (x - mean[c]) * scale[c] + shift[c]
//   grad_sums_nchw: sum_g[c] = sum of g, sum_gx[c] = sum of g * (x - mean[c])
//   grad_x_nchw: gx = g * a[c] + (x - mean[c]) * b[c] + d[c]
// Channels-last, rows [begin, end), every channel, two sums per channel added into acc (2C
// doubles), which the caller gives each chunk of rows and adds up:
//   moments_cl: acc[c] += sum of d, acc[C + c] += sum of d^2, d = x - pivot[c] (one pass: the
//               pivot, a value of the channel, keeps the variance's cancellation small)
//   grad_sums_cl: acc[c] += sum of g, acc[C + c] += sum of g * (x - mean[c])
//   affine_cl, grad_x_cl: as the NCHW ones over the rows
struct DtypeKernels {
  void (*stats_nchw)(const void* x, const Shape&, double* mean, double* var, int64_t begin, int64_t end);
  void (*affine_nchw)(const void* x, const double* mean, const double* scale, const double* shift, void* out,
                      const Shape&, int64_t begin, int64_t end);
  void (*grad_sums_nchw)(const void* g, const void* x, const double* mean, double* sum_g, double* sum_gx, const Shape&,
                         int64_t begin, int64_t end);
  void (*grad_x_nchw)(const void* g, const void* x, const double* mean, const double* a, const double* b,
                      const double* d, void* gx, const Shape&, int64_t begin, int64_t end);
  void (*moments_cl)(const void* x, const double* pivot, double* acc, const Shape&, int64_t begin, int64_t end);
  void (*affine_cl)(const void* x, const double* mean, const double* scale, const double* shift, void* out,
                    const Shape&, int64_t begin, int64_t end);
  void (*grad_sums_cl)(const void* g, const void* x, const double* mean, double* acc, const Shape&, int64_t begin,
                       int64_t end);
  void (*grad_x_cl)(const void* g, const void* x, const double* mean, const double* a, const double* b,
                    const double* d, void* gx, const Shape&, int64_t begin, int64_t end);
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

}  // namespace mtlfast::cpu::batch_norm
