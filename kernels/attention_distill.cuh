// Host launchers of the MTI-Net attention-distillation CUDA kernels (kernels/attention_distill.cu).
//
// Every tensor's trailing (C, H, W) block is a dense run of P = C*H*W elements laid out the same
// way in all tensors of a call; the kernels address it as base + n*stride.n + t*stride.t
// (+ s*stride.s) + [0, P). Strides are in elements. Outputs must not alias inputs.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mtlfast::cuda {

// Element strides of one tensor over the batch (n), task (t) and source (s) dimensions.
struct OuterStrides {
  int64_t n = 0;
  int64_t t = 0;
  int64_t s = 0;
};

// Sizes of a call: batch N, tasks T, sources per task S, inner block P = C*H*W.
struct DistillShape {
  int64_t n = 0;
  int64_t t = 0;
  int64_t s = 0;
  int64_t p = 0;
};

// out[n,t] = feats[n,t] + sum_s sigmoid(mask_logits[n,t,s]) * messages[n,t,s].
// feats, out: (N,T,P); mask_logits, messages: (N,T,S,P). scalar_t: float, __half, __nv_bfloat16.
template <typename scalar_t>
cudaError_t attention_distill_fwd(DistillShape shape, const scalar_t* feats, OuterStrides feats_strides,
                                  const scalar_t* mask_logits, OuterStrides mask_strides,
                                  const scalar_t* messages, OuterStrides messages_strides, scalar_t* out,
                                  OuterStrides out_strides, cudaStream_t stream);

// grad_messages = g * sig, grad_mask_logits = g * messages * sig * (1 - sig), sig recomputed.
// grad_out: (N,T,P); mask_logits, messages, grad_mask_logits, grad_messages: (N,T,S,P).
template <typename scalar_t>
cudaError_t attention_distill_bwd(DistillShape shape, const scalar_t* grad_out, OuterStrides grad_out_strides,
                                  const scalar_t* mask_logits, OuterStrides mask_strides,
                                  const scalar_t* messages, OuterStrides messages_strides,
                                  scalar_t* grad_mask_logits, OuterStrides grad_mask_strides,
                                  scalar_t* grad_messages, OuterStrides grad_messages_strides,
                                  cudaStream_t stream);

}  // namespace mtlfast::cuda
