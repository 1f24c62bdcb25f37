#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>

#include "cpu/dispatch.h"
#include "cpu/max_pool.h"

namespace mtlfast::cpu::max_pool {
namespace {

const Kernels& isa_kernels() {
  static const Kernels table = MTLFAST_ISA_TABLE(kernels);
  return table;
}

const DtypeKernels& dtype_kernels(const char* op, at::ScalarType dtype) {
  return for_float_dtype(isa_kernels(), op, dtype);
}

std::pair<int64_t, int64_t> pair_of(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 entries (rows, columns), got ", v);
  return {v[0], v[1]};
}

// The window geometry of a (H, W) plane, checked: what F.max_pool2d accepts with dilation 1 and
// ceil_mode=False, and windows of at most 255 positions (offsets are uint8).
Pool pool_of(const char* op, int64_t H, int64_t W, at::IntArrayRef kernel, at::IntArrayRef stride,
             at::IntArrayRef padding) {
  const auto [kh, kw] = pair_of(op, "kernel", kernel);
  const auto [sh, sw] = pair_of(op, "stride", stride);
  const auto [ph, pw] = pair_of(op, "padding", padding);
  TORCH_CHECK(kh > 0 && kw > 0 && kh * kw <= 255, op, ": kernel must be positive with at most 255 positions, got ",
              kernel);
  TORCH_CHECK(sh > 0 && sw > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(ph >= 0 && pw >= 0 && 2 * ph <= kh && 2 * pw <= kw, op,
              ": padding must be non-negative and at most half the kernel, got ", padding, " for kernel ", kernel);
  TORCH_CHECK(H + 2 * ph >= kh && W + 2 * pw >= kw, op, ": the padded input (", H + 2 * ph, ", ", W + 2 * pw,
              ") is smaller than the kernel ", kernel);
  return {H, W, (H + 2 * ph - kh) / sh + 1, (W + 2 * pw - kw) / sw + 1, kh, kw, sh, sw, ph, pw};
}

void check_cpu_4d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided, op, ": ", name, " must be a strided CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-d (N, C, H, W), got shape ", t.sizes());
}

// Planes per task: at least a few thousand pixels each.
int64_t grain(const Pool& p) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.H * p.W));
}

std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& x_, at::IntArrayRef kernel, at::IntArrayRef stride,
                                              at::IntArrayRef padding) {
  constexpr const char* op = "mtlfast_C::max_pool2d";
  check_cpu_4d(op, "x", x_);
  const Pool p = pool_of(op, x_.size(2), x_.size(3), kernel, stride, padding);
  const DtypeKernels& k = dtype_kernels(op, x_.scalar_type());
  const at::Tensor x = x_.contiguous();
  const int64_t planes = x.size(0) * x.size(1);
  at::Tensor out = at::empty({x.size(0), x.size(1), p.OH, p.OW}, x.options());
  at::Tensor offsets = at::empty({x.size(0), x.size(1), p.OH, p.OW}, x.options().dtype(at::kByte));
  if (out.numel() == 0) {
    return {out, offsets};
  }
  const void* xp = x.const_data_ptr();
  void* op_out = out.mutable_data_ptr();
  auto* op_offsets = offsets.mutable_data_ptr<std::uint8_t>();
  at::parallel_for(0, planes, grain(p), [&](int64_t b, int64_t e) { k.forward(xp, op_out, op_offsets, p, b, e); });
  return {out, offsets};
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_, const at::Tensor& offsets_, at::IntArrayRef input_size,
                               at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  constexpr const char* op = "mtlfast_C::max_pool2d_backward";
  check_cpu_4d(op, "grad_out", grad_);
  check_cpu_4d(op, "offsets", offsets_);
  const auto [H, W] = pair_of(op, "input_size", input_size);
  TORCH_CHECK(H >= 0 && W >= 0, op, ": input_size must be non-negative, got ", input_size);
  const Pool p = pool_of(op, H, W, kernel, stride, padding);
  TORCH_CHECK(grad_.size(2) == p.OH && grad_.size(3) == p.OW, op, ": grad_out must be (N, C, ", p.OH, ", ", p.OW,
              ") for input_size ", input_size, ", got ", grad_.sizes());
  TORCH_CHECK(offsets_.scalar_type() == at::kByte && offsets_.sizes() == grad_.sizes(), op,
              ": offsets must be a uint8 tensor of grad_out's shape ", grad_.sizes(), ", got ", offsets_.scalar_type(),
              " ", offsets_.sizes());
  const DtypeKernels& k = dtype_kernels(op, grad_.scalar_type());
  const at::Tensor grad = grad_.contiguous(), offsets = offsets_.contiguous();
  at::Tensor grad_x = at::empty({grad.size(0), grad.size(1), H, W}, grad.options());
  if (grad_x.numel() == 0) {
    return grad_x;
  }
  const void* gp = grad.const_data_ptr();
  const auto* offp = offsets.const_data_ptr<std::uint8_t>();
  void* gxp = grad_x.mutable_data_ptr();
  std::atomic<bool> ok{true};
  at::parallel_for(0, grad.size(0) * grad.size(1), grain(p), [&](int64_t b, int64_t e) {
    if (!k.backward(gp, offp, gxp, p, b, e)) {
      ok = false;
    }
  });
  TORCH_CHECK(ok, op, ": offsets hold positions outside their windows or the input (not made by max_pool2d)");
  return grad_x;
}

}  // namespace
}  // namespace mtlfast::cpu::max_pool

TORCH_LIBRARY_IMPL(mtlfast_C, CPU, m) {
  m.impl("max_pool2d", &mtlfast::cpu::max_pool::max_pool2d);
  m.impl("max_pool2d_backward", &mtlfast::cpu::max_pool::max_pool2d_backward);
}
