// Row building blocks of the skip_fusion kernels (skip_fusion_kernel.h), compiled once per
// instruction set like them: loads and stores in steps, aligned buffers, and the resampling of a
// row along x by a table (skip_fusion.h's Taps).
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/skip_fusion.h"
#include "cpu/vec_common.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) before including skip_fusion_rows.h"
#endif

namespace mtlfast::cpu::skip_fusion::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using mtlfast::cpu::CPU_CAPABILITY::for_each_step;
using mtlfast::cpu::CPU_CAPABILITY::Step;
static_assert(kPadElems % Step<float>::kStep == 0 && kPadElems % Step<double>::kStep == 0,
              "padded rows must hold whole steps");

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

}  // namespace
}  // namespace mtlfast::cpu::skip_fusion::CPU_CAPABILITY
