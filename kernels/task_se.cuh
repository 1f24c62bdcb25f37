// Host launchers of the task-conditioned squeeze-and-excitation CUDA kernels (kernels/task_se.cu).
//
// The (N,C,H,W) operands of a call are dense and share one memory order, NCHW (contiguous) or
// NHWC (channels-last); the per-(n, c) operands (gate, pooled, ...) are dense (N,C) float32.
// Null pointers are absent optional operands. Outputs must not alias inputs.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mtlfast::cuda {

// Sizes of a call: batch N, channels C, pixels HW = H*W, and the memory order of the features.
struct SeShape {
  int64_t n = 0;
  int64_t c = 0;
  int64_t hw = 0;
  bool channels_last = false;
};

// pooled[n,c] = mean_hw x[n,c] (NaN when HW == 0, as torch.mean). x: (N,C,H,W); pooled: (N,C).
// scalar_t: float, __half, __nv_bfloat16, here and below.
template <typename scalar_t>
cudaError_t task_se_pool(SeShape shape, const scalar_t* x, float* pooled, cudaStream_t stream);

// out = x * gate[n,c] (+ residual), then ReLU if relu. x, residual, out: (N,C,H,W); gate: (N,C).
template <typename scalar_t>
cudaError_t task_se_scale(SeShape shape, const scalar_t* x, const float* gate, const scalar_t* residual, bool relu,
                          scalar_t* out, cudaStream_t stream);

// g' = grad_out * (out > 0 if relu else 1), out recomputed from x, gate and residual;
// grad_gate[n,c] = sum_hw g' * x; grad_residual = g' when given.
// grad_out, x, residual, grad_residual: (N,C,H,W); gate, grad_gate: (N,C).
template <typename scalar_t>
cudaError_t task_se_backward_gate(SeShape shape, const scalar_t* grad_out, const scalar_t* x, const float* gate,
                                  const scalar_t* residual, bool relu, float* grad_gate, scalar_t* grad_residual,
                                  cudaStream_t stream);

// grad_x = g' * gate[n,c] + grad_pooled[n,c] / HW, g' as in task_se_backward_gate (x is only
// read when relu). grad_out, x, residual, grad_x: (N,C,H,W); gate, grad_pooled: (N,C).
template <typename scalar_t>
cudaError_t task_se_backward_input(SeShape shape, const scalar_t* grad_out, const scalar_t* x, const float* gate,
                                   const scalar_t* residual, bool relu, const float* grad_pooled, scalar_t* grad_x,
                                   cudaStream_t stream);

}  // namespace mtlfast::cuda
