// CUDA backend of mtlfast_C::skip_fusion_{fwd,bwd}: checks the layout contract of
// csrc/skip_fusion.cpp, then runs the launchers of kernels/skip_fusion.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "skip_fusion.cuh"

namespace mtlfast {
namespace {

using namespace cuda::detail;

void check_tensor(const at::Tensor& t, const std::string& name, at::IntArrayRef sizes, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "skip_fusion: ", name, " must be a CUDA tensor");
  check_device_and_dtype("skip_fusion", t, name, ref);
  TORCH_CHECK(t.sizes() == sizes, "skip_fusion: ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "skip_fusion: ", name, " must be contiguous, got strides ", t.strides());
}

// Checks the scores against each other and returns the call's shape for output size (h, w).
cuda::SkipFusionShape check_scores(at::TensorList scores, int64_t h, int64_t w) {
  const int64_t k = int64_t(scores.size());
  TORCH_CHECK(k >= 1 && k <= cuda::kSkipFusionMaxLayers, "skip_fusion (CUDA): takes 1 to ",
              cuda::kSkipFusionMaxLayers, " layers of scores, got ", k);
  const at::Tensor& first = scores[0];
  TORCH_CHECK(first.dim() == 4, "skip_fusion: scores[0] must be (N, C, H_k, W_k), got ", first.sizes());
  cuda::SkipFusionShape shape;
  shape.n = first.size(0);
  shape.c = first.size(1);
  shape.h = h;
  shape.w = w;
  shape.k = int(k);
  TORCH_CHECK(h * w <= INT_MAX, "skip_fusion (CUDA): output size (", h, ", ", w, ") must have H*W < 2^31");
  for (int64_t i = 0; i < k; ++i) {
    const at::Tensor& s = scores[i];
    const std::string name = "scores[" + std::to_string(i) + "]";
    TORCH_CHECK(s.dim() == 4, "skip_fusion: ", name, " must be (N, C, H_k, W_k), got ", s.sizes());
    check_tensor(s, name, {shape.n, shape.c, s.size(2), s.size(3)}, first);
    TORCH_CHECK(s.size(2) >= 1 && s.size(3) >= 1 && s.size(2) * s.size(3) <= INT_MAX, "skip_fusion (CUDA): ",
                name, " must have 1 <= H_k*W_k < 2^31, got ", s.sizes());
    shape.layer_h[i] = s.size(2);
    shape.layer_w[i] = s.size(3);
  }
  return shape;
}

template <typename T>
std::vector<const T*> const_ptrs(at::TensorList ts) {
  std::vector<const T*> ptrs;
  for (const at::Tensor& t : ts) ptrs.push_back(const_ptr<T>(t));
  return ptrs;
}

void skip_fusion_fwd(at::TensorList scores, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 4, "skip_fusion: out must be (N, C, H, W), got ", out.sizes());
  const cuda::SkipFusionShape shape = check_scores(scores, out.size(2), out.size(3));
  const at::Tensor& ref = scores[0];
  check_tensor(out, "out", {shape.n, shape.c, shape.h, shape.w}, ref);
  check_tensor(weight, "weight", {shape.k, shape.c}, ref);
  if (bias) check_tensor(*bias, "bias", {shape.c}, ref);
  if (out.numel() == 0) return;
  dispatch("skip_fusion", ref, [&](auto tag, cudaStream_t stream) {
    using T = decltype(tag);
    const std::vector<const T*> score_ptrs = const_ptrs<T>(scores);
    C10_CUDA_CHECK(cuda::skip_fusion_fwd<T>(shape, score_ptrs.data(), const_ptr<T>(weight),
                                            const_ptr<T>(bias), mut_ptr<T>(out), stream));
  });
}

void skip_fusion_bwd(const at::Tensor& grad_out, at::TensorList scores, const at::Tensor& weight,
                     at::TensorList grad_scores, at::Tensor& grad_weight,
                     const std::optional<at::Tensor>& grad_bias) {
  TORCH_CHECK(grad_out.dim() == 4, "skip_fusion: grad_out must be (N, C, H, W), got ", grad_out.sizes());
  const cuda::SkipFusionShape shape = check_scores(scores, grad_out.size(2), grad_out.size(3));
  const at::Tensor& ref = scores[0];
  check_tensor(grad_out, "grad_out", {shape.n, shape.c, shape.h, shape.w}, ref);
  check_tensor(weight, "weight", {shape.k, shape.c}, ref);
  TORCH_CHECK(int64_t(grad_scores.size()) == shape.k, "skip_fusion: grad_scores must hold ", shape.k,
              " tensors, one per layer, got ", grad_scores.size());
  for (int i = 0; i < shape.k; ++i) {
    check_tensor(grad_scores[i], "grad_scores[" + std::to_string(i) + "]", scores[i].sizes(), ref);
  }
  check_tensor(grad_weight, "grad_weight", {shape.k, shape.c}, ref);
  if (grad_bias) check_tensor(*grad_bias, "grad_bias", {shape.c}, ref);
  dispatch("skip_fusion", ref, [&](auto tag, cudaStream_t stream) {
    using T = decltype(tag);
    // Reduced-precision gradients accumulate in float scratch, cast into them at the end.
    const int64_t n_floats = cuda::skip_fusion_bwd_workspace<T>(shape, grad_bias.has_value());
    const at::Tensor workspace = at::empty({n_floats}, ref.options().dtype(at::kFloat));
    const std::vector<const T*> score_ptrs = const_ptrs<T>(scores);
    std::vector<T*> grad_ptrs;
    for (const at::Tensor& g : grad_scores) grad_ptrs.push_back(mut_ptr<T>(g));
    C10_CUDA_CHECK(cuda::skip_fusion_bwd<T>(shape, const_ptr<T>(grad_out), score_ptrs.data(), const_ptr<T>(weight),
                                            grad_ptrs.data(), mut_ptr<T>(grad_weight), mut_ptr<T>(grad_bias),
                                            n_floats ? mut_ptr<float>(workspace) : nullptr, stream));
  });
}

}  // namespace
}  // namespace mtlfast

TORCH_LIBRARY_IMPL(mtlfast_C, CUDA, m) {
  m.impl("skip_fusion_fwd", &mtlfast::skip_fusion_fwd);
  m.impl("skip_fusion_bwd", &mtlfast::skip_fusion_bwd);
}
