// Kernel schemas of task_se (task-conditioned squeeze-and-excitation, one task per sample); the
// public op is declared in mtlfast/ops/task_se.py, the kernels in csrc/cpu, csrc/cuda. The CUDA
// backend implements the four passes over the activations, with the two small per-task linear
// layers between them in PyTorch; the CPU backend implements the whole op, one call each way.
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
// The whole op, the small layers included (weights and their gradients contiguous in the
// accumulation dtype, task int64 (N,) in [0, T)):
//   forward:   pooled and out of the op
//   backward:  grad_x, the four weight gradients and grad_residual (when given) from grad_out
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
  m.def(
      "task_se_forward(Tensor x, Tensor task, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? residual, "
      "bool relu, Tensor(a!) out, Tensor(b!) pooled) -> ()");
  m.def(
      "task_se_backward(Tensor grad_out, Tensor x, Tensor pooled, Tensor task, Tensor w1, Tensor b1, Tensor w2, "
      "Tensor b2, Tensor? residual, bool relu, Tensor(a!) grad_x, Tensor(b!) grad_w1, Tensor(c!) grad_b1, "
      "Tensor(d!) grad_w2, Tensor(e!) grad_b2, Tensor(f!)? grad_residual) -> ()");
}
