// Kernel schemas of skip_fusion (UberNet's online skip-layer score accumulation); the public op
// is declared in mtlfast/ops/skip_fusion.py, the kernels in csrc/cpu, csrc/cuda.
//
// Layout contract (the Python caller guarantees it): every tensor contiguous; scores[k] (N,C,H_k,W_k),
// weight (K,C), bias (C,), out and grad_out (N,C,H,W), one dtype. Outputs are preallocated and
// entirely overwritten by the kernel.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mtlfast_C, m) {
  m.def("skip_fusion_fwd(Tensor[] scores, Tensor weight, Tensor? bias, Tensor(a!) out) -> ()");
  m.def(
      "skip_fusion_bwd(Tensor grad_out, Tensor[] scores, Tensor weight, Tensor(a!)[] grad_scores, "
      "Tensor(b!) grad_weight, Tensor(c!)? grad_bias) -> ()");
}
