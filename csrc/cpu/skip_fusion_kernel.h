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
#include <cstdint>
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

// A zero-initialised array aligned to 64 bytes, the widest vector: whole-vector accesses at
// multiples of the vector size then never straddle cache lines, which would also defeat store to
// load forwarding between the passes over a row.
template <typename Acc>
class Buffer {
 public:
  explicit Buffer(int64_t len = 0) { grow(len); }

  // Makes room for at least len elements (contents are not kept).
  void grow(int64_t len) {
    if (len > len_) {
      storage_.assign(len + kAlign, Acc(0));
      const auto address = reinterpret_cast<uintptr_t>(storage_.data());
      data_ = storage_.data() + (kAlign - address / sizeof(Acc) % kAlign) % kAlign;
      len_ = len;
    }
  }
  Acc* data() { return data_; }

 private:
  static constexpr int64_t kAlign = 64 / sizeof(Acc);
  std::vector<Acc> storage_;
  Acc* data_ = nullptr;
  int64_t len_ = -1;
};

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

// Splitting a row into n phases by halving leaves phase p in row bit_reversed(p, n) (n a power of
// two); merging takes them from there.
inline int64_t bit_reversed(int64_t p, int64_t n) {
  int64_t r = 0;
  for (int64_t bit = 1; bit < n; bit <<= 1) {
    r = (r << 1) | ((p & bit) ? 1 : 0);
  }
  return r;
}

// rows rows of len elements, each split into its even then its odd elements (rows of len / 2).
template <typename Acc>
void deinterleave_rows(const Acc* src, Acc* dst, int64_t rows, int64_t len) {
  using V = Vectorized<Acc>;
  const int64_t half = len / 2;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < half; i += V::size()) {
      const Acc* from = src + r * len + 2 * i;
      const auto [even, odd] = at::vec::deinterleave2(V::loadu(from), V::loadu(from + V::size()));
      even.store(dst + 2 * r * half + i);
      odd.store(dst + (2 * r + 1) * half + i);
    }
  }
}

// The inverse: rows pairs of rows of len elements, each pair interleaved into a row of 2 * len.
template <typename Acc>
void interleave_rows(const Acc* src, Acc* dst, int64_t rows, int64_t len) {
  using V = Vectorized<Acc>;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < len; i += V::size()) {
      const auto [first, second] =
          at::vec::interleave2(V::loadu(src + 2 * r * len + i), V::loadu(src + (2 * r + 1) * len + i));
      first.store(dst + 2 * r * len + 2 * i);
      second.store(dst + 2 * r * len + 2 * i + V::size());
    }
  }
}

// Two rows that the periodic resampling ping-pongs between, shared by a thread's resamplers.
template <typename Acc>
struct Scratch {
  Buffer<Acc> a, b;
};

// Resampling of rows by one table (see Taps), set up once per call. Three ways, the same values:
//  - equal sizes (period = step = 1): PyTorch samples the axis as 1 * in[i] + 0 * in[i], which is
//    in[i] except that infinities become NaN; fma(in, 0, in) is that same value;
//  - periodic tables: with P = period and Q = step, output phase p, out[P * t + p], reads the input
//    phases in[Q * (t + e) + c] at an e and c fixed per tap. So the input is split into Q phase
//    rows, each output phase is computed with contiguous loads (in the order of operations of the
//    gathers), and the P output phases are merged; the clamped ends, outside [lo, hi), are then
//    redone from the table;
//  - otherwise gathers.
template <typename Acc>
class Resampler {
  using V = Vectorized<Acc>;
  using VI = Vectorized<IndexOf<Acc>>;
  static_assert(std::is_same_v<IndexOf<Acc>, at::vec::int_same_size_t<Acc>>, "tables hold at::vec's gather index");
  static_assert(VI::size() == V::size(), "one gather index per lane");

 public:
  Resampler(const Taps& taps, int64_t in_len)
      : taps_(taps),
        index_(static_cast<const IndexOf<Acc>*>(taps.index)),
        weight_(static_cast<const Acc*>(taps.weight)),
        in_len_(in_len) {
    if (taps.period == 0 || identity()) {
      return;
    }
    const int64_t P = taps.period, Q = taps.step;
    // Phase rows: the longest phase and one element of margin on each side, in whole vectors.
    const int64_t longest = std::max((taps.len + P - 1) / P, (in_len + Q - 1) / Q);
    n_ = (longest + 2 + V::size() - 1) / V::size() * V::size();
    const int64_t t0 = (taps.lo + P - 1) / P;  // a whole period inside [lo, hi)
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t m = 0; m < taps.phase_taps[p]; ++m) {
        const int64_t tap = m * taps.stride + P * t0 + p;
        const int64_t d = index_[tap] - Q * t0;
        const int64_t e = d < 0 ? -1 : d / Q;  // floor(d / Q), within [-1, 1]
        phase_src_.push_back(bit_reversed(d - e * Q, Q) * n_ + 1 + e);
        phase_weight_.push_back(weight_[tap]);
      }
      phase_end_.push_back(static_cast<int64_t>(phase_src_.size()));
    }
  }

  // Elements that the output row and each scratch row must hold.
  int64_t out_len() const { return std::max(padded(taps_.len), taps_.period * n_); }
  // Loads run up to two elements past the last phase row.
  int64_t scratch_len() const { return std::max(taps_.period, taps_.step) * n_ + V::size(); }

  void operator()(const Acc* in, Acc* out, Scratch<Acc>& s) const {
    if (identity()) {
      copy_exact(in, out);
    } else if (n_ > 0) {
      periodic(in, out, s);
    } else {
      gather(in, out);
    }
  }

 private:
  bool identity() const { return taps_.period == 1 && taps_.step == 1; }

  void copy_exact(const Acc* in, Acc* out) const {
    using St = Step<Acc>;
    const V zero(Acc(0));
    for_each_step<St::kStep>(taps_.len, [&](int64_t i, int64_t count) {
      const auto [a, b] = St::load(in + i, count);
      St::store(out + i, at::vec::fmadd(a, zero, a), at::vec::fmadd(b, zero, b), count);
    });
  }

  void gather(const Acc* in, Acc* out) const {
    const int64_t stride = taps_.stride;
    for (int64_t i = 0; i < stride; i += V::size()) {
      V acc = V::loadu(weight_ + i) * at::vec::gather<sizeof(Acc)>(in, VI::loadu(index_ + i));
      for (int64_t m = 1; m < taps_.taps; ++m) {
        const int64_t tap = m * stride + i;
        acc = at::vec::fmadd(V::loadu(weight_ + tap), at::vec::gather<sizeof(Acc)>(in, VI::loadu(index_ + tap)), acc);
      }
      acc.store(out + i);
    }
  }

  void periodic(const Acc* in, Acc* out, Scratch<Acc>& s) const {
    const int64_t P = taps_.period, Q = taps_.step;
    Acc* cur = s.a.data();
    Acc* spare = s.b.data();
    // One period of zeros in front: input phase row c holds in[Q * (u - 1) + c] at u.
    std::fill_n(cur, Q, Acc(0));
    std::copy_n(in, in_len_, cur + Q);
    std::fill(cur + Q + in_len_, cur + Q * n_, Acc(0));
    for (int64_t rows = 1; rows < Q; rows *= 2) {
      deinterleave_rows(cur, spare, rows, Q * n_ / rows);
      std::swap(cur, spare);
    }
    for (int64_t p = 0; p < P; ++p) {
      const int64_t begin = p == 0 ? 0 : phase_end_[p - 1], taps = phase_end_[p] - begin;
      const int64_t* src = phase_src_.data() + begin;
      const Acc* w = phase_weight_.data() + begin;
      Acc* dst = (P == 1 ? out : spare) + bit_reversed(p, P) * n_;
      for (int64_t i = 0; i < n_; i += V::size()) {
        // A phase without taps (downsampling skips source positions) is zero, as its padding adds.
        V acc = taps == 0 ? V(Acc(0)) : V(w[0]) * V::loadu(cur + src[0] + i);
        for (int64_t m = 1; m < taps; ++m) {
          acc = at::vec::fmadd(V(w[m]), V::loadu(cur + src[m] + i), acc);
        }
        acc.store(dst + i);
      }
    }
    std::swap(cur, spare);
    for (int64_t rows = P / 2; rows >= 1; rows /= 2) {
      Acc* dst = rows == 1 ? out : spare;
      interleave_rows(cur, dst, rows, P * n_ / (2 * rows));
      spare = cur;
      cur = dst;
    }
    for (int64_t i = 0; i < taps_.lo; ++i) {
      out[i] = exact(in, i);
    }
    for (int64_t i = taps_.hi; i < taps_.len; ++i) {
      out[i] = exact(in, i);
    }
  }

  Acc exact(const Acc* in, int64_t i) const {
    Acc acc = weight_[i] * in[index_[i]];
    for (int64_t m = 1; m < taps_.taps; ++m) {
      acc += weight_[m * taps_.stride + i] * in[index_[m * taps_.stride + i]];
    }
    return acc;
  }

  Taps taps_;
  const IndexOf<Acc>* index_;
  const Acc* weight_;
  int64_t in_len_;
  int64_t n_ = 0;                    // length of a phase row; 0: not periodic
  std::vector<int64_t> phase_src_;   // per output phase and tap: where its input starts in the split rows
  std::vector<Acc> phase_weight_;
  std::vector<int64_t> phase_end_;   // per output phase: the end of its taps in the two above
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
