// Kernel schemas of the softmax cross-entropy over the channels of a map; the loss that calls them
// is mtlfast/losses/segmentation.py, the kernels are in csrc/cpu.
//
//   softmax_xent_fwd(x, target, ignore_index) -> (lse, nll): per pixel lse = log sum_c exp(x[c])
//       and nll = lse - x[target], 0 where target == ignore_index.
//   softmax_xent_bwd(x, target, lse, ignore_index, scale) -> grad_x: (exp(x - lse) - onehot(target))
//       * scale at every pixel whose target is not ignore_index, 0 at the others; in x's layout.
// x: (N, C, H, W) float32 or float64, contiguous or channels-last; target: (N, H, W) int64 holding
// ignore_index or ids in [0, C) (the caller checks); lse, nll: (N, H, W) in x's dtype.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mtlfast_C, m) {
  m.def("softmax_xent_fwd(Tensor x, Tensor target, int ignore_index) -> (Tensor, Tensor)");
  m.def("softmax_xent_bwd(Tensor x, Tensor target, Tensor lse, int ignore_index, float scale) -> Tensor");
}
