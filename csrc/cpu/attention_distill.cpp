// CPU entry points of the attention-distillation kernels: argument checks (a second line of
// defence behind the Python layer), choice of instruction set and dtype, and threading. The
// arithmetic lives in attention_distill_kernel.h, compiled once per instruction set.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <utility>
#include <vector>

#include "cpu/attention_distill.h"
#include "cpu/dispatch.h"
#include "cpu/stream.h"

namespace mtlfast::cpu {
namespace {

// Elements of one (n, t) block per work item: small enough that both threads get work when N*T
// is small, large enough that the per-item index arithmetic is noise.
constexpr int64_t kChunk = 2048;

// Element reads + writes per parallel task below which starting threads costs more than it saves.
constexpr int64_t kGrainTouched = 32768;

// Size of each gradient from which the backward's stores may bypass the caches (cpu/stream.h):
// two such outputs next to three inputs of which two are as large overflow a 32 MiB L3. Measured
// with reused output memory: 20-25% faster at 12 and 24 MiB per output, unchanged at 6 MiB.
constexpr int64_t kStreamBytes = 8 << 20;

const DtypeKernels& dtype_kernels(const char* op, at::ScalarType dtype) {
  static const IsaKernels table = MTLFAST_ISA_TABLE(attention_distill_kernels);
  return for_dtype(table, op, dtype);
}

using Named = std::pair<const char*, const at::Tensor*>;

// Strides of the trailing (C, H, W) dims; 0 for size-1 dims, whose stride carries no meaning.
std::array<int64_t, 3> inner_strides(const at::Tensor& t) {
  std::array<int64_t, 3> strides{};
  for (int64_t i = 0; i < 3; ++i) {
    const int64_t d = t.dim() - 3 + i;
    strides[i] = t.size(d) == 1 ? 0 : t.stride(d);
  }
  return strides;
}

// Dense iff the dims of size > 1, ordered by stride, have strides 1, size0, size0 * size1, ...
bool is_dense_block(const at::Tensor& t) {
  std::array<std::pair<int64_t, int64_t>, 3> dims{};  // (stride, size)
  int64_t n = 0;
  for (int64_t d = t.dim() - 3; d < t.dim(); ++d) {
    if (t.size(d) != 1) {
      dims[n++] = {t.stride(d), t.size(d)};
    }
  }
  // Insertion sort: std::sort on this partly used array trips GCC 12's -Warray-bounds.
  for (int64_t i = 1; i < n; ++i) {
    for (int64_t j = i; j > 0 && dims[j - 1].first > dims[j].first; --j) {
      std::swap(dims[j - 1], dims[j]);
    }
  }
  int64_t expected = 1;
  for (int64_t i = 0; i < n; ++i) {
    if (dims[i].first != expected) {
      return false;
    }
    expected *= dims[i].second;
  }
  return true;
}

// ref is the (N, T, C, H, W) tensor that fixes device, dtype, sizes and inner strides for the rest.
void check_ref(const char* op, const Named& ref) {
  const auto& [name, t] = ref;
  TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->layout() == at::kStrided, op, ": ", name, " must be a strided tensor, got ", t->layout());
  TORCH_CHECK(t->dim() == 5, op, ": ", name, " must be 5-d (N, T, C, H, W), got shape ", t->sizes());
  TORCH_CHECK(t->size(1) >= 2, op, ": ", name, " must have T >= 2 tasks, got shape ", t->sizes());
  TORCH_CHECK(is_dense_block(*t), op, ": the (C, H, W) block of ", name, " must be dense, got strides ",
              t->strides());
}

void check_like(const char* op, const Named& ref, const Named& arg, bool per_source) {
  const auto& [ref_name, r] = ref;
  const auto& [name, t] = arg;
  TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->layout() == at::kStrided, op, ": ", name, " must be a strided tensor, got ", t->layout());
  TORCH_CHECK(t->scalar_type() == r->scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(), " but ",
              ref_name, " has dtype ", r->scalar_type());
  std::vector<int64_t> sizes = r->sizes().vec();
  if (per_source) {
    sizes.insert(sizes.begin() + 2, r->size(1) - 1);
  }
  TORCH_CHECK(t->sizes() == at::IntArrayRef(sizes), op, ": ", name, " must have shape ", at::IntArrayRef(sizes),
              " to match ", ref_name, ", got ", t->sizes());
  TORCH_CHECK(inner_strides(*t) == inner_strides(*r), op, ": the (C, H, W) block of ", name, " (strides ",
              t->strides(), ") must be laid out like that of ", ref_name, " (strides ", r->strides(), ")");
}

// Outputs are written in parallel with no ordering, so no element may be reachable twice.
void check_output(const char* op, const Named& out, std::initializer_list<Named> others) {
  const auto& [name, t] = out;
  TORCH_CHECK(at::has_internal_overlap(*t) != at::MemOverlap::Yes, op, ": ", name,
              " has internally overlapping elements (e.g. a zero stride)");
  for (const auto& [other_name, other] : others) {
    const at::MemOverlapStatus status = at::get_overlap_status(*t, *other);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", name,
                " overlaps ", other_name);
  }
}

template <typename Ptr>
Operand<Ptr> operand(const at::Tensor& t, Ptr data) {
  return {data, t.stride(0), t.stride(1), t.dim() == 6 ? t.stride(2) : 0};
}

Input input(const at::Tensor& t) {
  return operand(t, t.const_data_ptr());
}

Output output(const at::Tensor& t) {
  return operand(t, t.mutable_data_ptr());
}

Work work_of(const at::Tensor& ref) {
  const int64_t P = ref.size(2) * ref.size(3) * ref.size(4);
  const int64_t chunk = std::min(P, kChunk);
  return {ref.size(1), ref.size(1) - 1, P, chunk, (P + chunk - 1) / chunk};
}

// touched: element reads + writes per element of a (C, H, W) block.
template <typename Args, typename Fn>
void run(Fn kernel, const Args& args, int64_t N, int64_t touched) {
  const Work& w = args.work;
  const int64_t items = N * w.T * w.chunks;
  const int64_t grain = std::max<int64_t>(1, kGrainTouched / (w.chunk * touched));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

void attention_distill_fwd(const at::Tensor& feats, const at::Tensor& mask_logits, const at::Tensor& messages,
                           const at::Tensor& out) {
  constexpr const char* op = "mtlfast_C::attention_distill_fwd";
  const Named ref{"feats", &feats};
  check_ref(op, ref);
  check_like(op, ref, {"mask_logits", &mask_logits}, true);
  check_like(op, ref, {"messages", &messages}, true);
  check_like(op, ref, {"out", &out}, false);
  check_output(op, {"out", &out}, {ref, {"mask_logits", &mask_logits}, {"messages", &messages}});
  const FwdFn kernel = dtype_kernels(op, feats.scalar_type()).fwd;
  if (feats.numel() == 0) {
    return;
  }
  const FwdArgs args{work_of(feats), input(feats), input(mask_logits), input(messages), output(out)};
  run(kernel, args, feats.size(0), 2 * args.work.S + 2);
}

void attention_distill_bwd(const at::Tensor& grad_out, const at::Tensor& mask_logits, const at::Tensor& messages,
                           const at::Tensor& grad_mask_logits, const at::Tensor& grad_messages) {
  constexpr const char* op = "mtlfast_C::attention_distill_bwd";
  const Named ref{"grad_out", &grad_out};
  check_ref(op, ref);
  check_like(op, ref, {"mask_logits", &mask_logits}, true);
  check_like(op, ref, {"messages", &messages}, true);
  check_like(op, ref, {"grad_mask_logits", &grad_mask_logits}, true);
  check_like(op, ref, {"grad_messages", &grad_messages}, true);
  check_output(op, {"grad_mask_logits", &grad_mask_logits},
               {ref, {"mask_logits", &mask_logits}, {"messages", &messages}, {"grad_messages", &grad_messages}});
  check_output(op, {"grad_messages", &grad_messages}, {ref, {"mask_logits", &mask_logits}, {"messages", &messages}});
  const BwdFn kernel = dtype_kernels(op, grad_out.scalar_type()).bwd;
  if (grad_out.numel() == 0) {
    return;
  }
  const bool stream = stream_into(grad_mask_logits, kStreamBytes) && stream_into(grad_messages, kStreamBytes);
  const BwdArgs args{work_of(grad_out), input(grad_out), input(mask_logits), input(messages),
                     output(grad_mask_logits), output(grad_messages), stream};
  run(kernel, args, grad_out.size(0), 4 * args.work.S + 1);
}

}  // namespace
}  // namespace mtlfast::cpu

TORCH_LIBRARY_IMPL(mtlfast_C, CPU, m) {
  m.impl("attention_distill_fwd", &mtlfast::cpu::attention_distill_fwd);
  m.impl("attention_distill_bwd", &mtlfast::cpu::attention_distill_bwd);
}

