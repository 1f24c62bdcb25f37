// The max_pool2d kernels, compiled once per instruction set: included by exactly one translation
// unit per ISA (max_pool_default.cpp, isa/max_pool_<isa>.cpp), which first defines CPU_CAPABILITY
// and CPU_CAPABILITY_<ISA> the way ATen does.
//
// aten's NCHW max pooling visits every output pixel's window in scalar code (on a 2-core Xeon,
// (4, 64, 256, 256) with a 3x3 window and stride 2: 80-120 ms, ten times its channels-last kernel).
// Here a plane is pooled separably, with vector lanes over the columns: first every input row's
// maxima over the window's columns (at every stride-1 window start, then every sw-th kept), then
// each output row's maximum over its window's rows of those. Taking the first row-major maximum
// (and the last NaN) of each row, then of the rows, picks the position aten's row-major scan picks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/max_pool.h"
#include "cpu/vec_common.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) before including max_pool_kernel.h"
#endif

namespace mtlfast::cpu::max_pool::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// aten's rule, in window order: a value replaces the running maximum if it is larger or NaN.
template <typename T>
inline bool takes(T x, T m) {
  return x > m || std::isnan(x);
}

template <typename T>
inline Vectorized<T> takes(const Vectorized<T>& x, const Vectorized<T>& m) {
  return (x > m) | (x != x);
}

// The maxima of one input row over the windows of columns [j - pw, j - pw + kw) clipped to
// [0, W), for the stride-1 window starts j in [0, J): value v[j] and column kx (as T) idx[j].
template <typename T>
void row_windows(const T* row, int64_t W, int64_t kw, int64_t pw, int64_t J, T* v, T* idx) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  auto one = [&](int64_t j) {
    const int64_t s = j - pw;
    const int64_t k0 = std::max<int64_t>(0, -s), k1 = std::min<int64_t>(kw, W - s);
    T m = -std::numeric_limits<T>::infinity();
    int64_t at = k0;  // aten's start: the first position inside the plane
    for (int64_t k = k0; k < k1; ++k) {
      if (takes(row[s + k], m)) {
        m = row[s + k];
        at = k;
      }
    }
    v[j] = m;
    idx[j] = T(at);
  };
  // windows wholly inside the row: j in [pw, W - kw + pw]
  const int64_t lo = std::min(pw, J), hi = std::max(lo, std::min(J, W - kw + pw + 1));
  for (int64_t j = 0; j < lo; ++j) {
    one(j);
  }
  int64_t j = lo;
  for (; j + L <= hi; j += L) {
    const T* s = row + j - pw;
    V m = V::loadu(s), at(T(0));
    for (int64_t k = 1; k < kw; ++k) {
      const V x = V::loadu(s + k);
      const V take = takes(x, m);
      m = V::blendv(m, x, take);
      at = V::blendv(at, V(T(k)), take);
    }
    m.store(v + j);
    at.store(idx + j);
  }
  for (; j < J; ++j) {
    one(j);
  }
}

template <typename T>
void forward(const void* x_, void* out_, std::uint8_t* offsets_, const Pool& p, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t J = (p.OW - 1) * p.sw + 1;  // stride-1 window starts up to the last output's
  // per input row: its maxima over each output column's window, and their columns kx
  std::vector<T> hv(static_cast<size_t>(p.H * p.OW)), hi(hv.size());
  std::vector<T> sv(p.sw > 1 ? static_cast<size_t>(J) : 0), si(sv.size()), off(static_cast<size_t>(p.OW));
  const T lowest = -std::numeric_limits<T>::infinity();
  for (int64_t plane = begin; plane < end; ++plane) {
    const T* x = static_cast<const T*>(x_) + plane * p.H * p.W;
    T* out = static_cast<T*>(out_) + plane * p.OH * p.OW;
    std::uint8_t* offsets = offsets_ + plane * p.OH * p.OW;
    for (int64_t iy = 0; iy < p.H; ++iy) {
      T* v = hv.data() + iy * p.OW;
      T* idx = hi.data() + iy * p.OW;
      if (p.sw == 1) {
        row_windows(x + iy * p.W, p.W, p.kw, p.pw, J, v, idx);
      } else {
        row_windows(x + iy * p.W, p.W, p.kw, p.pw, J, sv.data(), si.data());
        for (int64_t ox = 0; ox < p.OW; ++ox) {
          v[ox] = sv[ox * p.sw];
          idx[ox] = si[ox * p.sw];
        }
      }
    }
    for (int64_t oy = 0; oy < p.OH; ++oy) {
      const int64_t r0 = oy * p.sh - p.ph;
      const int64_t ky0 = std::max<int64_t>(0, -r0), ky1 = std::min<int64_t>(p.kh, p.H - r0);
      const T* i0 = hi.data() + (r0 + ky0) * p.OW;
      T* o = out + oy * p.OW;
      int64_t ox = 0;
      for (; ox + L <= p.OW; ox += L) {
        V m(lowest), at = V::loadu(i0 + ox) + V(T(ky0 * p.kw));
        for (int64_t ky = ky0; ky < ky1; ++ky) {
          const int64_t r = (r0 + ky) * p.OW + ox;
          const V x = V::loadu(hv.data() + r);
          const V take = takes(x, m);
          m = V::blendv(m, x, take);
          at = V::blendv(at, V::loadu(hi.data() + r) + V(T(ky * p.kw)), take);
        }
        m.store(o + ox);
        at.store(off.data() + ox);
      }
      for (; ox < p.OW; ++ox) {
        T m = lowest, at = i0[ox] + T(ky0 * p.kw);
        for (int64_t ky = ky0; ky < ky1; ++ky) {
          const int64_t r = (r0 + ky) * p.OW + ox;
          if (takes(hv[r], m)) {
            m = hv[r];
            at = hi[r] + T(ky * p.kw);
          }
        }
        o[ox] = m;
        off[ox] = at;
      }
      std::uint8_t* row_offsets = offsets + oy * p.OW;
      for (int64_t i = 0; i < p.OW; ++i) {
        row_offsets[i] = static_cast<std::uint8_t>(off[i]);
      }
    }
  }
}

template <typename T>
bool backward(const void* grad_, const std::uint8_t* offsets_, void* grad_x_, const Pool& p, int64_t begin,
              int64_t end) {
  const int64_t window = p.kh * p.kw;
  int64_t dy[256], dx[256];
  for (int64_t k = 0; k < window; ++k) {
    dy[k] = k / p.kw;
    dx[k] = k % p.kw;
  }
  bool ok = true;
  for (int64_t plane = begin; plane < end; ++plane) {
    const T* grad = static_cast<const T*>(grad_) + plane * p.OH * p.OW;
    const std::uint8_t* offsets = offsets_ + plane * p.OH * p.OW;
    T* gx = static_cast<T*>(grad_x_) + plane * p.H * p.W;
    std::fill(gx, gx + p.H * p.W, T(0));
    for (int64_t oy = 0; oy < p.OH; ++oy) {
      for (int64_t ox = 0; ox < p.OW; ++ox) {
        const int64_t k = offsets[oy * p.OW + ox];
        if (k >= window) {
          ok = false;
          continue;
        }
        const int64_t iy = oy * p.sh - p.ph + dy[k], ix = ox * p.sw - p.pw + dx[k];
        if (iy < 0 || iy >= p.H || ix < 0 || ix >= p.W) {
          ok = false;
          continue;
        }
        gx[iy * p.W + ix] += grad[oy * p.OW + ox];
      }
    }
  }
  return ok;
}

}  // namespace

Kernels kernels() {
  return {{forward<float>, backward<float>}, {forward<double>, backward<double>}};
}

}  // namespace mtlfast::cpu::max_pool::CPU_CAPABILITY
