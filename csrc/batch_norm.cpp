// Kernel schemas of batch_norm's training mode (batch statistics) on CPU; the public op is declared
// in mtlfast/ops/batch_norm.py, the kernels in csrc/cpu.
//
//   batch_norm_train(x, weight, bias, eps) -> (out, mean, invstd, var): per channel c over the
//       N * H * W values, mean and biased variance var, invstd = 1 / sqrt(var + eps),
//       out = (x - mean) * invstd * weight + bias (weight, bias: None for 1 and 0)
//   batch_norm_train_backward(grad_out, x, weight, mean, invstd) -> (grad_x, grad_weight,
//       grad_bias): their gradients through the batch statistics (grad_weight and grad_bias also
//       without weight and bias: the gradients of a weight of 1 and a bias of 0)
// x, grad_out: (N, C, H, W), NCHW- or channels-last-contiguous (others are copied), float32 or
// float64; statistics and parameters (C,) in x's dtype.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mtlfast_C, m) {
  m.def("batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_train_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor invstd) -> "
      "(Tensor, Tensor, Tensor)");
}
