// CUDA backend of mtlfast_C::task_se_{pool,scale,backward_gate,backward_input}: checks the layout
// contract of csrc/task_se.cpp, then runs the launchers of kernels/task_se.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <utility>

#include "common.h"
#include "task_se.cuh"

namespace mtlfast {
namespace {

using namespace cuda::detail;

// The memory order of a call's (N,C,H,W) operands, taken from x: NCHW or NHWC, dense.
at::MemoryFormat feature_format(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "task_se: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4, "task_se: x must be (N, C, H, W), got ", x.sizes());
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "task_se: x must be contiguous (NCHW) or channels-last (NHWC), got sizes ", x.sizes(), " strides ",
              x.strides());
  return at::MemoryFormat::ChannelsLast;
}

void check_feature(const at::Tensor& t, const char* name, const at::Tensor& x, at::MemoryFormat format) {
  check_device_and_dtype("task_se", t, name, x);
  TORCH_CHECK(t.sizes() == x.sizes(), "task_se: ", name, " must have the sizes of x ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(format), "task_se: ", name, " must be ",
              format == at::MemoryFormat::ChannelsLast ? "channels-last" : "contiguous", " like x, got strides ",
              t.strides());
}

void check_per_channel(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "task_se: ", name, " is on ", t.device(), ", expected ", x.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "task_se: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), "task_se: ", name,
              " must be (N, C) = ", x.sizes().slice(0, 2), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "task_se: ", name, " must be contiguous, got strides ", t.strides());
}

const at::Tensor* maybe(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// Checks x and the other (N,C,H,W) operands (null: an absent optional); returns the call's shape.
cuda::SeShape check_features(const at::Tensor& x,
                             std::initializer_list<std::pair<const at::Tensor*, const char*>> others) {
  const at::MemoryFormat format = feature_format(x);
  for (const auto& [t, name] : others) {
    if (t != nullptr) check_feature(*t, name, x, format);
  }
  return {x.size(0), x.size(1), x.size(2) * x.size(3), format == at::MemoryFormat::ChannelsLast};
}

void task_se_pool(const at::Tensor& x, at::Tensor& pooled) {
  const cuda::SeShape shape = check_features(x, {});
  check_per_channel(pooled, "pooled", x);
  if (shape.n * shape.c == 0) return;
  dispatch("task_se", x, [&](auto tag, cudaStream_t stream) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::task_se_pool<T>(shape, const_ptr<T>(x), mut_ptr<float>(pooled), stream));
  });
}

void task_se_scale(const at::Tensor& x, const at::Tensor& gate, const std::optional<at::Tensor>& residual, bool relu,
                   at::Tensor& out) {
  const cuda::SeShape shape = check_features(x, {{maybe(residual), "residual"}, {&out, "out"}});
  check_per_channel(gate, "gate", x);
  if (x.numel() == 0) return;
  dispatch("task_se", x, [&](auto tag, cudaStream_t stream) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::task_se_scale<T>(shape, const_ptr<T>(x), const_ptr<float>(gate), const_ptr<T>(residual),
                                          relu, mut_ptr<T>(out), stream));
  });
}

void task_se_backward_gate(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate,
                           const std::optional<at::Tensor>& residual, bool relu, at::Tensor& grad_gate,
                           const std::optional<at::Tensor>& grad_residual) {
  const cuda::SeShape shape = check_features(
      x, {{&grad_out, "grad_out"}, {maybe(residual), "residual"}, {maybe(grad_residual), "grad_residual"}});
  check_per_channel(gate, "gate", x);
  check_per_channel(grad_gate, "grad_gate", x);
  if (shape.n * shape.c == 0) return;
  dispatch("task_se", x, [&](auto tag, cudaStream_t stream) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::task_se_backward_gate<T>(shape, const_ptr<T>(grad_out), const_ptr<T>(x),
                                                  const_ptr<float>(gate), const_ptr<T>(residual), relu,
                                                  mut_ptr<float>(grad_gate), mut_ptr<T>(grad_residual), stream));
  });
}

void task_se_backward_input(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate,
                            const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& grad_pooled,
                            at::Tensor& grad_x) {
  const cuda::SeShape shape =
      check_features(x, {{&grad_out, "grad_out"}, {maybe(residual), "residual"}, {&grad_x, "grad_x"}});
  check_per_channel(gate, "gate", x);
  check_per_channel(grad_pooled, "grad_pooled", x);
  if (x.numel() == 0) return;
  dispatch("task_se", x, [&](auto tag, cudaStream_t stream) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::task_se_backward_input<T>(shape, const_ptr<T>(grad_out), const_ptr<T>(x),
                                                   const_ptr<float>(gate), const_ptr<T>(residual), relu,
                                                   const_ptr<float>(grad_pooled), mut_ptr<T>(grad_x), stream));
  });
}

}  // namespace
}  // namespace mtlfast

TORCH_LIBRARY_IMPL(mtlfast_C, CUDA, m) {
  m.impl("task_se_pool", &mtlfast::task_se_pool);
  m.impl("task_se_scale", &mtlfast::task_se_scale);
  m.impl("task_se_backward_gate", &mtlfast::task_se_backward_gate);
  m.impl("task_se_backward_input", &mtlfast::task_se_backward_input);
}
