// CPU entry points of the task_se passes (schemas and formulas in csrc/task_se.cpp): argument
// checks (a second line of defence behind the Python layer), choice of instruction set and dtype,
// the cut into work items and threading. The arithmetic lives in task_se_kernel.h, compiled once
// per instruction set.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <utility>

#include "cpu/isa.h"
#include "cpu/task_se.h"

namespace mtlfast::cpu::task_se {
namespace {

// Elements of x per work item: large enough that per-item costs (index arithmetic, an NCHW
// plane's lane sum, an NHWC item's row of C partial sums) are noise, small enough that a batch of
// one or two images still gives both threads several items.
constexpr int64_t kChunk = 65536;

// Elements of x per parallel task below which starting threads costs more than it saves.
constexpr int64_t kGrain = 32768;

// Output size from which its stores bypass the caches (measured 20-40% faster passes at 32 MiB,
// mixed at 16 MiB, slower where the tensors fit in a 32 MiB L3): the pass's three or four tensors
// of that size overflow the last-level cache, so the output reaches memory before anything reads
// it, and a normal store would first read every line of it in.
constexpr int64_t kStreamBytes = 24 << 20;

bool stream(const at::Tensor& out) {
  return static_cast<int64_t>(out.nbytes()) >= kStreamBytes;
}

const Kernels& isa_kernels() {
  static const Kernels table = [] {
    switch (isa()) {
#if defined(__x86_64__)
      case Isa::AVX512:
        return AVX512::kernels();
      case Isa::AVX2:
        return AVX2::kernels();
#endif
      default:
        return DEFAULT::kernels();
    }
  }();
  return table;
}

const DtypeKernels& dtype_kernels(const char* op, at::ScalarType dtype) {
  const Kernels& k = isa_kernels();
  switch (dtype) {
    case at::kFloat:
      return k.f32;
    case at::kDouble:
      return k.f64;
    case at::kHalf:
      return k.f16;
    case at::kBFloat16:
      return k.bf16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (expected float32, float64, float16 or bfloat16)");
  }
}

using Named = std::pair<const char*, const at::Tensor*>;

void check_cpu(const char* op, const Named& arg) {
  const auto& [name, t] = arg;
  TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->layout() == at::kStrided, op, ": ", name, " must be a strided tensor, got ", t->layout());
}

// x fixes shape, dtype and layout for the other (N, C, H, W) tensors. A tensor that is both
// contiguous and channels-last (C == 1 or H * W == 1) has the same memory order either way.
at::MemoryFormat check_x(const char* op, const at::Tensor& x) {
  check_cpu(op, {"x", &x});
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-d (N, C, H, W), got shape ", x.sizes());
  if (x.is_contiguous()) {
    return at::MemoryFormat::Contiguous;
  }
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x must be contiguous or channels-last, got strides ", x.strides());
  return at::MemoryFormat::ChannelsLast;
}

void check_like_x(const char* op, const Named& arg, const at::Tensor& x, at::MemoryFormat format) {
  const auto& [name, t] = arg;
  check_cpu(op, arg);
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t->sizes() == x.sizes(), op, ": ", name, " must have the shape of x ", x.sizes(), ", got ",
              t->sizes());
  TORCH_CHECK(t->is_contiguous(format), op, ": ", name, " (strides ", t->strides(), ") must be laid out like x (",
              format == at::MemoryFormat::ChannelsLast ? "channels-last" : "contiguous", ", strides ", x.strides(),
              ")");
}

// The (N, C) per-channel tensors are in x's accumulation dtype.
void check_per_channel(const char* op, const Named& arg, const at::Tensor& x) {
  const auto& [name, t] = arg;
  check_cpu(op, arg);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t->scalar_type() == acc, op, ": ", name, " must have dtype ", acc, " for x of dtype ",
              x.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(1), op, ": ", name,
              " must have shape (N, C) = (", x.size(0), ", ", x.size(1), "), got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t->strides());
}

// Outputs are written in parallel with no ordering, so no element may be reachable twice.
void check_output(const char* op, const Named& out, std::initializer_list<Named> others) {
  const auto& [name, t] = out;
  TORCH_CHECK(at::has_internal_overlap(*t) != at::MemOverlap::Yes, op, ": ", name,
              " has internally overlapping elements (e.g. a zero stride)");
  for (const auto& [other_name, other] : others) {
    if (other->defined()) {
      const at::MemOverlapStatus status = at::get_overlap_status(*t, *other);
      TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", name,
                  " overlaps ", other_name);
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Chunks of equal length; at least one per plane / sample, so that even H * W == 0 writes its sums.
Work work_of(const at::Tensor& x, at::MemoryFormat format) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const int64_t max_chunk = channels_last ? std::max<int64_t>(1, kChunk / std::max<int64_t>(C, 1)) : kChunk;
  const int64_t chunks = std::max<int64_t>(1, ceil_div(HW, max_chunk));
  return {N, C, HW, channels_last, ceil_div(HW, chunks), chunks};
}

void run_items(PassFn pass, const Args& args) {
  const Work& w = args.work;
  const int64_t items = (w.channels_last ? w.N : w.N * w.C) * w.chunks;
  const int64_t per_item = std::max<int64_t>(1, w.channels_last ? w.chunk * w.C : w.chunk);
  at::parallel_for(0, items, std::max<int64_t>(1, kGrain / per_item),
                   [&](int64_t begin, int64_t end) { pass(args, begin, end); });
}

// sums (N, C) = the pass's sums over H * W / divisor: written by the items themselves when a plane
// or sample is one item, else through partial sums added in a fixed order.
void run_reduction(PassFn pass, CombineFn combine, Args args, const at::Tensor& sums, double divisor) {
  const Work& w = args.work;
  if (w.chunks == 1) {
    args.partials = sums.mutable_data_ptr();
    args.divisor = divisor;
    run_items(pass, args);
    return;
  }
  const at::Tensor partials = at::empty({w.N * w.C * w.chunks}, sums.options());
  args.partials = partials.mutable_data_ptr();
  args.divisor = 1;
  run_items(pass, args);
  const Combine c{w.C, w.chunks, w.channels_last, partials.const_data_ptr(), sums.mutable_data_ptr(), divisor};
  at::parallel_for(0, w.N * w.C, std::max<int64_t>(1, kGrain / w.chunks),
                   [&](int64_t begin, int64_t end) { combine(c, begin, end); });
}

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

at::Tensor or_undefined(const std::optional<at::Tensor>& t) {
  return t.value_or(at::Tensor());
}

void pool(const at::Tensor& x, const at::Tensor& pooled) {
  constexpr const char* op = "mtlfast_C::task_se_pool";
  const at::MemoryFormat format = check_x(op, x);
  const DtypeKernels& k = dtype_kernels(op, x.scalar_type());
  check_per_channel(op, {"pooled", &pooled}, x);
  check_output(op, {"pooled", &pooled}, {{"x", &x}});
  Args args{};
  args.work = work_of(x, format);
  args.x = x.const_data_ptr();
  run_reduction(k.pool, k.combine, args, pooled, static_cast<double>(args.work.HW));
}

void scale(const at::Tensor& x, const at::Tensor& gate, const std::optional<at::Tensor>& residual, bool relu,
           const at::Tensor& out) {
  constexpr const char* op = "mtlfast_C::task_se_scale";
  const at::MemoryFormat format = check_x(op, x);
  const DtypeKernels& k = dtype_kernels(op, x.scalar_type());
  check_per_channel(op, {"gate", &gate}, x);
  const at::Tensor res = or_undefined(residual);
  if (res.defined()) {
    check_like_x(op, {"residual", &res}, x, format);
  }
  check_like_x(op, {"out", &out}, x, format);
  check_output(op, {"out", &out}, {{"x", &x}, {"gate", &gate}, {"residual", &res}});
  Args args{};
  args.work = work_of(x, format);
  args.x = x.const_data_ptr();
  args.residual = data_or_null(residual);
  args.gate = gate.const_data_ptr();
  args.out = out.mutable_data_ptr();
  args.relu = relu;
  args.stream = stream(out);
  run_items(k.scale, args);
}

void backward_gate(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate,
                   const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& grad_gate,
                   const std::optional<at::Tensor>& grad_residual) {
  constexpr const char* op = "mtlfast_C::task_se_backward_gate";
  const at::MemoryFormat format = check_x(op, x);
  const DtypeKernels& k = dtype_kernels(op, x.scalar_type());
  check_like_x(op, {"grad_out", &grad_out}, x, format);
  check_per_channel(op, {"gate", &gate}, x);
  const at::Tensor res = or_undefined(residual);
  if (res.defined()) {
    check_like_x(op, {"residual", &res}, x, format);
  }
  check_per_channel(op, {"grad_gate", &grad_gate}, x);
  const at::Tensor grad_res = or_undefined(grad_residual);
  const std::initializer_list<Named> inputs{{"grad_out", &grad_out}, {"x", &x}, {"gate", &gate}, {"residual", &res}};
  check_output(op, {"grad_gate", &grad_gate}, inputs);
  if (grad_res.defined()) {
    check_like_x(op, {"grad_residual", &grad_res}, x, format);
    check_output(op, {"grad_residual", &grad_res}, inputs);
    check_output(op, {"grad_residual", &grad_res}, {{"grad_gate", &grad_gate}});
  }
  Args args{};
  args.work = work_of(x, format);
  args.x = x.const_data_ptr();
  args.residual = data_or_null(residual);
  args.grad_out = grad_out.const_data_ptr();
  args.gate = gate.const_data_ptr();
  args.out = grad_res.defined() ? grad_res.mutable_data_ptr() : nullptr;
  args.relu = relu;
  args.stream = grad_res.defined() && stream(grad_res);
  run_reduction(k.backward_gate, k.combine, args, grad_gate, 1.0);
}

void backward_input(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate,
                    const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& grad_pooled,
                    const at::Tensor& grad_x) {
  constexpr const char* op = "mtlfast_C::task_se_backward_input";
  const at::MemoryFormat format = check_x(op, x);
  const DtypeKernels& k = dtype_kernels(op, x.scalar_type());
  check_like_x(op, {"grad_out", &grad_out}, x, format);
  check_per_channel(op, {"gate", &gate}, x);
  const at::Tensor res = or_undefined(residual);
  if (res.defined()) {
    check_like_x(op, {"residual", &res}, x, format);
  }
  check_per_channel(op, {"grad_pooled", &grad_pooled}, x);
  check_like_x(op, {"grad_x", &grad_x}, x, format);
  check_output(op, {"grad_x", &grad_x},
               {{"grad_out", &grad_out}, {"x", &x}, {"gate", &gate}, {"residual", &res}, {"grad_pooled", &grad_pooled}});
  Args args{};
  args.work = work_of(x, format);
  args.x = x.const_data_ptr();
  args.residual = data_or_null(residual);
  args.grad_out = grad_out.const_data_ptr();
  args.gate = gate.const_data_ptr();
  args.grad_pooled = grad_pooled.const_data_ptr();
  args.out = grad_x.mutable_data_ptr();
  args.divisor = static_cast<double>(args.work.HW);
  args.relu = relu;
  args.stream = stream(grad_x);
  run_items(k.backward_input, args);
}

}  // namespace
}  // namespace mtlfast::cpu::task_se

TORCH_LIBRARY_IMPL(mtlfast_C, CPU, m) {
  m.impl("task_se_pool", &mtlfast::cpu::task_se::pool);
  m.impl("task_se_scale", &mtlfast::cpu::task_se::scale);
  m.impl("task_se_backward_gate", &mtlfast::cpu::task_se::backward_gate);
  m.impl("task_se_backward_input", &mtlfast::cpu::task_se::backward_input);
}
