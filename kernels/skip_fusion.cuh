// Host launchers of UberNet's skip-layer score fusion CUDA kernels (kernels/skip_fusion.cu).
//
// scores[k]: (N, C, H_k, W_k); weight (K, C); bias (C,); out and grad_out: (N, C, H, W); every
// tensor contiguous, one element type. Outputs must not alias inputs and are entirely overwritten.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mtlfast::cuda {

// Most layers one call takes: their pointers and sizes travel by value in the kernel parameters.
constexpr int kSkipFusionMaxLayers = 16;

// Sizes of a call: batch N, channels C, output (H, W) and the first k layers' (H_k, W_k).
// Every size is at least 1 and H*W, H_k*W_k fit in an int.
struct SkipFusionShape {
  int64_t n = 0;
  int64_t c = 0;
  int64_t h = 0;
  int64_t w = 0;
  int k = 0;
  int64_t layer_h[kSkipFusionMaxLayers] = {};
  int64_t layer_w[kSkipFusionMaxLayers] = {};
};

// out = bias + sum_k weight[k] * bilinear(scores[k], (H, W)), bilinear being aten's
// align_corners=False resize. scores: k pointers; bias may be null. scalar_t: float, __half,
// __nv_bfloat16.
template <typename scalar_t>
cudaError_t skip_fusion_fwd(const SkipFusionShape& shape, const scalar_t* const* scores, const scalar_t* weight,
                            const scalar_t* bias, scalar_t* out, cudaStream_t stream);

// Floats of scratch memory skip_fusion_bwd needs: none for float, every gradient otherwise.
template <typename scalar_t>
int64_t skip_fusion_bwd_workspace(const SkipFusionShape& shape, bool with_grad_bias);

// grad_scores[k] = weight[k] * adjoint of the bilinear resize applied to grad_out,
// grad_weight[k, c] = sum over n, y, x of grad_out * bilinear(scores[k]), grad_bias = sum of grad_out.
// grad_bias may be null. workspace: skip_fusion_bwd_workspace floats, or null when that is 0.
template <typename scalar_t>
cudaError_t skip_fusion_bwd(const SkipFusionShape& shape, const scalar_t* grad_out, const scalar_t* const* scores,
                            const scalar_t* weight, scalar_t* const* grad_scores, scalar_t* grad_weight,
                            scalar_t* grad_bias, float* workspace, cudaStream_t stream);

}  // namespace mtlfast::cuda
