// CUDA backend of mtlfast_C::skip_fusion_{fwd,bwd}: checks the layout contract of
// csrc/skip_fusion.cpp, then runs the launchers of kernels/skip_fusion.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <string>
#include <vector>

#include "skip_fusion.cuh"

namespace mtlfast {
namespace {

// Runs fn(T{}) with T the CUDA element type of dtype.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kHalf:
      return fn(__half{});
    case at::kBFloat16:
      return fn(__nv_bfloat16{});
    default:
      TORCH_CHECK(false, "skip_fusion (CUDA): unsupported dtype ", dtype, "; expected float32, float16 or bfloat16");
  }
}

void check_tensor(const at::Tensor& t, const std::string& name, at::IntArrayRef sizes, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "skip_fusion: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "skip_fusion: ", name, " is on ", t.device(), ", expected ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "skip_fusion: ", name, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
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
const T* const_ptr(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
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
  const c10::cuda::CUDAGuard guard(ref.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(ref.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const std::vector<const T*> score_ptrs = const_ptrs<T>(scores);
    C10_CUDA_CHECK(cuda::skip_fusion_fwd<T>(shape, score_ptrs.data(), const_ptr<T>(weight),
                                            bias ? const_ptr<T>(*bias) : nullptr, mut_ptr<T>(out), stream));
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
  const c10::cuda::CUDAGuard guard(ref.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(ref.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // Reduced-precision gradients accumulate in float scratch, cast into them at the end.
    const int64_t n_floats = cuda::skip_fusion_bwd_workspace<T>(shape, grad_bias.has_value());
    const at::Tensor workspace = at::empty({n_floats}, ref.options().dtype(at::kFloat));
    const std::vector<const T*> score_ptrs = const_ptrs<T>(scores);
    std::vector<T*> grad_ptrs;
    for (const at::Tensor& g : grad_scores) grad_ptrs.push_back(mut_ptr<T>(g));
    C10_CUDA_CHECK(cuda::skip_fusion_bwd<T>(shape, const_ptr<T>(grad_out), score_ptrs.data(), const_ptr<T>(weight),
                                            grad_ptrs.data(), mut_ptr<T>(grad_weight),
                                            grad_bias ? mut_ptr<T>(*grad_bias) : nullptr,
                                            n_floats ? mut_ptr<float>(workspace) : nullptr, stream));
  });
}

}  // namespace
}  // namespace mtlfast

TORCH_LIBRARY_IMPL(mtlfast_C, CUDA, m) {
  m.impl("skip_fusion_fwd", &mtlfast::skip_fusion_fwd);
  m.impl("skip_fusion_bwd", &mtlfast::skip_fusion_bwd);
}
