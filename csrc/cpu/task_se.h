// Interface between the portable dispatcher (task_se.cpp) and the copies of the task_se kernels
// compiled once per instruction set (task_se_kernel.h). Plain data only, so that the per-ISA
// objects depend on nothing from torch but at::vec and no torch inline function is ever emitted
// with wide instructions only.
#pragma once

#include <cstdint>

namespace mtlfast::cpu::task_se {

// How the (N, C, H, W) tensors of a call are cut into work items, which the threads share out.
// NCHW: item (n * C + c) * chunks + k covers pixels [k * chunk, (k + 1) * chunk) of plane (n, c).
// NHWC: item n * chunks + k covers rows [k * chunk, (k + 1) * chunk) of sample n, a row being the
// C channels of one pixel. Ranges end at HW. The cut depends on the shape only, never on the
// number of threads, so that sums come out bit-identical however many threads run.
struct Work {
  int64_t N, C, HW;
  bool channels_last;
  int64_t chunk, chunks;
};

// One pass. x, residual, grad_out and out have x's dtype T; gate and grad_pooled (N, C) and
// partials have its accumulation type Acc (float, or double for T = double). partials is laid out
// (N, C, chunks) for NCHW, (N, chunks, C) for NHWC: indexed by item, like the work.
struct Args {
  Work work;
  const void* x;
  const void* residual;  // null: no residual
  const void* grad_out;
  const void* gate;
  const void* grad_pooled;
  void* out;       // what the pass writes elementwise (out, grad_residual, grad_x); may be null
  void* partials;  // a reducing pass writes each item's sums here ...
  double divisor;  // ... divided by this; backward_input divides grad_pooled by it
  bool relu;
  bool stream;  // write out with non-temporal stores
};

// sums (N, C) = (sum over the chunks of partials) / divisor, for the sums [begin, end) of N * C.
struct Combine {
  int64_t C, chunks;
  bool channels_last;
  const void* partials;
  void* sums;
  double divisor;
};

// The per-task linear layers between the passes, for N samples (the pointers start at the first),
// all in Acc:
//   hidden[n] = relu(w1[t] @ pooled[n] + b1[t]),  gate[n] = sigmoid(w2[t] @ hidden[n] + b2[t]),
// t = task[n]. Weights are contiguous: w1 (T, R, C), b1 (T, R), w2 (T, C, R), b2 (T, C).
struct Mlp {
  int64_t N, C, R;
  const int64_t* task;
  const void* w1;
  const void* b1;
  const void* w2;
  const void* b2;
  const void* pooled;  // (N, C)
  void* hidden;        // (N, R)
  void* gate;          // (N, C)
  // The backward's, from grad_gate (N, C): the gradients at the excite and squeeze layers'
  // pre-activations dz (N, C) and dh (N, R), at the pooled means, and at the weights (shaped like
  // them, zeroed by the caller and added to).
  const void* grad_gate;
  void* dz;
  void* dh;
  void* grad_pooled;
  void* grad_w1;
  void* grad_b1;
  void* grad_w2;
  void* grad_b2;
};

// A pass processes the items [begin, end). The Mlp steps: squeeze the rows [begin, end) of
// hidden's R, excite those of gate's C; backward_sample the samples [begin, end) (dz, dh and
// grad_pooled); grad_excite the rows [begin, end) of C of grad_w2 and grad_b2, grad_squeeze those
// of R of grad_w1 and grad_b1, each a sum over all N samples.
using PassFn = void (*)(const Args&, int64_t begin, int64_t end);
using CombineFn = void (*)(const Combine&, int64_t begin, int64_t end);
using MlpFn = void (*)(const Mlp&, int64_t begin, int64_t end);

struct MlpKernels {
  MlpFn squeeze, excite, backward_sample, grad_excite, grad_squeeze;
};

struct DtypeKernels {
  PassFn pool, scale, backward_gate, backward_input;
  CombineFn combine;
  MlpKernels mlp;  // in the accumulation type
};

struct Kernels {
  DtypeKernels f32, f64, f16, bf16;
};

// Each copy lives in a namespace named after its instruction set, like ATen's CPU_CAPABILITY
// namespaces, so the copies never clash at link time.
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

}  // namespace mtlfast::cpu::task_se
