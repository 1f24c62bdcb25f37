// CUDA backend of mtlfast_C::attention_distill_{fwd,bwd}: checks the layout contract, then runs
// the launchers of kernels/attention_distill.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "attention_distill.cuh"
#include "common.h"

namespace mtlfast {
namespace {

using namespace cuda::detail;

// True when the trailing (C, H, W) block is one dense run of C*H*W elements in some dim order.
bool inner_block_dense(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims that move
  for (int64_t d = t.dim() - 3; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

// Same inner sizes as ref and the same strides wherever they matter, i.e. the same flat order.
bool same_inner_layout(const at::Tensor& t, const at::Tensor& ref) {
  for (int64_t i = 1; i <= 3; ++i) {
    const int64_t size = t.size(t.dim() - i);
    if (size != ref.size(ref.dim() - i)) return false;
    if (size > 1 && t.stride(t.dim() - i) != ref.stride(ref.dim() - i)) return false;
  }
  return true;
}

void check_operand(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "attention_distill: ", name, " must be a CUDA tensor");
  check_device_and_dtype("attention_distill", t, name, ref);
  TORCH_CHECK(t.dim() == dim, "attention_distill: ", name, " must have ", dim, " dims, got ", t.sizes());
  TORCH_CHECK(t.size(0) == ref.size(0) && t.size(1) == ref.size(1), "attention_distill: ", name,
              " has (N, T) = ", t.sizes().slice(0, 2), ", expected ", ref.sizes().slice(0, 2));
  TORCH_CHECK(same_inner_layout(t, ref), "attention_distill: ", name, " must share the (C, H, W) sizes and strides ",
              "of the first operand, got sizes ", t.sizes(), " strides ", t.strides());
}

// Checks a call whose (N, T, C, H, W) operands are fives and (N, T, S, C, H, W) operands sixes;
// returns its shape. fives[0] is the reference the other operands are compared to.
cuda::DistillShape check_call(std::initializer_list<std::pair<const at::Tensor*, const char*>> fives,
                              std::initializer_list<std::pair<const at::Tensor*, const char*>> sixes) {
  const auto& [ref, ref_name] = *fives.begin();
  TORCH_CHECK(ref->dim() == 5, "attention_distill: ", ref_name, " must be (N, T, C, H, W), got ", ref->sizes());
  TORCH_CHECK(inner_block_dense(*ref), "attention_distill: the (C, H, W) block of ", ref_name,
              " must be dense, got sizes ", ref->sizes(), " strides ", ref->strides());
  for (const auto& [t, name] : fives) check_operand(*t, name, 5, *ref);
  int64_t s = -1;
  for (const auto& [t, name] : sixes) {
    check_operand(*t, name, 6, *ref);
    if (s < 0) s = t->size(2);
    TORCH_CHECK(t->size(2) == s, "attention_distill: ", name, " has S = ", t->size(2), ", expected ", s);
  }
  return {ref->size(0), ref->size(1), s, ref->size(2) * ref->size(3) * ref->size(4)};
}

cuda::OuterStrides outer_strides(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.dim() == 6 ? t.stride(2) : 0};
}

void attention_distill_fwd(const at::Tensor& feats, const at::Tensor& mask_logits, const at::Tensor& messages,
                           at::Tensor& out) {
  const cuda::DistillShape shape =
      check_call({{&feats, "feats"}, {&out, "out"}}, {{&mask_logits, "mask_logits"}, {&messages, "messages"}});
  if (shape.n * shape.t * shape.p == 0) return;
  dispatch("attention_distill", feats, [&](auto tag, cudaStream_t stream) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::attention_distill_fwd<T>(
        shape, const_ptr<T>(feats), outer_strides(feats), const_ptr<T>(mask_logits), outer_strides(mask_logits),
        const_ptr<T>(messages), outer_strides(messages), mut_ptr<T>(out), outer_strides(out), stream));
  });
}

void attention_distill_bwd(const at::Tensor& grad_out, const at::Tensor& mask_logits, const at::Tensor& messages,
                           at::Tensor& grad_mask_logits, at::Tensor& grad_messages) {
  const cuda::DistillShape shape = check_call(
      {{&grad_out, "grad_out"}},
      {{&mask_logits, "mask_logits"}, {&messages, "messages"}, {&grad_mask_logits, "grad_mask_logits"},
       {&grad_messages, "grad_messages"}});
  if (shape.n * shape.t * shape.s * shape.p == 0) return;
  dispatch("attention_distill", grad_out, [&](auto tag, cudaStream_t stream) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::attention_distill_bwd<T>(
        shape, const_ptr<T>(grad_out), outer_strides(grad_out), const_ptr<T>(mask_logits), outer_strides(mask_logits),
        const_ptr<T>(messages), outer_strides(messages), mut_ptr<T>(grad_mask_logits), outer_strides(grad_mask_logits),
        mut_ptr<T>(grad_messages), outer_strides(grad_messages), stream));
  });
}

}  // namespace
}  // namespace mtlfast

TORCH_LIBRARY_IMPL(mtlfast_C, CUDA, m) {
  m.impl("attention_distill_fwd", &mtlfast::attention_distill_fwd);
  m.impl("attention_distill_bwd", &mtlfast::attention_distill_bwd);
}
