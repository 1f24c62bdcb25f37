// The batch-norm training kernels, compiled once per instruction set: included by exactly one
// translation unit per ISA (batch_norm_default.cpp, isa/batch_norm_<isa>.cpp), which first defines
// CPU_CAPABILITY and CPU_CAPABILITY_<ISA> the way ATen does.
//
// Sums run in vectors of T (four independent accumulators per NCHW plane; one row of C per
// channels-last row) and are added into doubles at least every kFlushRows rows or every plane,
// so a float32 sum never runs over more than a few thousand values per lane.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/batch_norm.h"
#include "cpu/vec_common.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) before including batch_norm_kernel.h"
#endif

namespace mtlfast::cpu::batch_norm::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kFlushRows = 256;

template <typename T>
inline Vectorized<T> load(const T* p, int64_t count) {
  using V = Vectorized<T>;
  return count == V::size() ? V::loadu(p) : V::loadu(p, count);
}

template <typename T>
inline void store(T* p, int64_t count, const Vectorized<T>& v) {
  count == Vectorized<T>::size() ? v.store(p) : v.store(p, count);
}

template <typename T>
inline double total(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t l = 0; l < Vectorized<T>::size(); ++l) {
    s += lanes[l];
  }
  return s;
}

// f(i, count) over [0, n) in full vectors then one partial one.
template <typename T, typename F>
inline void lanes_of(int64_t n, F f) {
  constexpr int64_t L = Vectorized<T>::size();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    f(i, L);
  }
  if (i < n) {
    f(i, n - i);
  }
}

// The sum of f(i) over a plane of n values, f giving vectors: four accumulators for the adds'
// latency, then the tail.
template <typename T, typename F>
inline double plane_sum(int64_t n, F f) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    a0 = a0 + f(i, L);
    a1 = a1 + f(i + L, L);
    a2 = a2 + f(i + 2 * L, L);
    a3 = a3 + f(i + 3 * L, L);
  }
  for (; i < n; i += L) {
    a0 = a0 + f(i, std::min(L, n - i));
  }
  return total((a0 + a1) + (a2 + a3));
}

template <typename T>
void stats_nchw(const void* x_, const Shape& s, double* mean, double* var, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  const T* x = static_cast<const T*>(x_);
  const double count = static_cast<double>(s.N * s.P);
  for (int64_t c = begin; c < end; ++c) {
    double sum = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      const T* p = x + (n * s.C + c) * s.P;
      sum += plane_sum<T>(s.P, [&](int64_t i, int64_t k) { return load(p + i, k); });
    }
    const double m = sum / count;
    const V mv(static_cast<T>(m));
    double dev2 = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      const T* p = x + (n * s.C + c) * s.P;
      // the tail's missing lanes load as 0: mask them out of (0 - m)^2
      dev2 += plane_sum<T>(s.P, [&](int64_t i, int64_t k) {
        const V d = load(p + i, k) - mv;
        return k == V::size() ? d * d : V::set(V(T(0)), d * d, k);
      });
    }
    mean[c] = m;
    var[c] = dev2 / count;
  }
}

template <typename T>
void affine_nchw(const void* x_, const double* mean, const double* scale, const double* shift, void* out_,
                 const Shape& s, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  const T* x = static_cast<const T*>(x_);
  T* out = static_cast<T*>(out_);
  for (int64_t c = begin; c < end; ++c) {
    const V m(static_cast<T>(mean[c])), a(static_cast<T>(scale[c])), b(static_cast<T>(shift[c]));
    for (int64_t n = 0; n < s.N; ++n) {
      const int64_t o = (n * s.C + c) * s.P;
      lanes_of<T>(s.P, [&](int64_t i, int64_t k) { store(out + o + i, k, at::vec::fmadd(load(x + o + i, k) - m, a, b)); });
    }
  }
}

template <typename T>
void grad_sums_nchw(const void* g_, const void* x_, const double* mean, double* sum_g, double* sum_gx, const Shape& s,
                    int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const T* g = static_cast<const T*>(g_);
  const T* x = static_cast<const T*>(x_);
  for (int64_t c = begin; c < end; ++c) {
    const V mv(static_cast<T>(mean[c]));
    double sg = 0, sgx = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      const int64_t o = (n * s.C + c) * s.P;
      // both sums in one pass, two accumulators each; the tail's missing lanes of g load as 0
      V g0(T(0)), g1(T(0)), p0(T(0)), p1(T(0));
      int64_t i = 0;
      for (; i + 2 * L <= s.P; i += 2 * L) {
        const V ga = V::loadu(g + o + i), gb = V::loadu(g + o + i + L);
        g0 = g0 + ga;
        g1 = g1 + gb;
        p0 = at::vec::fmadd(ga, V::loadu(x + o + i) - mv, p0);
        p1 = at::vec::fmadd(gb, V::loadu(x + o + i + L) - mv, p1);
      }
      for (; i < s.P; i += L) {
        const int64_t k = std::min(L, s.P - i);
        const V ga = load(g + o + i, k);
        g0 = g0 + ga;
        p0 = at::vec::fmadd(ga, load(x + o + i, k) - mv, p0);
      }
      sg += total(g0 + g1);
      sgx += total(p0 + p1);
    }
    sum_g[c] = sg;
    sum_gx[c] = sgx;
  }
}

template <typename T>
void grad_x_nchw(const void* g_, const void* x_, const double* mean, const double* a, const double* b, const double* d,
                 void* gx_, const Shape& s, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  const T* g = static_cast<const T*>(g_);
  const T* x = static_cast<const T*>(x_);
  T* gx = static_cast<T*>(gx_);
  for (int64_t c = begin; c < end; ++c) {
    const V mv(static_cast<T>(mean[c])), av(static_cast<T>(a[c])), bv(static_cast<T>(b[c])), dv(static_cast<T>(d[c]));
    for (int64_t n = 0; n < s.N; ++n) {
      const int64_t o = (n * s.C + c) * s.P;
      lanes_of<T>(s.P, [&](int64_t i, int64_t k) {
        store(gx + o + i, k, at::vec::fmadd(load(g + o + i, k), av, at::vec::fmadd(load(x + o + i, k) - mv, bv, dv)));
      });
    }
  }
}

// Channels-last rows [begin, end) summed into acc[c] (and acc[C + c] when two), f(row pointer
// offset, channel, count, accumulators): per-channel T accumulators, added into acc every
// kFlushRows rows.
template <typename T, int Sums, typename F>
void rows_sum(const Shape& s, double* acc, int64_t begin, int64_t end, F f) {
  std::vector<T> part(static_cast<size_t>(Sums * s.C), T(0));
  auto flush = [&]() {
    for (int64_t i = 0; i < Sums * s.C; ++i) {
      acc[i] += part[i];
      part[i] = T(0);
    }
  };
  for (int64_t r0 = begin; r0 < end; r0 += kFlushRows) {
    const int64_t r1 = std::min(end, r0 + kFlushRows);
    for (int64_t r = r0; r < r1; ++r) {
      lanes_of<T>(s.C, [&](int64_t c, int64_t k) { f(r * s.C + c, c, k, part.data()); });
    }
    flush();
  }
}

// The per-channel doubles as T, for the channels-last loops to load per channel block.
template <typename T>
std::vector<T> as_t(const double* v, int64_t C) {
  std::vector<T> out(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    out[c] = static_cast<T>(v[c]);
  }
  return out;
}

template <typename T>
void moments_cl(const void* x_, const double* pivot, double* acc, const Shape& s, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(x_);
  const std::vector<T> k0 = as_t<T>(pivot, s.C);
  const int64_t C = s.C;
  rows_sum<T, 2>(s, acc, begin, end, [&](int64_t o, int64_t c, int64_t k, T* part) {
    const auto d = load(x + o, k) - load(k0.data() + c, k);
    store(part + c, k, load(part + c, k) + d);
    store(part + C + c, k, at::vec::fmadd(d, d, load(part + C + c, k)));
  });
}

template <typename T>
void grad_sums_cl(const void* g_, const void* x_, const double* mean, double* acc, const Shape& s, int64_t begin,
                  int64_t end) {
  const T* g = static_cast<const T*>(g_);
  const T* x = static_cast<const T*>(x_);
  const std::vector<T> m = as_t<T>(mean, s.C);
  const int64_t C = s.C;
  rows_sum<T, 2>(s, acc, begin, end, [&](int64_t o, int64_t c, int64_t k, T* part) {
    const auto gv = load(g + o, k);
    store(part + c, k, load(part + c, k) + gv);
    store(part + C + c, k, at::vec::fmadd(gv, load(x + o, k) - load(m.data() + c, k), load(part + C + c, k)));
  });
}

template <typename T>
void affine_cl(const void* x_, const double* mean, const double* scale, const double* shift, void* out_, const Shape& s,
               int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(x_);
  T* out = static_cast<T*>(out_);
  const std::vector<T> m = as_t<T>(mean, s.C), a = as_t<T>(scale, s.C), b = as_t<T>(shift, s.C);
  for (int64_t r = begin; r < end; ++r) {
    lanes_of<T>(s.C, [&](int64_t c, int64_t k) {
      const int64_t o = r * s.C + c;
      store(out + o, k,
            at::vec::fmadd(load(x + o, k) - load(m.data() + c, k), load(a.data() + c, k), load(b.data() + c, k)));
    });
  }
}

template <typename T>
void grad_x_cl(const void* g_, const void* x_, const double* mean, const double* a_, const double* b_, const double* d_,
               void* gx_, const Shape& s, int64_t begin, int64_t end) {
  const T* g = static_cast<const T*>(g_);
  const T* x = static_cast<const T*>(x_);
  T* gx = static_cast<T*>(gx_);
  const std::vector<T> m = as_t<T>(mean, s.C), a = as_t<T>(a_, s.C), b = as_t<T>(b_, s.C), d = as_t<T>(d_, s.C);
  for (int64_t r = begin; r < end; ++r) {
    lanes_of<T>(s.C, [&](int64_t c, int64_t k) {
      const int64_t o = r * s.C + c;
      store(gx + o, k,
            at::vec::fmadd(load(g + o, k), load(a.data() + c, k),
                           at::vec::fmadd(load(x + o, k) - load(m.data() + c, k), load(b.data() + c, k),
                                          load(d.data() + c, k))));
    });
  }
}

template <typename T>
DtypeKernels table() {
  return {stats_nchw<T>, affine_nchw<T>, grad_sums_nchw<T>, grad_x_nchw<T>,
          moments_cl<T>, affine_cl<T>,   grad_sums_cl<T>,   grad_x_cl<T>};
}

}  // namespace

Kernels kernels() {
  return {table<float>(), table<double>()};
}

}  // namespace mtlfast::cpu::batch_norm::CPU_CAPABILITY
