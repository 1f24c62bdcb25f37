// CPU entry points of task_se, the whole op each way (schemas and formulas in csrc/task_se.cpp):
// argument checks (a second line of defence behind the Python layer), choice of instruction set
// and dtype, the cut into work items, the schedule and threading. The arithmetic lives in task_se_kernel.h, compiled once
// per instruction set.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/stream.h"
#include "cpu/task_se.h"

namespace mtlfast::cpu::task_se {
namespace {

// Elements of x per work item: large enough that per-item costs (index arithmetic, an NCHW
// plane's lane sum, an NHWC item's row of C partial sums) are noise, small enough that a batch of
// one or two images still gives both threads several items.
constexpr int64_t kChunk = 65536;

// Elements of x per parallel task below which starting threads costs more than it saves.
constexpr int64_t kGrain = 32768;

// Output size from which its stores may bypass the caches (cpu/stream.h; measured 20-40% faster
// passes at 32 MiB, mixed at 16 MiB, slower where the tensors fit in a 32 MiB L3): the pass's
// three or four tensors of that size overflow the last-level cache.
constexpr int64_t kStreamBytes = 24 << 20;

bool stream(const at::Tensor& out) {
  return stream_into(out, kStreamBytes);
}

const DtypeKernels& dtype_kernels(const char* op, at::ScalarType dtype) {
  static const Kernels table = MTLFAST_ISA_TABLE(kernels);
  return for_dtype(table, op, dtype);
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
void run_reduction(PassFn pass, CombineFn combine, Args args, void* sums, const at::TensorOptions& acc,
                   double divisor) {
  const Work& w = args.work;
  if (w.chunks == 1) {
    args.partials = sums;
    args.divisor = divisor;
    run_items(pass, args);
    return;
  }
  const at::Tensor partials = at::empty({w.N * w.C * w.chunks}, acc);
  args.partials = partials.mutable_data_ptr();
  args.divisor = 1;
  run_items(pass, args);
  const Combine c{w.C, w.chunks, w.channels_last, partials.const_data_ptr(), sums, divisor};
  at::parallel_for(0, w.N * w.C, std::max<int64_t>(1, kGrain / w.chunks),
                   [&](int64_t begin, int64_t end) { combine(c, begin, end); });
}

at::Tensor or_undefined(const std::optional<at::Tensor>& t) {
  return t.value_or(at::Tensor());
}

// ---- the whole op: passes and linear layers in one call --------------------------------------
//
// Two schedules, chosen from the shape alone (so results are the same whatever the threads; both
// run the same arithmetic per sample):
// - by sample, when the batch has two samples or more and a sample is at least as large as a
//   task's weights: one parallel region over the samples, each thread taking a sample through
//   pooling, the linear layers and the gating while it is still in its cache. x is read from
//   memory once instead of twice, and a call starts its threads once, which matters when the
//   cores are shared with other work (a region waits for its slowest thread).
// - by pass otherwise (small maps with wide layers: 7x7 with 2048 channels): each pass, then each
//   layer, over the whole batch, parallel over pixels, rows of the weights or samples, so that the
//   weights are read once per call rather than once per sample.

// Multiply-adds per parallel task of the linear layers.
constexpr int64_t kMlpGrain = 16384;

bool by_sample(const at::Tensor& x, int64_t R) {
  const int64_t acc_size = x.scalar_type() == at::kDouble ? 8 : 4;
  return x.size(0) >= 2 && x.size(1) * x.size(2) * x.size(3) * x.element_size() >= 2 * R * x.size(1) * acc_size;
}

// Calls f(n0, count) on sample ranges: each sample in parallel, or the whole batch once.
template <typename F>
void schedule(bool per_sample, int64_t N, const F& f) {
  if (per_sample) {
    // Each thread takes the next sample until none is left, so that a thread the OS runs late
    // (cores shared with other work) does not hold the others up with a fixed share. The passes
    // and layers called inside run inline: ATen does not nest parallel regions.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(N, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      for (int64_t n = next++; n < N; n = next++) {
        f(n, 1);
      }
    });
  } else if (N > 0) {
    f(0, N);
  }
}

// Sample n of an (N, ...) tensor (contiguous or channels-last: sample-major either way).
void* sample(const at::Tensor& t, int64_t n) {
  return static_cast<char*>(t.data_ptr()) + n * t.stride(0) * t.element_size();
}

void* sample_or_null(const at::Tensor& t, int64_t n) {
  return t.defined() ? sample(t, n) : nullptr;
}

// A contiguous tensor of x's accumulation dtype and the given shape.
void check_acc(const char* op, const Named& arg, const at::Tensor& x, at::IntArrayRef sizes) {
  const auto& [name, t] = arg;
  check_cpu(op, arg);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t->scalar_type() == acc, op, ": ", name, " must have dtype ", acc, " for x of dtype ",
              x.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t->strides());
}

// Checks task and the weights w1, b1, w2, b2 (or their gradients); returns R.
int64_t check_mlp(const char* op, const at::Tensor& x, const at::Tensor& task, std::initializer_list<Named> weights) {
  const int64_t N = x.size(0), C = x.size(1);
  check_cpu(op, {"task", &task});
  TORCH_CHECK(task.scalar_type() == at::kLong && task.dim() == 1 && task.size(0) == N && task.is_contiguous(), op,
              ": task must be a contiguous int64 tensor of shape (", N, ",), got ", task.scalar_type(), " ",
              task.sizes());
  const auto& [w1_name, w1] = *weights.begin();
  TORCH_CHECK(w1->dim() == 3 && w1->size(2) == C, op, ": ", w1_name, " must have shape (T, R, ", C, "), got ",
              w1->sizes());
  const int64_t T = w1->size(0), R = w1->size(1);
  const std::vector<std::vector<int64_t>> shapes{{T, R, C}, {T, R}, {T, C, R}, {T, C}};
  auto shape = shapes.begin();
  for (const Named& w : weights) {
    check_acc(op, w, x, *shape++);
  }
  const int64_t* t = task.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    // ValueError, as the Python wrapper's check, which it leaves to this one
    TORCH_CHECK_VALUE(t[n] >= 0 && t[n] < T, "task_se: task indices must lie in [0, ", T, "), got task[", n,
                      "] = ", t[n]);
  }
  return R;
}

void run_mlp(MlpFn fn, const Mlp& m, int64_t rows, int64_t cost_per_row) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kMlpGrain / std::max<int64_t>(cost_per_row, 1)),
                   [&](int64_t begin, int64_t end) { fn(m, begin, end); });
}

// The layers' pointers for the samples [n0, n0 + count): the weights and task, then the (N, ...)
// buffers of the call, each at sample n0.
struct MlpBuffers {
  const at::Tensor &task, &w1, &b1, &w2, &b2, &pooled, &hidden, &gate;

  Mlp at(int64_t n0, int64_t count) const {
    Mlp m{};
    m.N = count;
    m.C = pooled.size(1);
    m.R = w1.size(1);
    m.task = task.const_data_ptr<int64_t>() + n0;
    m.w1 = w1.const_data_ptr();
    m.b1 = b1.const_data_ptr();
    m.w2 = w2.const_data_ptr();
    m.b2 = b2.const_data_ptr();
    m.pooled = sample(pooled, n0);
    m.hidden = sample(hidden, n0);
    m.gate = sample(gate, n0);
    return m;
  }
};

void gate_of(const DtypeKernels& k, const Mlp& m) {
  run_mlp(k.mlp.squeeze, m, m.R, m.N * m.C);
  run_mlp(k.mlp.excite, m, m.C, m.N * m.R);
}

void forward(const at::Tensor& x, const at::Tensor& task, const at::Tensor& w1, const at::Tensor& b1,
             const at::Tensor& w2, const at::Tensor& b2, const std::optional<at::Tensor>& residual, bool relu,
             const at::Tensor& out, const at::Tensor& pooled) {
  constexpr const char* op = "mtlfast_C::task_se_forward";
  const at::MemoryFormat format = check_x(op, x);
  const DtypeKernels& k = dtype_kernels(op, x.scalar_type());
  const int64_t R = check_mlp(op, x, task, {{"w1", &w1}, {"b1", &b1}, {"w2", &w2}, {"b2", &b2}});
  check_per_channel(op, {"pooled", &pooled}, x);
  const at::Tensor res = or_undefined(residual);
  if (res.defined()) {
    check_like_x(op, {"residual", &res}, x, format);
  }
  check_like_x(op, {"out", &out}, x, format);
  check_output(op, {"out", &out}, {{"x", &x}, {"residual", &res}, {"pooled", &pooled}});
  check_output(op, {"pooled", &pooled}, {{"x", &x}, {"residual", &res}});

  const Work whole = work_of(x, format);
  const at::Tensor hidden = at::empty({whole.N, R}, pooled.options());
  const at::Tensor gate = at::empty({whole.N, whole.C}, pooled.options());
  const MlpBuffers buffers{task, w1, b1, w2, b2, pooled, hidden, gate};
  schedule(by_sample(x, R), whole.N, [&](int64_t n0, int64_t count) {
    Args a{};
    a.work = whole;
    a.work.N = count;
    a.x = sample(x, n0);
    run_reduction(k.pool, k.combine, a, sample(pooled, n0), pooled.options(), static_cast<double>(whole.HW));
    gate_of(k, buffers.at(n0, count));
    a.residual = sample_or_null(res, n0);
    a.gate = sample(gate, n0);
    a.out = sample(out, n0);
    a.relu = relu;
    a.stream = stream(out);
    run_items(k.scale, a);
  });
}

void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pooled, const at::Tensor& task,
              const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
              const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& grad_x,
              const at::Tensor& grad_w1, const at::Tensor& grad_b1, const at::Tensor& grad_w2,
              const at::Tensor& grad_b2, const std::optional<at::Tensor>& grad_residual) {
  constexpr const char* op = "mtlfast_C::task_se_backward";
  const at::MemoryFormat format = check_x(op, x);
  const DtypeKernels& k = dtype_kernels(op, x.scalar_type());
  const int64_t R = check_mlp(op, x, task, {{"w1", &w1}, {"b1", &b1}, {"w2", &w2}, {"b2", &b2}});
  check_mlp(op, x, task, {{"grad_w1", &grad_w1}, {"grad_b1", &grad_b1}, {"grad_w2", &grad_w2}, {"grad_b2", &grad_b2}});
  check_like_x(op, {"grad_out", &grad_out}, x, format);
  check_per_channel(op, {"pooled", &pooled}, x);
  const at::Tensor res = or_undefined(residual);
  if (res.defined()) {
    check_like_x(op, {"residual", &res}, x, format);
  }
  check_like_x(op, {"grad_x", &grad_x}, x, format);
  const std::initializer_list<Named> inputs{{"grad_out", &grad_out}, {"x", &x}, {"pooled", &pooled}, {"residual", &res}};
  check_output(op, {"grad_x", &grad_x}, inputs);
  const at::Tensor grad_res = or_undefined(grad_residual);
  if (grad_res.defined()) {
    check_like_x(op, {"grad_residual", &grad_res}, x, format);
    check_output(op, {"grad_residual", &grad_res}, inputs);
    check_output(op, {"grad_residual", &grad_res}, {{"grad_x", &grad_x}});
  }

  const Work whole = work_of(x, format);
  const int64_t N = whole.N, C = whole.C;
  const at::TensorOptions acc = pooled.options();
  const at::Tensor hidden = at::empty({N, R}, acc), gate = at::empty({N, C}, acc), dh = at::empty({N, R}, acc);
  const at::Tensor grad_gate = at::empty({N, C}, acc), dz = at::empty({N, C}, acc);
  const at::Tensor grad_pooled = at::empty({N, C}, acc);
  const MlpBuffers buffers{task, w1, b1, w2, b2, pooled, hidden, gate};
  auto with_grads = [&](Mlp m, int64_t n0) {
    m.grad_gate = sample(grad_gate, n0);
    m.dz = sample(dz, n0);
    m.dh = sample(dh, n0);
    m.grad_pooled = sample(grad_pooled, n0);
    m.grad_w1 = grad_w1.mutable_data_ptr();
    m.grad_b1 = grad_b1.mutable_data_ptr();
    m.grad_w2 = grad_w2.mutable_data_ptr();
    m.grad_b2 = grad_b2.mutable_data_ptr();
    return m;
  };
  schedule(by_sample(x, R), N, [&](int64_t n0, int64_t count) {
    // The gate is recomputed from the saved means.
    const Mlp m = with_grads(buffers.at(n0, count), n0);
    gate_of(k, m);
    Args a{};
    a.work = whole;
    a.work.N = count;
    a.x = sample(x, n0);
    a.residual = sample_or_null(res, n0);
    a.grad_out = sample(grad_out, n0);
    a.gate = sample(gate, n0);
    a.out = sample_or_null(grad_res, n0);
    a.relu = relu;
    a.stream = grad_res.defined() && stream(grad_res);
    run_reduction(k.backward_gate, k.combine, a, sample(grad_gate, n0), acc, 1.0);
    run_mlp(k.mlp.backward_sample, m, count, 2 * C * R);
    a.grad_pooled = sample(grad_pooled, n0);
    a.out = sample(grad_x, n0);
    a.divisor = static_cast<double>(whole.HW);
    a.stream = stream(grad_x);
    run_items(k.backward_input, a);
  });
  // The weights' gradients sum over the batch: rows in parallel, samples in order.
  for (const at::Tensor* g : {&grad_w1, &grad_b1, &grad_w2, &grad_b2}) {
    g->zero_();
  }
  const Mlp m = with_grads(buffers.at(0, N), 0);
  run_mlp(k.mlp.grad_excite, m, C, N * R);
  run_mlp(k.mlp.grad_squeeze, m, R, N * C);
}

}  // namespace
}  // namespace mtlfast::cpu::task_se

TORCH_LIBRARY_IMPL(mtlfast_C, CPU, m) {
  m.impl("task_se_forward", &mtlfast::cpu::task_se::forward);
  m.impl("task_se_backward", &mtlfast::cpu::task_se::backward);
}
