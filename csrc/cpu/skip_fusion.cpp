// CPU entry points of the skip_fusion kernels: argument checks (a second line of defence behind
// the Python layer), the bilinear sampling tables, choice of instruction set and dtype, threading,
// and the reduction of the backward's per-plane sums. The arithmetic lives in
// skip_fusion_kernel.h, compiled once per instruction set.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/native/UpSample.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/skip_fusion.h"

namespace mtlfast::cpu::skip_fusion {
namespace {

// Multiply-adds per parallel task below which starting threads costs more than it saves.
constexpr int64_t kGrainWork = 1 << 16;

const DtypeKernels& dtype_kernels(const char* op, at::ScalarType dtype) {
  static const IsaKernels table = MTLFAST_ISA_TABLE(kernels);
  return for_dtype(table, op, dtype);
}

// A Taps table and its storage.
template <typename Acc>
class Table {
 public:
  Table(int64_t taps, int64_t len, int64_t pad_index)
      : taps_(taps),
        len_(len),
        index_(taps * padded(len), pad_index),
        weight_(taps * padded(len), Acc(0)),
        real_(len, 0) {}

  // Sets tap m of position i; the taps of a position are set in order, the rest stay padding.
  void set(int64_t m, int64_t i, int64_t index, Acc weight) {
    index_[m * padded(len_) + i] = static_cast<IndexOf<Acc>>(index);
    weight_[m * padded(len_) + i] = weight;
    real_[i] = m + 1;
  }
  int64_t index(int64_t m, int64_t i) const { return index_[m * padded(len_) + i]; }
  Acc weight(int64_t m, int64_t i) const { return weight_[m * padded(len_) + i]; }
  int64_t taps() const { return taps_; }
  int64_t len() const { return len_; }
  Taps view() const {
    return {index_.data(), weight_.data(), taps_, len_, padded(len_), period_, step_, lo_, hi_, phase_taps_.data()};
  }

  // Finds the periodic interior that Taps describes, for a table reading in_size positions.
  void find_period(int64_t in_size) {
    const int64_t g = std::gcd(len_, in_size);
    const int64_t P = len_ / g, Q = in_size / g;
    const int64_t t0 = len_ / 2 / P;  // the reference period, mid-table, far from the clamped ends
    if ((P & (P - 1)) != 0 || (Q & (Q - 1)) != 0 || P * t0 + P > len_) {
      return;
    }
    for (int64_t i = P * t0; i < P * t0 + P; ++i) {
      for (int64_t m = 0; m < real_[i]; ++m) {
        const int64_t d = index(m, i) - Q * t0;
        if (d < -Q || d >= 2 * Q) {  // floor(d / Q) outside [-1, 1]
          return;
        }
      }
    }
    const auto matches = [&](int64_t i) {
      const int64_t ref = P * t0 + i % P;
      if (real_[i] != real_[ref]) {
        return false;
      }
      for (int64_t m = 0; m < real_[i]; ++m) {
        if (index(m, i) - Q * (i / P) != index(m, ref) - Q * t0 || weight(m, i) != weight(m, ref)) {
          return false;
        }
      }
      return true;
    };
    lo_ = P * t0;
    while (lo_ > 0 && matches(lo_ - 1)) {
      --lo_;
    }
    hi_ = P * t0 + P;
    while (hi_ < len_ && matches(hi_)) {
      ++hi_;
    }
    period_ = P;
    step_ = Q;
    phase_taps_.assign(real_.begin() + P * t0, real_.begin() + P * t0 + P);
  }

 private:
  int64_t taps_, len_;
  int64_t period_ = 0, step_ = 0, lo_ = 0, hi_ = 0;
  std::vector<IndexOf<Acc>> index_;
  std::vector<Acc> weight_;
  std::vector<int64_t> real_;  // per position, the taps that are not padding
  std::vector<int64_t> phase_taps_;
};

// Bilinear sampling of in_size source positions at out_size output positions, computed by
// PyTorch's own functions (align_corners=False, no scale factor), so indices and weights are
// those of F.interpolate bit for bit.
template <typename Acc>
Table<Acc> sampling(int64_t in_size, int64_t out_size) {
  Table<Acc> t(2, out_size, 0);
  const Acc scale = at::native::area_pixel_compute_scale<Acc>(in_size, out_size, false, std::nullopt);
  for (int64_t i = 0; i < out_size; ++i) {
    int64_t i0 = 0, i1 = 0;
    Acc l0 = 0, l1 = 0;
    at::native::compute_source_index_and_lambda<Acc, Acc>(i0, i1, l0, l1, scale, i, in_size, out_size, false);
    t.set(0, i, i0, l0);
    t.set(1, i, i1, l1);
  }
  return t;
}

// The transpose of sampling table s over in_size source positions: position j gathers the output
// positions that sample it, in output order. Unused taps point at zero_index, where the kernel
// keeps a zero.
template <typename Acc>
Table<Acc> adjoint(const Table<Acc>& s, int64_t in_size, int64_t zero_index) {
  std::vector<int64_t> count(in_size, 0);
  for (int64_t i = 0; i < s.len(); ++i) {
    for (int64_t m = 0; m < s.taps(); ++m) {
      ++count[s.index(m, i)];
    }
  }
  Table<Acc> t(*std::max_element(count.begin(), count.end()), in_size, zero_index);
  std::fill(count.begin(), count.end(), 0);
  for (int64_t i = 0; i < s.len(); ++i) {
    for (int64_t m = 0; m < s.taps(); ++m) {
      const int64_t j = s.index(m, i);
      t.set(count[j]++, j, i, s.weight(m, i));
    }
  }
  return t;
}

// The tables of every layer for output size (H, W), and the kernels' view of them.
template <typename Acc>
struct Tables {
  std::vector<Table<Acc>> storage;
  std::vector<Layer> layers;
};

template <typename Acc>
Tables<Acc> make_tables(const std::vector<at::Tensor>& scores, int64_t H, int64_t W) {
  Tables<Acc> t;
  for (const at::Tensor& s : scores) {
    const int64_t h = s.size(2), w = s.size(3);
    Table<Acc> cols = sampling<Acc>(w, W);
    Table<Acc> cols_adjoint = adjoint(cols, w, W);
    cols.find_period(w);
    cols_adjoint.find_period(W);
    t.storage.push_back(sampling<Acc>(h, H));
    t.storage.push_back(std::move(cols));
    t.storage.push_back(std::move(cols_adjoint));
  }
  for (size_t k = 0; k < scores.size(); ++k) {
    const Table<Acc>* tab = &t.storage[3 * k];
    t.layers.push_back(
        {scores[k].size(2), scores[k].size(3), tab[0].view(), tab[1].view(), tab[2].view(), scores[k].const_data_ptr(),
         nullptr});
  }
  return t;
}

using Named = std::pair<std::string, const at::Tensor*>;

void check_tensor(const char* op, const Named& arg, at::ScalarType dtype, at::IntArrayRef sizes) {
  const auto& [name, t] = arg;
  TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->layout() == at::kStrided, op, ": ", name, " must be a strided tensor, got ", t->layout());
  TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " has dtype ", t->scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t->sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t->strides());
}

// scores fix N, C and the dtype for the rest; the sampling tables index rows with 32-bit integers.
void check_scores(const char* op, const std::vector<at::Tensor>& scores) {
  TORCH_CHECK(!scores.empty(), op, ": scores must be a non-empty list of (N, C, H_k, W_k) tensors");
  const at::Tensor& first = scores[0];
  TORCH_CHECK(first.dim() == 4, op, ": scores[0] must be 4-d (N, C, H_k, W_k), got shape ", first.sizes());
  for (size_t k = 0; k < scores.size(); ++k) {
    const at::Tensor& s = scores[k];
    const std::string name = "scores[" + std::to_string(k) + "]";
    TORCH_CHECK(s.dim() == 4 && s.size(2) >= 1 && s.size(3) >= 1 && s.size(3) < std::numeric_limits<int32_t>::max(),
                op, ": ", name, " must have shape (N, C, H_k, W_k) with H_k, W_k >= 1, got ", s.sizes());
    check_tensor(op, {name, &s}, first.scalar_type(), {first.size(0), first.size(1), s.size(2), s.size(3)});
  }
}

void check_weights(const char* op, const std::vector<at::Tensor>& scores, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const std::string& w, const std::string& b) {
  const int64_t K = static_cast<int64_t>(scores.size()), C = scores[0].size(1);
  check_tensor(op, {w, &weight}, scores[0].scalar_type(), {K, C});
  if (bias.has_value() && bias->defined()) {
    check_tensor(op, {b, &*bias}, scores[0].scalar_type(), {C});
  }
}

void check_image(const char* op, const std::vector<at::Tensor>& scores, const Named& image) {
  const at::Tensor& t = *image.second;
  TORCH_CHECK(t.dim() == 4 && t.size(2) >= 1 && t.size(3) >= 1 && t.size(3) < std::numeric_limits<int32_t>::max(), op,
              ": ", image.first, " must have shape (N, C, H, W) with H, W >= 1, got ", t.sizes());
  check_tensor(op, image, scores[0].scalar_type(), {scores[0].size(0), scores[0].size(1), t.size(2), t.size(3)});
}

// Outputs are written in parallel with no ordering, so none may share memory with another
// argument (each is contiguous, hence free of internal overlap).
void check_no_overlap(const char* op, const std::vector<Named>& outputs, const std::vector<Named>& inputs) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto& [name, out] = outputs[i];
    std::vector<Named> others(inputs);
    others.insert(others.end(), outputs.begin(), outputs.begin() + i);
    for (const auto& [other_name, other] : others) {
      const at::MemOverlapStatus status = at::get_overlap_status(*out, *other);
      TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", name,
                  " overlaps ", other_name);
    }
  }
}

std::vector<Named> named_list(const char* name, const std::vector<at::Tensor>& tensors) {
  std::vector<Named> named;
  for (size_t k = 0; k < tensors.size(); ++k) {
    named.emplace_back(std::string(name) + "[" + std::to_string(k) + "]", &tensors[k]);
  }
  return named;
}

// One task per (n, c) plane; work: multiply-adds per plane.
template <typename Args, typename Fn>
void run(Fn kernel, const Args& args, int64_t planes, int64_t work) {
  const int64_t grain = std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

template <typename Acc>
void fwd(FwdFn kernel, const std::vector<at::Tensor>& scores, const at::Tensor& weight,
         const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  const int64_t H = out.size(2), W = out.size(3);
  const Tables<Acc> tables = make_tables<Acc>(scores, H, W);
  const Plan plan{tables.layers.data(), static_cast<int64_t>(scores.size()), out.size(1), H, W,
                  weight.const_data_ptr()};
  const FwdArgs args{plan, bias.has_value() && bias->defined() ? bias->const_data_ptr() : nullptr,
                     out.mutable_data_ptr()};
  run(kernel, args, out.size(0) * out.size(1), 2 * plan.K * H * W);
}

template <typename Acc>
void bwd(BwdFn kernel, const at::Tensor& grad_out, const std::vector<at::Tensor>& scores, const at::Tensor& weight,
         const std::vector<at::Tensor>& grad_scores, const at::Tensor& grad_weight,
         const std::optional<at::Tensor>& grad_bias) {
  const int64_t N = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  const int64_t K = static_cast<int64_t>(scores.size());
  Tables<Acc> tables = make_tables<Acc>(scores, H, W);
  for (int64_t k = 0; k < K; ++k) {
    tables.layers[k].grad_scores = grad_scores[k].mutable_data_ptr();
  }
  const bool want_bias = grad_bias.has_value() && grad_bias->defined();
  const auto acc_options = grad_weight.options().dtype(c10::CppTypeToScalarType<Acc>::value);
  const at::Tensor weight_part = at::empty({N, C, K}, acc_options);
  const at::Tensor bias_part = want_bias ? at::empty({N, C}, acc_options) : at::Tensor();
  const Plan plan{tables.layers.data(), K, C, H, W, weight.const_data_ptr()};
  const BwdArgs args{plan, grad_out.const_data_ptr(), weight_part.mutable_data_ptr(),
                     want_bias ? bias_part.mutable_data_ptr() : nullptr};
  run(kernel, args, N * C, 2 * K * H * W);
  // A fixed order over n, whatever the threads did: the result is deterministic.
  grad_weight.copy_(weight_part.sum(0).t());
  if (want_bias) {
    grad_bias->copy_(bias_part.sum(0));
  }
}

void skip_fusion_fwd(const std::vector<at::Tensor>& scores, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  constexpr const char* op = "mtlfast_C::skip_fusion_fwd";
  check_scores(op, scores);
  check_weights(op, scores, weight, bias, "weight", "bias");
  check_image(op, scores, {"out", &out});
  std::vector<Named> inputs = named_list("scores", scores);
  inputs.emplace_back("weight", &weight);
  if (bias.has_value() && bias->defined()) {
    inputs.emplace_back("bias", &*bias);
  }
  check_no_overlap(op, {{"out", &out}}, inputs);
  const FwdFn kernel = dtype_kernels(op, out.scalar_type()).fwd;
  if (out.numel() == 0) {
    return;
  }
  if (out.scalar_type() == at::kDouble) {
    fwd<double>(kernel, scores, weight, bias, out);
  } else {
    fwd<float>(kernel, scores, weight, bias, out);
  }
}

void skip_fusion_bwd(const at::Tensor& grad_out, const std::vector<at::Tensor>& scores, const at::Tensor& weight,
                     const std::vector<at::Tensor>& grad_scores, const at::Tensor& grad_weight,
                     const std::optional<at::Tensor>& grad_bias) {
  constexpr const char* op = "mtlfast_C::skip_fusion_bwd";
  check_scores(op, scores);
  check_weights(op, scores, weight, std::nullopt, "weight", "");
  check_weights(op, scores, grad_weight, grad_bias, "grad_weight", "grad_bias");
  check_image(op, scores, {"grad_out", &grad_out});
  TORCH_CHECK(grad_scores.size() == scores.size(), op, ": grad_scores must hold ", scores.size(),
              " tensors like scores, got ", grad_scores.size());
  for (size_t k = 0; k < scores.size(); ++k) {
    check_tensor(op, {"grad_scores[" + std::to_string(k) + "]", &grad_scores[k]}, scores[k].scalar_type(),
                 scores[k].sizes());
  }
  std::vector<Named> inputs = named_list("scores", scores);
  inputs.emplace_back("weight", &weight);
  inputs.emplace_back("grad_out", &grad_out);
  std::vector<Named> outputs = named_list("grad_scores", grad_scores);
  outputs.emplace_back("grad_weight", &grad_weight);
  if (grad_bias.has_value() && grad_bias->defined()) {
    outputs.emplace_back("grad_bias", &*grad_bias);
  }
  check_no_overlap(op, outputs, inputs);
  const BwdFn kernel = dtype_kernels(op, grad_out.scalar_type()).bwd;
  if (grad_out.numel() == 0) {
    for (const auto& [name, t] : outputs) {
      t->zero_();
    }
    return;
  }
  if (grad_out.scalar_type() == at::kDouble) {
    bwd<double>(kernel, grad_out, scores, weight, grad_scores, grad_weight, grad_bias);
  } else {
    bwd<float>(kernel, grad_out, scores, weight, grad_scores, grad_weight, grad_bias);
  }
}

}  // namespace
}  // namespace mtlfast::cpu::skip_fusion

TORCH_LIBRARY_IMPL(mtlfast_C, CPU, m) {
  m.impl("skip_fusion_fwd", &mtlfast::cpu::skip_fusion::skip_fusion_fwd);
  m.impl("skip_fusion_bwd", &mtlfast::cpu::skip_fusion::skip_fusion_bwd);
}
