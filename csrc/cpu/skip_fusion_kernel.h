// The skip_fusion kernels, compiled once per instruction set: included by exactly one translation
// unit per ISA (skip_fusion_default.cpp, isa/skip_fusion_<isa>.cpp), which first defines
// CPU_CAPABILITY (the namespace of its copy) and CPU_CAPABILITY_<ISA> the way ATen does, so that
// at::vec below resolves to that instruction set's Vectorized specialisations.
//
//   out[n,c] = bias[c] + sum_k weight[k,c] * (Ry_k  scores[k][n,c]  Rx_k^T)
//
// with Ry_k, Rx_k the bilinear resampling matrices of the two axes (two taps per output row).
// Bilinear resampling is separable, so each plane is done row by row: a source row resampled
// along x is a gather (2 taps per output column) that every output row within its reach reuses;
// the sum over layers along y is then pure vector arithmetic. Every input is read once and every
// output written once; the full-resolution per-layer maps never exist, only two resampled rows
// per layer. The backward runs the same two steps transposed, in reverse order: the y adjoint
// accumulates grad_out rows into two rows per layer, and each finished row goes through the x
// adjoint (a gather too, over the output columns that sample each source column).
#pragma once

// at::vec's headers trip GCC warnings that are noise here: the AVX512 intrinsics' self-initialised
// placeholder vectors read as maybe uninitialised, and -Wpsabi flags lambda thunks (compiled
// without the target pragma) of operators this file never uses.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/skip_fusion.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) before including skip_fusion_kernel.h"
#endif

namespace mtlfast::cpu::skip_fusion::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Loads and stores of one step: two accumulation vectors, i.e. one full Vectorized<T> for
// fp16/bf16, converted to and from fp32. count < kStep only on the tail of a row; partial loads
// fill the missing lanes with zeros.
template <typename T>
struct Step {
  using Acc = at::opmath_type<T>;
  using V = Vectorized<Acc>;
  static constexpr int64_t kStep = 2 * V::size();
  static_assert(kPadElems % kStep == 0, "padded rows must hold whole steps");

  static std::tuple<V, V> load(const T* p, int64_t count) {
    if constexpr (at::vec::is_reduced_floating_point_v<T>) {
      return at::vec::convert_to_float<T>(count >= kStep ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, count));
    } else {
      if (count >= kStep) {
        return {V::loadu(p), V::loadu(p + V::size())};
      }
      if (count <= V::size()) {
        return {V::loadu(p, count), V(Acc(0))};
      }
      return {V::loadu(p), V::loadu(p + V::size(), count - V::size())};
    }
  }

  static void store(T* p, const V& a, const V& b, int64_t count) {
    if constexpr (at::vec::is_reduced_floating_point_v<T>) {
      const Vectorized<T> r = at::vec::convert_from_float<T>(a, b);
      count >= kStep ? r.store(p) : r.store(p, count);
    } else if (count >= kStep) {
      a.store(p);
      b.store(p + V::size());
    } else if (count <= V::size()) {
      a.store(p, count);
    } else {
      a.store(p);
      b.store(p + V::size(), count - V::size());
    }
  }
};

// Calls step(p, count) over [0, len): full steps, then one partial step. Once step is inlined,
// count is a constant in the main loop and the tail branches of Step fold away there.
template <int64_t K, typename F>
inline void for_each_step(int64_t len, const F& step) {
  int64_t p = 0;
  for (; p + K <= len; p += K) {
    step(p, K);
  }
  if (p < len) {
    step(p, len - p);
  }
}

template <typename Acc>
struct TapsOf {
  using Index = IndexOf<Acc>;
  static_assert(std::is_same_v<Index, at::vec::int_same_size_t<Acc>>, "tables hold at::vec's gather index type");
  const Index* index;
  const Acc* weight;
  int64_t taps, stride;

  explicit TapsOf(const Taps& t)
      : index(static_cast<const Index*>(t.index)),
        weight(static_cast<const Acc*>(t.weight)),
        taps(t.taps),
        stride(t.stride) {}
};

// out[i] = sum_m weight[m][i] * in[index[m][i]] over the whole padded length.
template <typename Acc>
void resample(const TapsOf<Acc>& t, const Acc* in, Acc* out) {
  using V = Vectorized<Acc>;
  using VI = Vectorized<IndexOf<Acc>>;
  static_assert(VI::size() == V::size(), "one gather index per lane");
  for (int64_t i = 0; i < t.stride; i += V::size()) {
    V acc = V::loadu(t.weight + i) * at::vec::gather<sizeof(Acc)>(in, VI::loadu(t.index + i));
    for (int64_t m = 1; m < t.taps; ++m) {
      const int64_t tap = m * t.stride + i;
      acc = at::vec::fmadd(V::loadu(t.weight + tap), at::vec::gather<sizeof(Acc)>(in, VI::loadu(t.index + tap)), acc);
    }
    acc.store(out + i);
  }
}

// An axis of equal sizes: PyTorch samples it as 1 * in[i] + 0 * in[i], which is in[i] except that
// infinities become NaN; fma(in, 0, in) is that same value, without the gathers.
template <typename Acc>
void resample_identity(const Acc* in, Acc* out, int64_t len) {
  using St = Step<Acc>;
  const typename St::V zero(Acc(0));
  for_each_step<St::kStep>(len, [&](int64_t i, int64_t count) {
    const auto [a, b] = St::load(in + i, count);
    St::store(out + i, at::vec::fmadd(a, zero, a), at::vec::fmadd(b, zero, b), count);
  });
}

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
  std::vector<Acc> data_;
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
  Rows<Acc> rows(p.K, padded(p.W));
  std::vector<Acc> src(padded(widest_layer(p)));
  // Per layer, this output row's two resampled source rows and their coefficients.
  std::vector<const Acc*> row0(p.K), row1(p.K);
  std::vector<Acc> coef0(p.K), coef1(p.K);

  // Source row i of layer k in the plane, resampled along x (computed once, while in reach).
  const auto resampled = [&](int64_t item, int64_t k, int64_t i) -> const Acc* {
    Acc* slot = rows.slot(k, i);
    int64_t& held = rows.held(k, i);
    if (held != i) {
      const Layer& l = p.layers[k];
      const Acc* in = as_acc(static_cast<const T*>(l.scores) + (item * l.H + i) * l.W, l.W, src.data());
      l.W == p.W ? resample_identity(in, slot, l.W) : resample(TapsOf<Acc>(l.cols), in, slot);
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
        const TapsOf<Acc> ry(p.layers[k].rows);
        const Acc w(weight[k * p.C + c]);
        row0[k] = resampled(item, k, ry.index[y]);
        row1[k] = resampled(item, k, ry.index[ry.stride + y]);
        coef0[k] = w * ry.weight[y];
        coef1[k] = w * ry.weight[ry.stride + y];
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
  std::vector<Acc> grad_row(padded(p.W)), adjoint(padded(widest_layer(p)));
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
    const Acc* acc = rows.slot(k, r);
    l.W == p.W ? resample_identity(acc, adjoint.data(), l.W) : resample(TapsOf<Acc>(l.cols_adjoint), acc, adjoint.data());
    held = -1;
    const V w(Acc(weight[k * p.C + (item % p.C)]));
    const T* scores = static_cast<const T*>(l.scores) + offset;
    V dot0(Acc(0)), dot1(Acc(0));
    for_each_step<St::kStep>(l.W, [&](int64_t j, int64_t count) {
      const V a0 = V::loadu(adjoint.data() + j);
      const V a1 = V::loadu(adjoint.data() + j + V::size());
      const auto [s0, s1] = St::load(scores + j, count);
      dot0 = at::vec::fmadd(a0, s0, dot0);
      dot1 = at::vec::fmadd(a1, s1, dot1);
      St::store(out + j, w * a0, w * a1, count);
    });
    grad_weight[k] += sum_all(dot0 + dot1);
  };
  // Source row r of layer k, about to receive its first contribution when not yet held.
  const auto open = [&](int64_t k, int64_t r) {
    Acc* slot = rows.slot(k, r);
    int64_t& held = rows.held(k, r);
    if (held != r) {
      std::fill_n(slot, padded(p.W + 1), Acc(0));
      held = r;
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
        const TapsOf<Acc> ry(p.layers[k].rows);
        const int64_t r0 = ry.index[y];
        const int64_t r1 = ry.index[ry.stride + y];
        // Sampling positions move down monotonically, so rows above r0 get nothing more.
        for (; next[k] < r0; ++next[k]) {
          finish(item, k, next[k]);
        }
        Acc* acc0 = open(k, r0);
        Acc* acc1 = open(k, r1);
        const V l0(ry.weight[y]);
        const V l1(ry.weight[ry.stride + y]);
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
