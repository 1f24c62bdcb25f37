// The skip_fusion kernels, compiled once per instruction set: included by exactly one translation
// unit per ISA (skip_fusion_default.cpp, isa/skip_fusion_<isa>.cpp), which first defines
// CPU_CAPABILITY (the namespace of its copy) and CPU_CAPABILITY_<ISA> the way ATen does, so that
// at::vec below resolves to that instruction set's Vectorized specialisations.
//
//   out[n,c] = bias[c] + sum_k weight[k,c] * (Ry_k  scores[k][n,c]  Rx_k^T)
//
// with Ry_k, Rx_k the bilinear resampling matrices of the two axes (two taps per output row).
// Bilinear resampling is separable, so each plane is done row by row: a source row is resampled
// along x once (Resampler) and kept while the output rows within its reach use it; the sum over
// layers along y is then pure vector arithmetic. Every input is read once and every output
// written once; the full-resolution per-layer maps never exist, only two resampled rows per
// layer. The backward runs the same two steps transposed, in reverse order: the y adjoint
// accumulates grad_out rows into two rows per layer, and each finished row goes through the x
// adjoint (a Resampler too, by the table of output columns that sample each source column).
#pragma once

#include <algorithm>
#include <functional>
#include <vector>

#include "cpu/skip_fusion_rows.h"

namespace mtlfast::cpu::skip_fusion::CPU_CAPABILITY {
namespace {

// The taps of position i of a two-tap table (the sampling of rows along y).
template <typename Acc>
struct TwoTaps {
  int64_t i0, i1;
  Acc l0, l1;

  TwoTaps(const Taps& t, int64_t i) {
    const auto* index = static_cast<const IndexOf<Acc>*>(t.index);
    const auto* weight = static_cast<const Acc*>(t.weight);
    i0 = index[i];
    i1 = index[t.stride + i];
    l0 = weight[i];
    l1 = weight[t.stride + i];
  }
};

// A row of T as accumulation-type values: the row itself when T is the accumulation type, else
// converted into buf (padded, zeros past len).
template <typename T>
const at::opmath_type<T>* as_acc(const T* row, int64_t len, at::opmath_type<T>* buf) {
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    return row;
  } else {
    using St = Step<T>;
    for_each_step<St::kStep>(len, [&](int64_t i, int64_t count) {
      const auto [a, b] = St::load(row + i, count);
      a.store(buf + i);
      b.store(buf + i + St::V::size());
    });
    return buf;
  }
}

template <typename Acc>
Acc sum_all(const Vectorized<Acc>& v) {
  return at::vec::vec_reduce_all<Acc>(std::plus<Vectorized<Acc>>(), v);
}

// Per layer, two rows of one plane's layer in flight: source row i lives in slot i % 2, a
// sampling position always spans rows i and i + 1. held says which row a slot holds (-1: none).
template <typename Acc>
class Rows {
 public:
  Rows(int64_t K, int64_t len) : len_(len), data_(2 * K * len), held_(2 * K) {}

  void clear() { std::fill(held_.begin(), held_.end(), -1); }
  Acc* slot(int64_t k, int64_t row) { return data_.data() + (2 * k + (row & 1)) * len_; }
  int64_t& held(int64_t k, int64_t row) { return held_[2 * k + (row & 1)]; }

 private:
  int64_t len_;
  Buffer<Acc> data_;
  std::vector<int64_t> held_;
};

int64_t widest_layer(const Plan& p) {
  int64_t w = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    w = std::max(w, p.layers[k].W);
  }
  return w;
}

template <typename T>
void fwd(const FwdArgs& a, int64_t begin, int64_t end) {
  using St = Step<T>;
  using Acc = typename St::Acc;
  using V = typename St::V;
  const Plan& p = a.plan;
  const T* weight = static_cast<const T*>(p.weight);
  std::vector<Resampler<Acc>> cols;
  Scratch<Acc> scratch;
  int64_t row_len = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    cols.emplace_back(p.layers[k].cols, p.layers[k].W);
    row_len = std::max(row_len, cols[k].out_len());
    scratch.a.grow(cols[k].scratch_len());
    scratch.b.grow(cols[k].scratch_len());
  }
  Rows<Acc> rows(p.K, row_len);
  Buffer<Acc> src(padded(widest_layer(p)));
  // Per layer, this output row's two resampled source rows and their coefficients.
  std::vector<const Acc*> row0(p.K), row1(p.K);
  std::vector<Acc> coef0(p.K), coef1(p.K);

  // Source row i of layer k in the plane, resampled along x (computed once, while in reach).
  const auto resampled = [&](int64_t item, int64_t k, int64_t i) -> const Acc* {
    Acc* slot = rows.slot(k, i);
    int64_t& held = rows.held(k, i);
    if (held != i) {
      const Layer& l = p.layers[k];
      cols[k](as_acc(static_cast<const T*>(l.scores) + (item * l.H + i) * l.W, l.W, src.data()), slot, scratch);
      held = i;
    }
    return slot;
  };

  for (int64_t item = begin; item < end; ++item) {
    const int64_t c = item % p.C;
    const V bias(a.bias ? Acc(static_cast<const T*>(a.bias)[c]) : Acc(0));
    rows.clear();
    for (int64_t y = 0; y < p.H; ++y) {
      for (int64_t k = 0; k < p.K; ++k) {
        const TwoTaps<Acc> ry(p.layers[k].rows, y);
        const Acc w(weight[k * p.C + c]);
        row0[k] = resampled(item, k, ry.i0);
        row1[k] = resampled(item, k, ry.i1);
        coef0[k] = w * ry.l0;
        coef1[k] = w * ry.l1;
      }
      T* out = static_cast<T*>(a.out) + (item * p.H + y) * p.W;
      for_each_step<St::kStep>(p.W, [&](int64_t x, int64_t count) {
        V acc0 = bias;
        V acc1 = bias;
        for (int64_t k = 0; k < p.K; ++k) {
          const V c0(coef0[k]);
          const V c1(coef1[k]);
          acc0 = at::vec::fmadd(c0, V::loadu(row0[k] + x), acc0);
          acc1 = at::vec::fmadd(c0, V::loadu(row0[k] + x + V::size()), acc1);
          acc0 = at::vec::fmadd(c1, V::loadu(row1[k] + x), acc0);
          acc1 = at::vec::fmadd(c1, V::loadu(row1[k] + x + V::size()), acc1);
        }
        St::store(out + x, acc0, acc1, count);
      });
    }
  }
}

template <typename T>
void bwd(const BwdArgs& a, int64_t begin, int64_t end) {
  using St = Step<T>;
  using Acc = typename St::Acc;
  using AccSt = Step<Acc>;
  using V = typename St::V;
  const Plan& p = a.plan;
  const T* weight = static_cast<const T*>(p.weight);
  // Accumulated rows have one more element, always zero, at index W: the x adjoint's padding
  // taps point there, so that they add exact zeros whatever the gradient holds.
  Rows<Acc> rows(p.K, padded(p.W + 1));
  std::vector<Resampler<Acc>> cols_adjoint;
  Scratch<Acc> scratch;
  int64_t adjoint_len = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    cols_adjoint.emplace_back(p.layers[k].cols_adjoint, p.W + 1);
    adjoint_len = std::max(adjoint_len, cols_adjoint[k].out_len());
    scratch.a.grow(cols_adjoint[k].scratch_len());
    scratch.b.grow(cols_adjoint[k].scratch_len());
  }
  Buffer<Acc> grad_row(padded(p.W)), adjoint(adjoint_len);
  std::vector<int64_t> next(p.K);  // per layer, the first source row not yet written
  std::vector<Acc> grad_weight(p.K);

  // Source row r of layer k is complete: write its gradient and add its share of grad_weight.
  const auto finish = [&](int64_t item, int64_t k, int64_t r) {
    const Layer& l = p.layers[k];
    const int64_t offset = (item * l.H + r) * l.W;
    T* out = static_cast<T*>(l.grad_scores) + offset;
    int64_t& held = rows.held(k, r);
    if (held != r) {  // no output row samples it (downsampling)
      for_each_step<St::kStep>(l.W, [&](int64_t j, int64_t count) { St::store(out + j, V(Acc(0)), V(Acc(0)), count); });
      return;
    }
    cols_adjoint[k](rows.slot(k, r), adjoint.data(), scratch);
    held = -1;
    const V w(Acc(weight[k * p.C + (item % p.C)]));
    const T* scores = static_cast<const T*>(l.scores) + offset;
    V dot0(Acc(0)), dot1(Acc(0));
    for_each_step<St::kStep>(l.W, [&](int64_t j, int64_t count) {
      const auto [a0, a1] = AccSt::load(adjoint.data() + j, count);
      const auto [s0, s1] = St::load(scores + j, count);
      dot0 = at::vec::fmadd(a0, s0, dot0);
      dot1 = at::vec::fmadd(a1, s1, dot1);
      St::store(out + j, w * a0, w * a1, count);
    });
    grad_weight[k] += sum_all(dot0 + dot1);
  };
  // Source row r of layer k, about to receive its first contribution when not yet held.
  const auto open = [&](int64_t item, int64_t k, int64_t r) {
    Acc* slot = rows.slot(k, r);
    int64_t& held = rows.held(k, r);
    if (held != r) {
      std::fill_n(slot, padded(p.W + 1), Acc(0));
      held = r;
      // finish reads and writes this row a few output rows from now; the hardware prefetchers
      // miss it, as the rows of a small layer are visited once every few output rows.
      const Layer& l = p.layers[k];
      const int64_t offset = (item * l.H + r) * l.W;
      for (int64_t j = 0; j < l.W; j += 64 / sizeof(T)) {
        __builtin_prefetch(static_cast<const T*>(l.scores) + offset + j, 0);
        __builtin_prefetch(static_cast<T*>(l.grad_scores) + offset + j, 1);
      }
    }
    return slot;
  };

  for (int64_t item = begin; item < end; ++item) {
    rows.clear();
    std::fill(next.begin(), next.end(), 0);
    std::fill(grad_weight.begin(), grad_weight.end(), Acc(0));
    V grad_sum(Acc(0));
    for (int64_t y = 0; y < p.H; ++y) {
      const Acc* g = as_acc(static_cast<const T*>(a.grad_out) + (item * p.H + y) * p.W, p.W, grad_row.data());
      for_each_step<AccSt::kStep>(p.W, [&](int64_t x, int64_t count) {
        const auto [g0, g1] = AccSt::load(g + x, count);
        grad_sum += g0 + g1;
      });
      for (int64_t k = 0; k < p.K; ++k) {
        const TwoTaps<Acc> ry(p.layers[k].rows, y);
        const int64_t r0 = ry.i0;
        const int64_t r1 = ry.i1;
        // Sampling positions move down monotonically, so rows above r0 get nothing more.
        for (; next[k] < r0; ++next[k]) {
          finish(item, k, next[k]);
        }
        Acc* acc0 = open(item, k, r0);
        Acc* acc1 = open(item, k, r1);
        const V l0(ry.l0);
        const V l1(ry.l1);
        // acc0 and acc1 are the same row when r0 == r1: each is stored before the other is read.
        for_each_step<AccSt::kStep>(p.W, [&](int64_t x, int64_t count) {
          const auto [g0, g1] = AccSt::load(g + x, count);
          auto [a0, a1] = AccSt::load(acc0 + x, count);
          AccSt::store(acc0 + x, at::vec::fmadd(l0, g0, a0), at::vec::fmadd(l0, g1, a1), count);
          auto [b0, b1] = AccSt::load(acc1 + x, count);
          AccSt::store(acc1 + x, at::vec::fmadd(l1, g0, b0), at::vec::fmadd(l1, g1, b1), count);
        });
      }
    }
    Acc* grad_weight_part = static_cast<Acc*>(a.grad_weight_part) + item * p.K;
    for (int64_t k = 0; k < p.K; ++k) {
      for (; next[k] < p.layers[k].H; ++next[k]) {
        finish(item, k, next[k]);
      }
      grad_weight_part[k] = grad_weight[k];
    }
    if (a.grad_bias_part) {
      static_cast<Acc*>(a.grad_bias_part)[item] = sum_all(grad_sum);
    }
  }
}

}  // namespace

IsaKernels kernels() {
  return {
      {fwd<float>, bwd<float>},
      {fwd<double>, bwd<double>},
      {fwd<c10::Half>, bwd<c10::Half>},
      {fwd<c10::BFloat16>, bwd<c10::BFloat16>},
  };
}

}  // namespace mtlfast::cpu::skip_fusion::CPU_CAPABILITY
