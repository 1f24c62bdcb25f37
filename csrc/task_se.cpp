// Kernel schemas of task_se (task-conditioned squeeze-and-excitation, one task per sample); the
// public op is declared in mtlfast/ops/task_se.py, the kernels in csrc/cpu, csrc/cuda. The two
// small per-task linear layers between the passes run in PyTorch.
//
// Layout contract (the Python caller guarantees it): x, residual, grad_out, out, grad_x and
// grad_residual (N,C,H,W) are all contiguous or all channels-last, one dtype; pooled, gate,
// grad_gate and grad_pooled are contiguous (N,C) float32 (float64 for float64 inputs).
// Outputs are preallocated and entirely overwritten.
//   pool:            pooled[n,c] = mean_hw x[n,c]
//   scale:           out = x * gate[n,c] (+ residual), then ReLU if relu
//   backward_gate:   g' = grad_out * (out > 0 if relu else 1), out recomputed from x, gate, residual;
//                    grad_gate[n,c] = sum_hw g' * x;  grad_residual = g' (when given)
//   backward_input:  grad_x = g' * gate[n,c] + grad_pooled[n,c] / (H*W)
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mtlfast_C, m) {
  m.def("task_se_pool(Tensor x, Tensor(a!) pooled) -> ()");
  m.def("task_se_scale(Tensor x, Tensor gate, Tensor? residual, bool relu, Tensor(a!) out) -> ()");
  m.def(
      "task_se_backward_gate(Tensor grad_out, Tensor x, Tensor gate, Tensor? residual, bool relu, "
      "Tensor(a!) grad_gate, Tensor(b!)? grad_residual) -> ()");
  m.def(
      "task_se_backward_input(Tensor grad_out, Tensor x, Tensor gate, Tensor? residual, bool relu, "
      "Tensor grad_pooled, Tensor(a!) grad_x) -> ()");
}
