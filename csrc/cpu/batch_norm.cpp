#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/batch_norm.h"
#include "cpu/dispatch.h"

namespace mtlfast::cpu::batch_norm {
namespace {

const Kernels& isa_kernels() {
  static const Kernels table = MTLFAST_ISA_TABLE(kernels);
  return table;
}

const DtypeKernels& dtype_kernels(const char* op, at::ScalarType dtype) {
  return for_float_dtype(isa_kernels(), op, dtype);
}

// Rows of channels-last data per chunk of a sum: each chunk's partial sums are added in a fixed
// order afterwards, so the result does not depend on the thread count.
constexpr int64_t kRowChunk = 1024;

bool channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// x in a layout the kernels take: NCHW-contiguous, or channels-last-contiguous (kept as it is).
at::Tensor dense(const at::Tensor& x) {
  return x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
}

Shape shape_of(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3)};
}

void check_input(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.layout() == at::kStrided, op, ": ", name, " must be a strided CPU tensor, got ",
              x.device());
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-d (N, C, H, W), got shape ", x.sizes());
}

// A (C,) parameter as doubles (`fill` where absent).
std::vector<double> channel_values(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t C,
                                   at::ScalarType dtype, double fill) {
  std::vector<double> out(static_cast<size_t>(C), fill);
  if (!t.has_value() || !t->defined()) {
    return out;
  }
  TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->size(0) == C && t->scalar_type() == dtype, op, ": ", name,
              " must be a CPU (", C, ",) tensor of x's dtype ", dtype, ", got ", t->scalar_type(), " ", t->sizes());
  const at::Tensor d = t->to(at::kDouble).contiguous();
  std::copy(d.const_data_ptr<double>(), d.const_data_ptr<double>() + C, out.begin());
  return out;
}

at::Tensor from_doubles(const std::vector<double>& v, const at::TensorOptions& options) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, options.dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
  return t.to(options.dtype());
}

// Channels-last sums over all rows: `kernel(acc, begin, end)` per chunk of rows into its own
// `width` doubles, then the chunks added in order.
template <typename Fn>
std::vector<double> row_sums(int64_t rows, int64_t width, Fn kernel) {
  const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
  std::vector<double> parts(static_cast<size_t>(chunks * width), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      kernel(parts.data() + i * width, i * kRowChunk, std::min(rows, (i + 1) * kRowChunk));
    }
  });
  std::vector<double> total(static_cast<size_t>(width), 0.0);
  for (int64_t i = 0; i < chunks; ++i) {
    for (int64_t j = 0; j < width; ++j) {
      total[j] += parts[i * width + j];
    }
  }
  return total;
}

int64_t channel_grain(const Shape& s) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.N * s.P));
}

int64_t row_grain(const Shape& s) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.C));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_train(const at::Tensor& x_,
                                                                            const std::optional<at::Tensor>& weight,
                                                                            const std::optional<at::Tensor>& bias,
                                                                            double eps) {
  constexpr const char* op = "mtlfast_C::batch_norm_train";
  check_input(op, "x", x_);
  const DtypeKernels& k = dtype_kernels(op, x_.scalar_type());
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  const at::Tensor x = dense(x_);
  const Shape s = shape_of(x);
  TORCH_CHECK(s.N * s.P > 1, op, ": expected more than 1 value per channel when training, got input of shape ",
              x.sizes());
  const std::vector<double> w = channel_values(op, "weight", weight, s.C, x.scalar_type(), 1.0);
  const std::vector<double> b = channel_values(op, "bias", bias, s.C, x.scalar_type(), 0.0);
  std::vector<double> mean(static_cast<size_t>(s.C)), var(static_cast<size_t>(s.C));
  const bool cl = channels_last(x);
  const void* xp = x.const_data_ptr();
  const int64_t rows = s.N * s.P;
  if (cl) {
    // the first pixel's values as the pivot of each channel's moments
    const at::Tensor first = x.select(0, 0).select(1, 0).select(1, 0).to(at::kDouble).contiguous();
    const double* pivot = first.const_data_ptr<double>();
    const std::vector<double> sums = row_sums(rows, 2 * s.C, [&](double* acc, int64_t b0, int64_t e0) {
      k.moments_cl(xp, pivot, acc, s, b0, e0);
    });
    for (int64_t c = 0; c < s.C; ++c) {
      const double offset = sums[c] / static_cast<double>(rows);
      mean[c] = pivot[c] + offset;
      var[c] = std::max(0.0, sums[s.C + c] / static_cast<double>(rows) - offset * offset);
    }
  } else {
    at::parallel_for(0, s.C, channel_grain(s),
                     [&](int64_t b0, int64_t e0) { k.stats_nchw(xp, s, mean.data(), var.data(), b0, e0); });
  }
  // out = (x - mean) * scale + b: no cancellation of x * scale against a shift of -mean * scale
  std::vector<double> invstd(static_cast<size_t>(s.C)), scale(invstd.size());
  for (int64_t c = 0; c < s.C; ++c) {
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    scale[c] = invstd[c] * w[c];
  }
  at::Tensor out = at::empty_like(x);
  void* outp = out.mutable_data_ptr();
  if (cl) {
    at::parallel_for(0, rows, row_grain(s),
                     [&](int64_t b0, int64_t e0) { k.affine_cl(xp, mean.data(), scale.data(), b.data(), outp, s, b0, e0); });
  } else {
    at::parallel_for(0, s.C, channel_grain(s),
                     [&](int64_t b0, int64_t e0) { k.affine_nchw(xp, mean.data(), scale.data(), b.data(), outp, s, b0, e0); });
  }
  const at::TensorOptions opts = x.options();
  return {out, from_doubles(mean, opts), from_doubles(invstd, opts), from_doubles(var, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_backward(const at::Tensor& grad_, const at::Tensor& x_,
                                                                         const std::optional<at::Tensor>& weight,
                                                                         const at::Tensor& mean_,
                                                                         const at::Tensor& invstd_) {
  constexpr const char* op = "mtlfast_C::batch_norm_train_backward";
  check_input(op, "x", x_);
  check_input(op, "grad_out", grad_);
  TORCH_CHECK(grad_.sizes() == x_.sizes() && grad_.scalar_type() == x_.scalar_type(), op,
              ": grad_out must match x's shape and dtype ", x_.sizes(), ", got ", grad_.sizes(), " ",
              grad_.scalar_type());
  const DtypeKernels& k = dtype_kernels(op, x_.scalar_type());
  const at::Tensor x = dense(x_);
  const bool cl = channels_last(x);
  // grad in x's layout, so that one index walks both
  const at::Tensor grad = cl ? grad_.contiguous(at::MemoryFormat::ChannelsLast) : grad_.contiguous();
  const Shape s = shape_of(x);
  const std::vector<double> w = channel_values(op, "weight", weight, s.C, x.scalar_type(), 1.0);
  const std::vector<double> mean = channel_values(op, "mean", mean_, s.C, x.scalar_type(), 0.0);
  const std::vector<double> invstd = channel_values(op, "invstd", invstd_, s.C, x.scalar_type(), 0.0);
  const void* gp = grad.const_data_ptr();
  const void* xp = x.const_data_ptr();
  const int64_t rows = s.N * s.P;
  std::vector<double> sum_g(static_cast<size_t>(s.C), 0.0), sum_gx(sum_g.size(), 0.0);
  if (cl) {
    const std::vector<double> sums = row_sums(rows, 2 * s.C, [&](double* acc, int64_t b0, int64_t e0) {
      k.grad_sums_cl(gp, xp, mean.data(), acc, s, b0, e0);
    });
    std::copy(sums.begin(), sums.begin() + s.C, sum_g.begin());
    std::copy(sums.begin() + s.C, sums.end(), sum_gx.begin());
  } else {
    at::parallel_for(0, s.C, channel_grain(s), [&](int64_t b0, int64_t e0) {
      k.grad_sums_nchw(gp, xp, mean.data(), sum_g.data(), sum_gx.data(), s, b0, e0);
    });
  }
  at::Tensor grad_x;
  {
    // gx = w * invstd * (g - sum_g / M - (x - mean) * invstd^2 * sum_gx / M) = g * a + (x - mean) * b + d
    std::vector<double> a(sum_g.size()), b(sum_g.size()), d(sum_g.size());
    const double count = static_cast<double>(rows);
    for (int64_t c = 0; c < s.C; ++c) {
      a[c] = w[c] * invstd[c];
      b[c] = -a[c] * invstd[c] * invstd[c] * sum_gx[c] / count;
      d[c] = -a[c] * sum_g[c] / count;
    }
    grad_x = at::empty_like(x);
    void* gxp = grad_x.mutable_data_ptr();
    if (cl) {
      at::parallel_for(0, rows, row_grain(s), [&](int64_t b0, int64_t e0) {
        k.grad_x_cl(gp, xp, mean.data(), a.data(), b.data(), d.data(), gxp, s, b0, e0);
      });
    } else {
      at::parallel_for(0, s.C, channel_grain(s), [&](int64_t b0, int64_t e0) {
        k.grad_x_nchw(gp, xp, mean.data(), a.data(), b.data(), d.data(), gxp, s, b0, e0);
      });
    }
  }
  std::vector<double> gw(sum_gx.size());
  for (int64_t c = 0; c < s.C; ++c) {
    gw[c] = sum_gx[c] * invstd[c];
  }
  return {grad_x, from_doubles(gw, x.options()), from_doubles(sum_g, x.options())};
}

}  // namespace
}  // namespace mtlfast::cpu::batch_norm

TORCH_LIBRARY_IMPL(mtlfast_C, CPU, m) {
  m.impl("batch_norm_train", &mtlfast::cpu::batch_norm::batch_norm_train);
  m.impl("batch_norm_train_backward", &mtlfast::cpu::batch_norm::batch_norm_train_backward);
}
