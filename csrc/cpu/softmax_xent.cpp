#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/dispatch.h"
#include "cpu/softmax_xent.h"

namespace mtlfast::cpu::softmax_xent {
namespace {

const Kernels& isa_kernels() {
  static const Kernels table = MTLFAST_ISA_TABLE(kernels);
  return table;
}

// x's map, checked: a (N, C, H, W) CPU tensor, contiguous or channels-last; target (N, H, W) int64.
Map map_of(const char* op, const at::Tensor& x, const at::Tensor& target) {
  TORCH_CHECK(x.device().is_cpu() && x.layout() == at::kStrided, op, ": x must be a strided CPU tensor, got ",
              x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-d (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, op, ": x must have at least one channel, got shape ", x.sizes());
  const bool nchw = x.is_contiguous();
  const bool cl = !nchw && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(nchw || cl, op, ": x must be contiguous or channels-last, got strides ", x.strides());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.device().is_cpu(), op,
              ": target must be a contiguous int64 CPU tensor, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 3 && target.size(0) == x.size(0) && target.size(1) == x.size(2) &&
                  target.size(2) == x.size(3),
              op, ": target must be (N, H, W) = (", x.size(0), ", ", x.size(2), ", ", x.size(3), "), got ",
              target.sizes());
  return {x.size(0), x.size(1), x.size(2) * x.size(3), cl};
}

// Pixels per task: a few tiles' worth of channels each.
int64_t grain(const Map& m) {
  return std::max<int64_t>(64, 16384 / m.C);
}

std::tuple<at::Tensor, at::Tensor> softmax_xent_fwd(const at::Tensor& x, const at::Tensor& target,
                                                    int64_t ignore_index) {
  constexpr const char* op = "mtlfast_C::softmax_xent_fwd";
  const Map m = map_of(op, x, target);
  const DtypeKernels& k = for_float_dtype(isa_kernels(), op, x.scalar_type());
  at::Tensor lse = at::empty({x.size(0), x.size(2), x.size(3)}, x.options());
  at::Tensor nll = at::empty_like(lse);
  if (lse.numel() == 0) {
    return {lse, nll};
  }
  const void* xp = x.const_data_ptr();
  const auto* tp = target.const_data_ptr<int64_t>();
  void* lp = lse.mutable_data_ptr();
  void* np = nll.mutable_data_ptr();
  at::parallel_for(0, m.N * m.P, grain(m),
                   [&](int64_t b, int64_t e) { k.forward(xp, tp, ignore_index, lp, np, m, b, e); });
  return {lse, nll};
}

at::Tensor softmax_xent_bwd(const at::Tensor& x, const at::Tensor& target, const at::Tensor& lse,
                            int64_t ignore_index, double scale) {
  constexpr const char* op = "mtlfast_C::softmax_xent_bwd";
  const Map m = map_of(op, x, target);
  TORCH_CHECK(lse.scalar_type() == x.scalar_type() && lse.is_contiguous() && lse.sizes() == target.sizes(), op,
              ": lse must be a contiguous tensor of target's shape ", target.sizes(), " in x's dtype, got ",
              lse.scalar_type(), " ", lse.sizes());
  const DtypeKernels& k = for_float_dtype(isa_kernels(), op, x.scalar_type());
  const auto format = m.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor grad_x = at::empty_like(x, format);
  if (grad_x.numel() == 0) {
    return grad_x;
  }
  const void* xp = x.const_data_ptr();
  const auto* tp = target.const_data_ptr<int64_t>();
  const void* lp = lse.const_data_ptr();
  void* gp = grad_x.mutable_data_ptr();
  at::parallel_for(0, m.N * m.P, grain(m),
                   [&](int64_t b, int64_t e) { k.backward(xp, tp, ignore_index, lp, scale, gp, m, b, e); });
  return grad_x;
}

}  // namespace
}  // namespace mtlfast::cpu::softmax_xent

TORCH_LIBRARY_IMPL(mtlfast_C, CPU, m) {
  m.impl("softmax_xent_fwd", &mtlfast::cpu::softmax_xent::softmax_xent_fwd);
  m.impl("softmax_xent_bwd", &mtlfast::cpu::softmax_xent::softmax_xent_bwd);
}
