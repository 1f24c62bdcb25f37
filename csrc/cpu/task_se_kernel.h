// The task_se passes, compiled once per instruction set: included by exactly one translation unit
// per ISA (task_se_default.cpp, isa/task_se_<isa>.cpp), which first defines CPU_CAPABILITY (the
// namespace of its copy) and CPU_CAPABILITY_<ISA> the way ATen does, so that at::vec below
// resolves to that instruction set's Vectorized specialisations.
//
// All arithmetic runs in Acc registers (fp32, fp64 for double) and follows the pure-torch
// passes of mtlfast/ops/task_se.py: y = x * gate (+ residual) is recomputed by the same code in
// the forward and the backward, so the backward's ReLU mask is exactly the forward's.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "cpu/task_se.h"
#include "cpu/vec_common.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) before including task_se_kernel.h"
#endif

namespace mtlfast::cpu::task_se::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using mtlfast::cpu::CPU_CAPABILITY::for_each_step;
using mtlfast::cpu::CPU_CAPABILITY::sigmoid;
using mtlfast::cpu::CPU_CAPABILITY::Step;
using mtlfast::cpu::CPU_CAPABILITY::stream_fence;

// Which layout a step belongs to: a step of an NCHW plane has one gate value, a step of an NHWC
// row a run of channels.
using RowStep = std::true_type;
using PlaneStep = std::false_type;

// The (N, C) coefficients (gate, grad_pooled) of a step whose first channel is at p.
template <typename Tag, typename Acc>
inline std::tuple<Vectorized<Acc>, Vectorized<Acc>> coef(Tag, const Acc* p, int64_t count) {
  if constexpr (Tag::value) {
    return Step<Acc>::load(p, count);
  } else {
    const Vectorized<Acc> v(*p);
    return {v, v};
  }
}

// One item: its plane (NCHW) or sample (NHWC), and its pixels [first, first + len) there.
struct Span {
  int64_t item, outer, first, len;
};

// Calls f(span) for the items [begin, end) in order. Counting planes and chunks along, rather than
// dividing per item, matters when NCHW planes are small (7x7: a few steps each).
template <typename F>
inline void for_each_span(const Work& w, int64_t begin, int64_t end, const F& f) {
  int64_t outer = begin / w.chunks;
  int64_t k = begin - outer * w.chunks;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t first = k * w.chunk;
    f(Span{item, outer, first, std::min(w.chunk, w.HW - first)});
    if (++k == w.chunks) {
      k = 0;
      ++outer;
    }
  }
}

// Calls op(tag, offset of the step in x, count, offset of its coefficients in (N, C)) for every
// step of the items [begin, end).
template <typename T, typename Op>
void for_each_item_step(const Work& w, int64_t begin, int64_t end, const Op& op) {
  constexpr int64_t K = Step<T>::kStep;
  for_each_span(w, begin, end, [&](const Span& s) {
    if (w.channels_last) {
      for (int64_t row = s.first; row < s.first + s.len; ++row) {
        const int64_t off = (s.outer * w.HW + row) * w.C;
        for_each_step<K>(w.C, [&](int64_t c, int64_t count) { op(RowStep{}, off + c, count, s.outer * w.C + c); });
      }
    } else {
      const int64_t off = s.outer * w.HW + s.first;
      for_each_step<K>(s.len, [&](int64_t p, int64_t count) { op(PlaneStep{}, off + p, count, s.outer); });
    }
  });
}

// Sums term(tag, offset, count, coefficient offset) -> (V, V) over the pixels of each item of
// [begin, end), divided by a.divisor, into partials: (N, C, chunks) for NCHW, which sums in
// registers and adds the lanes at the end of the item; (N, chunks, C) for NHWC, which sums each
// row into the item's C partial sums (one row of Acc, which stays in L1).
template <typename T, typename Term>
void reduce_items(const Args& a, int64_t begin, int64_t end, const Term& term) {
  using Acc = at::opmath_type<T>;
  using V = Vectorized<Acc>;
  using St = Step<Acc>;
  constexpr int64_t K = Step<T>::kStep;
  const Work& w = a.work;
  Acc* partials = static_cast<Acc*>(a.partials);
  const Acc divisor = Acc(a.divisor);
  for_each_span(w, begin, end, [&](const Span& s) {
    if (w.channels_last) {
      Acc* sums = partials + s.item * w.C;
      std::fill(sums, sums + w.C, Acc(0));
      for (int64_t row = s.first; row < s.first + s.len; ++row) {
        const int64_t off = (s.outer * w.HW + row) * w.C;
        for_each_step<K>(w.C, [&](int64_t c, int64_t count) {
          const auto [t0, t1] = term(RowStep{}, off + c, count, s.outer * w.C + c);
          const auto [s0, s1] = St::load(sums + c, count);
          St::store(sums + c, s0 + t0, s1 + t1, count);
        });
      }
      if (divisor != Acc(1)) {
        std::for_each(sums, sums + w.C, [&](Acc& v) { v /= divisor; });
      }
    } else {
      V s0(Acc(0));
      V s1(Acc(0));
      const int64_t off = s.outer * w.HW + s.first;
      for_each_step<K>(s.len, [&](int64_t p, int64_t count) {
        const auto [t0, t1] = term(PlaneStep{}, off + p, count, s.outer);
        s0 = s0 + t0;
        s1 = s1 + t1;
      });
      const Acc sum = at::vec::vec_reduce_all<Acc>([](const V& u, const V& v) { return u + v; }, s0 + s1);
      partials[s.item] = sum / divisor;
    }
  });
}

// The pointers of a pass, typed.
template <typename T>
struct Ptrs {
  using Acc = at::opmath_type<T>;
  const T* x;
  const T* residual;
  const T* grad_out;
  const Acc* gate;
  const Acc* grad_pooled;
  T* out;
  bool stream;

  explicit Ptrs(const Args& a)
      : x(static_cast<const T*>(a.x)),
        residual(static_cast<const T*>(a.residual)),
        grad_out(static_cast<const T*>(a.grad_out)),
        gate(static_cast<const Acc*>(a.gate)),
        grad_pooled(static_cast<const Acc*>(a.grad_pooled)),
        out(static_cast<T*>(a.out)),
        stream(a.stream) {}

  // Writes the step at off of out.
  template <typename V>
  void put(int64_t off, const V& a, const V& b, int64_t count) const {
    T* q = out + off;
    if (stream && Step<T>::can_stream(q, count)) {
      Step<T>::stream(q, a, b);
    } else {
      Step<T>::store(q, a, b, count);
    }
  }
};

// y = x * gate (+ residual) for a step whose x is already loaded.
template <bool kResidual, typename T, typename Tag, typename V>
inline std::tuple<V, V> pre_activation(const Ptrs<T>& p, Tag tag, int64_t off, int64_t count, int64_t ci,
                                       const V& x0, const V& x1) {
  const auto [k0, k1] = coef(tag, p.gate + ci, count);
  V y0 = x0 * k0;
  V y1 = x1 * k1;
  if constexpr (kResidual) {
    const auto [r0, r1] = Step<T>::load(p.residual + off, count);
    y0 = y0 + r0;
    y1 = y1 + r1;
  }
  return {y0, y1};
}

// g' = grad_out (g0, g1), zeroed where the ReLU was off (y <= 0, or NaN), for a step whose x is
// loaded.
template <bool kResidual, typename T, typename Tag, typename V>
inline std::tuple<V, V> mask_inactive(const Ptrs<T>& p, Tag tag, int64_t off, int64_t count, int64_t ci,
                                      const V& x0, const V& x1, const V& g0, const V& g1) {
  const auto [y0, y1] = pre_activation<kResidual>(p, tag, off, count, ci, x0, x1);
  const V zero(0);
  return {g0 & (y0 > zero), g1 & (y1 > zero)};
}

// Runs f(residual, relu) with both flags as compile-time constants, so that each combination gets
// its own loop free of per-step branches.
template <typename F>
inline void with_flags(const Args& a, const F& f) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (a.residual != nullptr) {
    a.relu ? f(Yes{}, Yes{}) : f(Yes{}, No{});
  } else {
    a.relu ? f(No{}, Yes{}) : f(No{}, No{});
  }
}

template <typename T>
void pool(const Args& a, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(a.x);
  reduce_items<T>(a, begin, end,
                  [&](auto, int64_t off, int64_t count, int64_t) { return Step<T>::load(x + off, count); });
}

template <typename T>
void scale(const Args& a, int64_t begin, int64_t end) {
  using V = Vectorized<at::opmath_type<T>>;
  const Ptrs<T> p(a);
  with_flags(a, [&](auto residual, auto relu) {
    for_each_item_step<T>(a.work, begin, end, [&](auto tag, int64_t off, int64_t count, int64_t ci) {
      const auto [x0, x1] = Step<T>::load(p.x + off, count);
      auto [y0, y1] = pre_activation<residual()>(p, tag, off, count, ci, x0, x1);
      if constexpr (relu()) {
        // maximum, unlike a bare max instruction, keeps NaN as torch.relu does.
        y0 = at::vec::maximum(y0, V(0));
        y1 = at::vec::maximum(y1, V(0));
      }
      p.put(off, y0, y1, count);
    });
  });
  if (a.stream) {
    stream_fence();
  }
}

template <typename T>
void backward_gate(const Args& a, int64_t begin, int64_t end) {
  const Ptrs<T> p(a);
  with_flags(a, [&](auto residual, auto relu) {
    reduce_items<T>(a, begin, end, [&](auto tag, int64_t off, int64_t count, int64_t ci) {
      const auto [x0, x1] = Step<T>::load(p.x + off, count);
      auto [g0, g1] = Step<T>::load(p.grad_out + off, count);
      if constexpr (relu()) {
        std::tie(g0, g1) = mask_inactive<residual()>(p, tag, off, count, ci, x0, x1, g0, g1);
      }
      if (p.out != nullptr) {
        p.put(off, g0, g1, count);
      }
      return std::make_tuple(g0 * x0, g1 * x1);
    });
  });
  if (a.stream) {
    stream_fence();
  }
}

// Without ReLU, x and residual are not read: grad_x = grad_out * gate + grad_pooled / HW.
template <typename T>
void backward_input(const Args& a, int64_t begin, int64_t end) {
  using Acc = at::opmath_type<T>;
  const Ptrs<T> p(a);
  // A product keeps the divider out of the loop; the mean's gradient is then within an ulp of
  // grad_pooled / HW.
  const Vectorized<Acc> inv(Acc(1) / Acc(a.divisor));
  with_flags(a, [&](auto residual, auto relu) {
    for_each_item_step<T>(a.work, begin, end, [&](auto tag, int64_t off, int64_t count, int64_t ci) {
      auto [g0, g1] = Step<T>::load(p.grad_out + off, count);
      if constexpr (relu()) {
        const auto [x0, x1] = Step<T>::load(p.x + off, count);
        std::tie(g0, g1) = mask_inactive<residual()>(p, tag, off, count, ci, x0, x1, g0, g1);
      }
      const auto [k0, k1] = coef(tag, p.gate + ci, count);
      const auto [b0, b1] = coef(tag, p.grad_pooled + ci, count);
      p.put(off, g0 * k0 + b0 * inv, g1 * k1 + b1 * inv, count);
    });
  });
  if (a.stream) {
    stream_fence();
  }
}

// Scalar: the partial sums are a small fraction of x, read once.
template <typename Acc>
void combine(const Combine& a, int64_t begin, int64_t end) {
  const Acc* partials = static_cast<const Acc*>(a.partials);
  Acc* sums = static_cast<Acc*>(a.sums);
  for (int64_t j = begin; j < end; ++j) {
    const int64_t n = j / a.C;
    const Acc* p = a.channels_last ? partials + n * a.chunks * a.C + (j - n * a.C) : partials + j * a.chunks;
    const int64_t stride = a.channels_last ? a.C : 1;
    Acc sum(0);
    for (int64_t k = 0; k < a.chunks; ++k) {
      sum += p[k * stride];
    }
    sums[j] = sum / Acc(a.divisor);
  }
}

// ---- the per-task linear layers (Mlp in task_se.h) ------------------------------------------
// They read the weights of the tasks present once per call (rows hot in L1 or L2 while the samples
// of one task use them); the arithmetic is a few dot products and row updates per weight row.

// out[k * out_stride] = sum_i a[i] * b[k * b_stride + i] over [0, n), for k < K: K dot products
// sharing one sweep over a (a weight row serving the samples of one task). Four accumulators per
// product hide the FMA latency; every product is summed in the same order whatever K, so a sample
// gets the same bits alone or with others.
template <typename Acc, int K>
inline void dots(const Acc* a, const Acc* b, int64_t b_stride, int64_t n, Acc* out, int64_t out_stride) {
  using V = Vectorized<Acc>;
  constexpr int64_t L = V::size();
  V s[K][4];
  for (int k = 0; k < K; ++k) {
    for (int j = 0; j < 4; ++j) {
      s[k][j] = V(Acc(0));
    }
  }
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    for (int j = 0; j < 4; ++j) {
      const V w = V::loadu(a + i + j * L);
      for (int k = 0; k < K; ++k) {
        s[k][j] = at::vec::fmadd(w, V::loadu(b + k * b_stride + i + j * L), s[k][j]);
      }
    }
  }
  for (; i < n; i += L) {
    const int64_t c = std::min(L, n - i);
    const V w = V::loadu(a + i, c);
    for (int k = 0; k < K; ++k) {
      s[k][0] = at::vec::fmadd(w, V::loadu(b + k * b_stride + i, c), s[k][0]);
    }
  }
  for (int k = 0; k < K; ++k) {
    out[k * out_stride] =
        at::vec::vec_reduce_all<Acc>([](const V& u, const V& v) { return u + v; }, (s[k][0] + s[k][1]) + (s[k][2] + s[k][3]));
  }
}

// The samples [n, end) in runs that share a task: f(n, k) for each run of k <= 2 samples.
template <typename F>
inline void task_runs(const int64_t* task, int64_t n, int64_t end, const F& f) {
  while (n < end) {
    const int64_t k = n + 1 < end && task[n + 1] == task[n] ? 2 : 1;
    f(n, k);
    n += k;
  }
}

// y[i] += s * x[i] over [0, n).
template <typename Acc>
inline void axpy(Acc* y, Acc s, const Acc* x, int64_t n) {
  using V = Vectorized<Acc>;
  constexpr int64_t L = V::size();
  const V sv(s);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    at::vec::fmadd(sv, V::loadu(x + i), V::loadu(y + i)).store(y + i);
  }
  if (i < n) {
    at::vec::fmadd(sv, V::loadu(x + i, n - i), V::loadu(y + i, n - i)).store(y + i, n - i);
  }
}

template <typename Acc>
struct MlpPtrs {
  const int64_t* task;
  const Acc *w1, *b1, *w2, *b2, *pooled, *grad_gate;
  Acc *hidden, *gate, *dz, *dh, *grad_pooled, *grad_w1, *grad_b1, *grad_w2, *grad_b2;

  explicit MlpPtrs(const Mlp& m)
      : task(m.task),
        w1(static_cast<const Acc*>(m.w1)),
        b1(static_cast<const Acc*>(m.b1)),
        w2(static_cast<const Acc*>(m.w2)),
        b2(static_cast<const Acc*>(m.b2)),
        pooled(static_cast<const Acc*>(m.pooled)),
        grad_gate(static_cast<const Acc*>(m.grad_gate)),
        hidden(static_cast<Acc*>(m.hidden)),
        gate(static_cast<Acc*>(m.gate)),
        dz(static_cast<Acc*>(m.dz)),
        dh(static_cast<Acc*>(m.dh)),
        grad_pooled(static_cast<Acc*>(m.grad_pooled)),
        grad_w1(static_cast<Acc*>(m.grad_w1)),
        grad_b1(static_cast<Acc*>(m.grad_b1)),
        grad_w2(static_cast<Acc*>(m.grad_w2)),
        grad_b2(static_cast<Acc*>(m.grad_b2)) {}
};

// Bytes of one task's weight rows that linear_outputs takes through all the samples before moving
// on: a contiguous stretch long enough for the prefetchers, short enough to stay in L2 while the
// other runs of the same task reuse it (measured at C=2048, R=128: 4 to 256 KiB, best from 64).
constexpr int64_t kRowBlockBytes = 64 << 10;

// y[n, o] = b[t, o] + w[t, o, :] . x[n, :] for every sample n (t = task[n]) and output o in
// [o0, o1): outputs of a per-task linear layer w (T, O, I), b (T, O) on x (N, I) into y (N, O).
// A weight row serves the samples of a run of one task at once; the rows go in blocks, each block
// through every run, so that a run reads its task's rows in address order (rows outer and tasks
// inner, 512-byte rows 1 MiB apart defeated the prefetchers: the whole op at N=20, C=2048, 7x7
// took 1.39 ms at T=10 and 0.67 ms at T=1, against 0.95 and 0.55 ms in blocks of 64 KiB).
template <typename Acc>
inline void linear_outputs(const int64_t* task, int64_t N, int64_t O, int64_t I, int64_t o0, int64_t o1,
                           const Acc* w, const Acc* b, const Acc* x, Acc* y) {
  const int64_t block = std::max<int64_t>(1, kRowBlockBytes / (I * static_cast<int64_t>(sizeof(Acc))));
  for (int64_t first = o0; first < o1; first += block) {
    const int64_t last = std::min(o1, first + block);
    task_runs(task, 0, N, [&](int64_t n, int64_t k) {
      for (int64_t o = first; o < last; ++o) {
        const int64_t row = task[n] * O + o;
        Acc* out = y + n * O + o;
        if (k == 2) {
          dots<Acc, 2>(w + row * I, x + n * I, I, I, out, O);
        } else {
          dots<Acc, 1>(w + row * I, x + n * I, I, I, out, O);
        }
        for (int64_t j = 0; j < k; ++j) {
          out[j * O] += b[row];
        }
      }
    });
  }
}

// hidden[:, r] for r in [begin, end). relu keeps NaN, as torch.relu does.
template <typename Acc>
void squeeze(const Mlp& m, int64_t begin, int64_t end) {
  const MlpPtrs<Acc> p(m);
  linear_outputs(p.task, m.N, m.R, m.C, begin, end, p.w1, p.b1, p.pooled, p.hidden);
  for (int64_t n = 0; n < m.N; ++n) {
    for (int64_t r = begin; r < end; ++r) {
      Acc& z = p.hidden[n * m.R + r];
      z = z > Acc(0) || std::isnan(z) ? z : Acc(0);
    }
  }
}

// gate[:, c] for c in [begin, end): the pre-activations (linear_outputs), then the sigmoid
// vectorised along each sample's channels.
template <typename Acc>
void excite(const Mlp& m, int64_t begin, int64_t end) {
  using V = Vectorized<Acc>;
  const MlpPtrs<Acc> p(m);
  linear_outputs(p.task, m.N, m.C, m.R, begin, end, p.w2, p.b2, p.hidden, p.gate);
  for (int64_t n = 0; n < m.N; ++n) {
    Acc* g = p.gate + n * m.C;
    for (int64_t c = begin; c < end; c += V::size()) {
      const int64_t k = std::min<int64_t>(V::size(), end - c);
      sigmoid(V::loadu(g + c, k)).store(g + c, k);
    }
  }
}

// For the samples [begin, end): dz = grad_gate * gate * (1 - gate), dh = (dz @ w2[t]) * (hidden > 0)
// and grad_pooled = dh @ w1[t]. One sample's sums run in one fixed order whatever the threads.
template <typename Acc>
void backward_sample(const Mlp& m, int64_t begin, int64_t end) {
  const MlpPtrs<Acc> p(m);
  for (int64_t n = begin; n < end; ++n) {
    const int64_t t = p.task[n];
    Acc* dz = p.dz + n * m.C;
    Acc* dh = p.dh + n * m.R;
    std::fill(dh, dh + m.R, Acc(0));
    for (int64_t c = 0; c < m.C; ++c) {
      const Acc g = p.gate[n * m.C + c];
      dz[c] = p.grad_gate[n * m.C + c] * g * (Acc(1) - g);
      axpy(dh, dz[c], p.w2 + (t * m.C + c) * m.R, m.R);
    }
    const Acc* h = p.hidden + n * m.R;
    Acc* gp = p.grad_pooled + n * m.C;
    std::fill(gp, gp + m.C, Acc(0));
    for (int64_t r = 0; r < m.R; ++r) {
      // A product, not a select, so that a NaN gradient propagates as in the reference.
      dh[r] *= Acc(h[r] > Acc(0));
      axpy(gp, dh[r], p.w1 + (t * m.R + r) * m.C, m.C);
    }
  }
}

// The weight gradients of one linear layer with per-task weights w (T, J, K) and bias b (T, J),
// for its rows j in [begin, end): grad_w[t, j] += sum over the samples n of task t of
// d[n, j] * input[n], grad_b[t, j] += the sum of d[n, j]. d (N, J) is the gradient at the
// layer's pre-activation and input (N, K) what the layer read; samples add in order.
template <typename Acc>
void layer_grads(const int64_t* task, int64_t N, int64_t J, int64_t K, const Acc* d, const Acc* input, Acc* grad_w,
                 Acc* grad_b, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t row = task[n] * J + j;
      grad_b[row] += d[n * J + j];
      axpy(grad_w + row * K, d[n * J + j], input + n * K, K);
    }
  }
}

// grad_w2, grad_b2 (the excite layer: rows c of C, reading hidden) for c in [begin, end).
template <typename Acc>
void grad_excite(const Mlp& m, int64_t begin, int64_t end) {
  const MlpPtrs<Acc> p(m);
  layer_grads(p.task, m.N, m.C, m.R, p.dz, p.hidden, p.grad_w2, p.grad_b2, begin, end);
}

// grad_w1, grad_b1 (the squeeze layer: rows r of R, reading pooled) for r in [begin, end).
template <typename Acc>
void grad_squeeze(const Mlp& m, int64_t begin, int64_t end) {
  const MlpPtrs<Acc> p(m);
  layer_grads(p.task, m.N, m.R, m.C, p.dh, p.pooled, p.grad_w1, p.grad_b1, begin, end);
}

template <typename T>
DtypeKernels dtype_kernels() {
  using Acc = at::opmath_type<T>;
  return {pool<T>, scale<T>, backward_gate<T>, backward_input<T>, combine<Acc>,
          {squeeze<Acc>, excite<Acc>, backward_sample<Acc>, grad_excite<Acc>, grad_squeeze<Acc>}};
}

}  // namespace

Kernels kernels() {
  return {dtype_kernels<float>(), dtype_kernels<double>(), dtype_kernels<c10::Half>(),
          dtype_kernels<c10::BFloat16>()};
}

}  // namespace mtlfast::cpu::task_se::CPU_CAPABILITY
