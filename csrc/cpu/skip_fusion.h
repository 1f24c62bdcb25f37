// Interface between the portable dispatcher (skip_fusion.cpp) and the copies of the kernel compiled
// once per instruction set (skip_fusion_kernel.h). Plain data only, so that the per-ISA objects
// depend on nothing from torch but at::vec and no torch inline function is ever emitted with wide
// instructions only.
#pragma once

#include <cstdint>
#include <type_traits>

// A namespace of its own: other ops' interfaces (attention_distill.h) have their own FwdArgs etc.
namespace mtlfast::cpu::skip_fusion {

// Tables and scratch rows are padded to a multiple of this many elements, so that every ISA's
// kernel reads and writes them in whole steps (two vectors) without tail handling.
constexpr int64_t kPadElems = 64;

inline int64_t padded(int64_t n) {
  return (n + kPadElems - 1) / kPadElems * kPadElems;
}

// Index type of the sampling tables for accumulation type Acc (float, or double for float64
// tensors): at::vec's gather index type, an integer as wide as Acc.
template <typename Acc>
using IndexOf = std::conditional_t<sizeof(Acc) == 8, int64_t, int32_t>;

// Linear resampling along one axis:
//   out[i] = sum_{m < taps} weight[m * stride + i] * in[index[m * stride + i]],  i < len.
// stride = padded(len); the padding has weight 0 and a valid index. index holds IndexOf<Acc>,
// weight holds Acc.
//
// Sizes in a power-of-two ratio make the table periodic away from the clamped ends, which lets the
// kernel use contiguous loads and shuffles instead of gathers. period > 0 says so: for i in
// [lo, hi), the first phase_taps[i % period] taps are index[m][i] = step * (i / period) +
// d[m][i % period] with weight[m][i] depending on i % period only, the others are padding. period
// and step are powers of two, one of them 1, and |floor(d / step)| <= 1.
struct Taps {
  const void* index;
  const void* weight;
  int64_t taps, len, stride;
  int64_t period, step, lo, hi;
  const int64_t* phase_taps;
};

// One layer of the fusion: scores[k] is (N, C, H, W), planes of H * W elements.
struct Layer {
  int64_t H, W;
  Taps rows;          // output row y from source rows (2 taps)
  Taps cols;          // output column x from source columns (2 taps)
  Taps cols_adjoint;  // source column j from output columns (backward only)
  const void* scores;
  void* grad_scores;  // backward only
};

// The work is one item per (n, c) plane: item = n * C + c.
struct Plan {
  const Layer* layers;
  int64_t K, C, H, W;
  const void* weight;  // (K, C)
};

struct FwdArgs {
  Plan plan;
  const void* bias;  // (C,) or nullptr
  void* out;         // (N, C, H, W)
};

// Per-plane partial sums, in the accumulation type, reduced over n by the dispatcher:
// grad_weight_part (N * C, K) holds sum_{y,x} g * bilinear(scores[k]) of each plane,
// grad_bias_part (N * C) sum_{y,x} g (nullptr when the bias gradient is not wanted).
struct BwdArgs {
  Plan plan;
  const void* grad_out;  // (N, C, H, W)
  void* grad_weight_part;
  void* grad_bias_part;
};

// A kernel processes the items [begin, end).
using FwdFn = void (*)(const FwdArgs&, int64_t begin, int64_t end);
using BwdFn = void (*)(const BwdArgs&, int64_t begin, int64_t end);

struct DtypeKernels {
  FwdFn fwd;
  BwdFn bwd;
};

struct IsaKernels {
  DtypeKernels f32, f64, f16, bf16;
};

// Each copy lives in a namespace named after its instruction set, like ATen's CPU_CAPABILITY
// namespaces, so the copies never clash at link time.
namespace DEFAULT {
IsaKernels kernels();
}
#if defined(__x86_64__)
namespace AVX2 {
IsaKernels kernels();
}
namespace AVX512 {
IsaKernels kernels();
}
#endif

}  // namespace mtlfast::cpu::skip_fusion
