// ATen-side helpers the CUDA launchers of csrc/cuda share: operand checks, typed data pointers,
// and the dispatch of a call onto a kernel element type and the current stream.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <optional>
#include <string_view>

namespace mtlfast::cuda::detail {

// t is on ref's device and has ref's dtype; errors name the op and the operand.
inline void check_device_and_dtype(std::string_view op, const at::Tensor& t, std::string_view name,
                                   const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              ref.scalar_type());
}

// Data pointers as kernel element types; null for an absent optional operand.
template <typename T>
const T* const_ptr(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
const T* const_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? const_ptr<T>(*t) : nullptr;
}

template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

template <typename T>
T* mut_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? mut_ptr<T>(*t) : nullptr;
}

// Runs fn(T{}, stream) on ref's device, stream being its current stream and T the CUDA element
// type of ref's dtype.
template <typename Fn>
void dispatch(std::string_view op, const at::Tensor& ref, Fn&& fn) {
  const c10::cuda::CUDAGuard guard(ref.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (ref.scalar_type()) {
    case at::kFloat:
      return fn(float{}, stream);
    case at::kHalf:
      return fn(__half{}, stream);
    case at::kBFloat16:
      return fn(__nv_bfloat16{}, stream);
    default:
      TORCH_CHECK(false, op, " (CUDA): unsupported dtype ", ref.scalar_type(),
                  "; expected float32, float16 or bfloat16");
  }
}

}  // namespace mtlfast::cuda::detail
