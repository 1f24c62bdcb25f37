// The softmax cross-entropy kernels, compiled once per instruction set: included by exactly one
// translation unit per ISA (softmax_xent_default.cpp, isa/softmax_xent_<isa>.cpp), which first
// defines CPU_CAPABILITY and CPU_CAPABILITY_<ISA> the way ATen does.
//
// aten reduces over the channels of an NCHW map in passes over the whole map (max, then the sum
// of exponentials, then softmax again in backward), and over a channels-last map's 21 contiguous
// values per pixel slowly (logsumexp of (4, 21, 256, 256): 6.3 ms NCHW, 11.4 ms channels-last on a
// 2-core EPYC). Here the map goes by tiles of kTile pixels of one sample, vector lanes over the
// pixels: a tile's channels (transposed into a buffer first when channels-last) are read from
// cache for the maximum, the sum of exponentials and the target's logit in one pass over memory,
// and backward writes exp(x - lse) - onehot from the saved lse in one more.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/softmax_xent.h"
#include "cpu/vec_common.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) before including softmax_xent_kernel.h"
#endif

namespace mtlfast::cpu::softmax_xent::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTile = 64;  // pixels: a tile of 21 float channels is 5 KiB

// Calls f(n, p0, b) for the tiles of at most kTile pixels of one sample covering the flattened
// pixels [begin, end).
template <typename F>
void for_tiles(const Map& m, int64_t begin, int64_t end, F&& f) {
  int64_t i = begin;
  while (i < end) {
    const int64_t n = i / m.P, p0 = i % m.P;
    const int64_t b = std::min({kTile, m.P - p0, end - i});
    f(n, p0, b);
    i += b;
  }
}

// The tile's channel rows, kTile apart in `buf` (NCHW: the map's own rows, P apart).
template <typename T>
const T* rows_of(const T* x, const Map& m, int64_t n, int64_t p0, int64_t b, T* buf, int64_t& stride) {
  const T* xs = x + n * m.C * m.P;
  if (!m.channels_last) {
    stride = m.P;
    return xs + p0;
  }
  const T* px = xs + p0 * m.C;
  for (int64_t j = 0; j < b; ++j) {
    for (int64_t c = 0; c < m.C; ++c) {
      buf[c * kTile + j] = px[j * m.C + c];
    }
  }
  stride = kTile;
  return buf;
}

template <typename T>
void forward(const void* x_, const int64_t* target, int64_t ignore, void* lse_, void* nll_, const Map& m,
             int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const T* x = static_cast<const T*>(x_);
  T* lse_out = static_cast<T*>(lse_);
  T* nll_out = static_cast<T*>(nll_);
  std::vector<T> buf(m.channels_last ? m.C * kTile : 0);
  const V inf(std::numeric_limits<T>::infinity()), zero(T(0));
  for_tiles(m, begin, end, [&](int64_t n, int64_t p0, int64_t b) {
    int64_t stride = 0;
    const T* r = rows_of(x, m, n, p0, b, buf.data(), stride);
    T* lse = lse_out + n * m.P + p0;
    for (int64_t j = 0; j < b; j += L) {
      const int64_t k = std::min(L, b - j);
      V mx = V::loadu(r + j, k);
      for (int64_t c = 1; c < m.C; ++c) {
        mx = at::vec::maximum(mx, V::loadu(r + c * stride + j, k));
      }
      // aten's logsumexp: a maximum of +-inf shifts by 0 (all -inf gives -inf, any +inf +inf)
      const V shift = V::blendv(mx, zero, mx.abs() == inf);
      V sum = zero;
      for (int64_t c = 0; c < m.C; ++c) {
        sum += (V::loadu(r + c * stride + j, k) - shift).exp();
      }
      (sum.log() + shift).store(lse + j, k);
    }
    const int64_t* t = target + n * m.P + p0;
    T* nll = nll_out + n * m.P + p0;
    for (int64_t j = 0; j < b; ++j) {
      nll[j] = t[j] == ignore ? T(0) : lse[j] - r[t[j] * stride + j];
    }
  });
}

template <typename T>
void backward(const void* x_, const int64_t* target, int64_t ignore, const void* lse_, double scale_, void* grad_x_,
              const Map& m, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const T* x = static_cast<const T*>(x_);
  const T* lse_all = static_cast<const T*>(lse_);
  T* grad_x = static_cast<T*>(grad_x_);
  const T scale = static_cast<T>(scale_);
  std::vector<T> buf(m.channels_last ? m.C * kTile : 0);
  std::vector<T> out(m.channels_last ? m.C * kTile : 0);
  T weight[kTile];
  for_tiles(m, begin, end, [&](int64_t n, int64_t p0, int64_t b) {
    int64_t stride = 0;
    const T* r = rows_of(x, m, n, p0, b, buf.data(), stride);
    const T* lse = lse_all + n * m.P + p0;
    const int64_t* t = target + n * m.P + p0;
    T* g = m.channels_last ? out.data() : grad_x + n * m.C * m.P + p0;
    for (int64_t j = 0; j < b; ++j) {
      weight[j] = t[j] == ignore ? T(0) : scale;
    }
    for (int64_t j = 0; j < b; j += L) {
      const int64_t k = std::min(L, b - j);
      const V l = V::loadu(lse + j, k), w = V::loadu(weight + j, k);
      for (int64_t c = 0; c < m.C; ++c) {
        ((V::loadu(r + c * stride + j, k) - l).exp() * w).store(g + c * stride + j, k);
      }
    }
    for (int64_t j = 0; j < b; ++j) {
      if (t[j] != ignore) {
        g[t[j] * stride + j] -= weight[j];
      }
    }
    if (m.channels_last) {
      T* px = grad_x + n * m.C * m.P + p0 * m.C;
      for (int64_t j = 0; j < b; ++j) {
        for (int64_t c = 0; c < m.C; ++c) {
          px[j * m.C + c] = g[c * kTile + j];
        }
      }
    }
  });
}

}  // namespace

Kernels kernels() {
  return {{forward<float>, backward<float>}, {forward<double>, backward<double>}};
}

}  // namespace mtlfast::cpu::softmax_xent::CPU_CAPABILITY
