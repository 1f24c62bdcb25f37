// The Winograd F(4x4, 3x3) and F(2x2, 3x3) transforms, compiled once per instruction set: included
// by exactly one translation unit per ISA (winograd_conv_default.cpp, isa/winograd_conv_<isa>.cpp),
// which first defines CPU_CAPABILITY and CPU_CAPABILITY_<ISA> the way ATen does.
//
// Lavin & Gray's matrices, F(4x4, 3x3) for the points 0, 1, -1, 2, -2, inf and F(2x2, 3x3) for
// 0, 1, -1, inf:
//   V = B^T d B (input tile R x R, R = M + 2),  Y = A^T M A (output tile M x M),  U = G g G^T (done
//   in PyTorch). The generic kernels take M as a template argument; the *_rows ones are F(4x4)'s.
// The vector lanes run over channels: every step transforms one tile of V::size() channels, with
// the matrices' constants folded into the unrolled arithmetic (their zeros cost nothing).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/vec_common.h"
#include "cpu/winograd_conv.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) before including winograd_conv_kernel.h"
#endif

namespace mtlfast::cpu::winograd_conv::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using ::mtlfast::cpu::CPU_CAPABILITY::stream_fence;
using ::mtlfast::cpu::CPU_CAPABILITY::stream_store;

constexpr float kBT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                             {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
constexpr float kB[6][6] = {{4, 0, 0, 0, 0, 0},     {0, -4, 4, -2, 2, 4}, {-5, -4, -4, -1, -1, 0},
                            {0, 1, -1, 2, -2, -5}, {1, 1, 1, 1, 1, 0},   {0, 0, 0, 0, 0, 1}};
constexpr float kAT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
constexpr float kA[6][4] = {{1, 0, 0, 0}, {1, 1, 1, 1}, {1, -1, 1, -1}, {1, 2, 4, 8}, {1, -2, 4, -8}, {0, 0, 0, 1}};

constexpr float kBT2[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
constexpr float kB2[4][4] = {{1, 0, 0, 0}, {0, 1, -1, 1}, {-1, 1, 1, 0}, {0, 0, 0, -1}};
constexpr float kAT2[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
constexpr float kA2[4][2] = {{1, 0}, {1, 1}, {1, -1}, {0, -1}};
// F(2x2, 3x3)'s weight transform U = G g G^T and its adjoint G^T dU G: exact in float (halves), so
// done here for both dtypes (F(4x4)'s G has sixths and 24ths: done in fp64 in PyTorch).
constexpr float kG2[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
constexpr float kGT2[3][4] = {{1, 0.5f, 0.5f, 0}, {0, 0.5f, -0.5f, 0}, {0, 0.5f, 0.5f, 1}};

// The matrices of F(M x M, 3x3): input tiles of R x R.
template <int M>
struct Transform;

template <>
struct Transform<4> {
  static constexpr int R = 6;
  static constexpr const float (&BT)[6][6] = kBT;
  static constexpr const float (&B)[6][6] = kB;
  static constexpr const float (&AT)[4][6] = kAT;
  static constexpr const float (&A)[6][4] = kA;
};

template <>
struct Transform<2> {
  static constexpr int R = 4;
  static constexpr const float (&BT)[4][4] = kBT2;
  static constexpr const float (&B)[4][4] = kB2;
  static constexpr const float (&AT)[2][4] = kAT2;
  static constexpr const float (&A)[4][2] = kA2;
};

// out = m in m^T, lane by lane. m is a template argument so that, once the loops are unrolled,
// every coefficient is a constant and the zero ones drop out.
template <typename T, int RI, int RO, const float (&m)[RO][RI]>
inline void sandwich(const Vectorized<T> (&in)[RI][RI], Vectorized<T> (&out)[RO][RO]) {
  using V = Vectorized<T>;
  V t[RO][RI];
#pragma GCC unroll 8
  for (int i = 0; i < RO; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < RI; ++j) {
      V acc(T(0));
#pragma GCC unroll 8
      for (int k = 0; k < RI; ++k) {
        if (m[i][k] != 0.f) {
          acc = at::vec::fmadd(V(T(m[i][k])), in[k][j], acc);
        }
      }
      t[i][j] = acc;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RO; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < RO; ++j) {
      V acc(T(0));
#pragma GCC unroll 8
      for (int k = 0; k < RI; ++k) {
        if (m[j][k] != 0.f) {
          acc = at::vec::fmadd(V(T(m[j][k])), t[i][k], acc);
        }
      }
      out[i][j] = acc;
    }
  }
}

// count channels of the image at p (stride between channels sc), zeros in the other lanes.
template <typename T>
inline Vectorized<T> load_channels(const T* p, int64_t sc, int64_t count) {
  using V = Vectorized<T>;
  if (sc == 1) {
    return count == V::size() ? V::loadu(p) : V::loadu(p, count);
  }
  alignas(64) T buf[V::size()] = {};
  for (int64_t l = 0; l < count; ++l) {
    buf[l] = p[l * sc];
  }
  return V::loadu(buf);
}

template <typename T>
inline void store_channels(T* p, int64_t sc, int64_t count, const Vectorized<T>& v, bool add) {
  using V = Vectorized<T>;
  if (sc == 1) {
    const V r = add ? v + (count == V::size() ? V::loadu(p) : V::loadu(p, count)) : v;
    count == V::size() ? r.store(p) : r.store(p, count);
    return;
  }
  alignas(64) T buf[V::size()];
  v.store(buf);
  for (int64_t l = 0; l < count; ++l) {
    p[l * sc] = add ? p[l * sc] + buf[l] : buf[l];
  }
}

template <typename T>
inline void store_tile(T* p, int64_t count, const Vectorized<T>& v, bool stream) {
  using V = Vectorized<T>;
  if (stream && count == V::size() && reinterpret_cast<std::uintptr_t>(p) % sizeof(V) == 0) {
    stream_store(p, v);
  } else {
    count == V::size() ? v.store(p) : v.store(p, count);
  }
}

template <typename T>
inline Vectorized<T> load_tile(const T* p, int64_t count) {
  using V = Vectorized<T>;
  return count == V::size() ? V::loadu(p) : V::loadu(p, count);
}

struct TilePos {
  int64_t n, ty, tx;
};

inline TilePos tile_of(const Image& im, int64_t p) {
  return {p / (im.th * im.tw), (p / im.tw) % im.th, p % im.tw};
}

// Position ij's (count, C) block of the transformed tiles.
template <typename T>
T* at_position(const Tiles& t, int ij) {
  return static_cast<T*>(t.data[ij]);
}

template <typename T>
T* pixel(const Image& im, int64_t n, int64_t c, int64_t y, int64_t x) {
  return static_cast<T*>(im.data) + n * im.stride_n + c * im.stride_c + y * im.stride_h + x * im.stride_w;
}

template <typename T, int M>
void input(const Args& a, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  using W = Transform<M>;
  constexpr int R = W::R;
  const Image& im = a.image;
  V d[R][R], o[R][R];
  for (int64_t q = begin; q < end; ++q) {
    const TilePos tp = tile_of(im, a.tiles.first + q);
    for (int64_t c0 = 0; c0 < im.C; c0 += V::size()) {
      const int64_t count = std::min<int64_t>(V::size(), im.C - c0);
      for (int i = 0; i < R; ++i) {
        const int64_t y = M * tp.ty - 1 + i;
        for (int j = 0; j < R; ++j) {
          const int64_t x = M * tp.tx - 1 + j;
          const bool inside = y >= 0 && y < im.H && x >= 0 && x < im.W;
          d[i][j] = inside ? load_channels(pixel<T>(im, tp.n, c0, y, x), im.stride_c, count) : V(T(0));
        }
      }
      sandwich<T, R, R, W::BT>(d, o);
      for (int i = 0; i < R; ++i) {
        for (int j = 0; j < R; ++j) {
          store_tile(at_position<T>(a.tiles, i * R + j) + q * im.C + c0, count, o[i][j], a.stream);
        }
      }
    }
  }
  if (a.stream) {
    stream_fence();
  }
}

template <typename T, int M>
void output(const Args& a, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  using W = Transform<M>;
  constexpr int R = W::R;
  const Image& im = a.image;
  const T* bias = static_cast<const T*>(a.bias);
  V d[R][R], o[M][M];
  for (int64_t q = begin; q < end; ++q) {
    const TilePos tp = tile_of(im, a.tiles.first + q);
    for (int64_t k0 = 0; k0 < im.C; k0 += V::size()) {
      const int64_t count = std::min<int64_t>(V::size(), im.C - k0);
      for (int i = 0; i < R; ++i) {
        for (int j = 0; j < R; ++j) {
          d[i][j] = load_tile(at_position<T>(a.tiles, i * R + j) + q * im.C + k0, count);
        }
      }
      sandwich<T, R, M, W::AT>(d, o);
      const V b = bias == nullptr ? V(T(0)) : load_tile(bias + k0, count);
      for (int i = 0; i < M && M * tp.ty + i < im.H; ++i) {
        for (int j = 0; j < M && M * tp.tx + j < im.W; ++j) {
          store_channels(pixel<T>(im, tp.n, k0, M * tp.ty + i, M * tp.tx + j), im.stride_c, count, o[i][j] + b,
                         false);
        }
      }
    }
  }
}

// Rows [y0, y0 + rows) and columns [x0, x0 + width) of channels [c0, c0 + count) of image n,
// pixel-major with the channels as lanes: buf[(r * width + x) * L + l], zero outside the image
// and beyond count. For NCHW images, whose channels are far apart: each image row is read once,
// contiguously, and transposed in the cache, where gathering a vector of channels per pixel
// reads a cache line per lane.
template <typename T>
void gather_rows(const Image& im, int64_t n, int64_t c0, int64_t count, int64_t y0, int rows, int64_t x0,
                 int64_t width, T* buf) {
  constexpr int64_t L = Vectorized<T>::size();
  std::fill(buf, buf + rows * width * L, T(0));
  const int64_t xa = std::max<int64_t>(x0, 0), xb = std::min<int64_t>(x0 + width, im.W);
  for (int64_t l = 0; l < count; ++l) {
    for (int r = 0; r < rows; ++r) {
      const int64_t y = y0 + r;
      if (y < 0 || y >= im.H) {
        continue;
      }
      const T* src = pixel<T>(im, n, c0 + l, y, 0);
      T* dst = buf + (r * width + (xa - x0)) * L + l;
      for (int64_t x = xa; x < xb; ++x, dst += L) {
        *dst = src[x];
      }
    }
  }
}

// The row-at-a-time forms of input, output_t and input_t for NCHW images (stride_w == 1) and
// ranges of whole tile rows. Items: (tile row r of the range, channel block b) = r * blocks + b;
// input_t_rows's item i is the row 2 * (i / blocks) + parity of the range.
template <typename T>
void input_rows(const Args& a, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const Image& im = a.image;
  const int64_t blocks = (im.C + L - 1) / L;
  const int64_t width = 4 * im.tw + 2;
  std::vector<T> buffer(static_cast<size_t>(6 * width * L));
  V d[6][6], o[6][6];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t row = a.tiles.first / im.tw + item / blocks;
    const int64_t c0 = (item % blocks) * L;
    const int64_t count = std::min<int64_t>(L, im.C - c0);
    gather_rows(im, row / im.th, c0, count, 4 * (row % im.th) - 1, 6, -1, width, buffer.data());
    for (int64_t tx = 0; tx < im.tw; ++tx) {
      const int64_t q = row * im.tw + tx - a.tiles.first;
      for (int i = 0; i < 6; ++i) {
        for (int j = 0; j < 6; ++j) {
          d[i][j] = V::loadu(buffer.data() + (i * width + 4 * tx + j) * L);
        }
      }
      sandwich<T, 6, 6, kBT>(d, o);
      for (int i = 0; i < 6; ++i) {
        for (int j = 0; j < 6; ++j) {
          store_tile(at_position<T>(a.tiles, i * 6 + j) + q * im.C + c0, count, o[i][j], a.stream);
        }
      }
    }
  }
  if (a.stream) {
    stream_fence();
  }
}

template <typename T>
void output_t_rows(const Args& a, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const Image& im = a.image;
  const int64_t blocks = (im.C + L - 1) / L;
  const int64_t width = 4 * im.tw;
  std::vector<T> buffer(static_cast<size_t>(4 * width * L));
  V d[4][4], o[6][6];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t row = a.tiles.first / im.tw + item / blocks;
    const int64_t k0 = (item % blocks) * L;
    const int64_t count = std::min<int64_t>(L, im.C - k0);
    gather_rows(im, row / im.th, k0, count, 4 * (row % im.th), 4, 0, width, buffer.data());
    for (int64_t tx = 0; tx < im.tw; ++tx) {
      const int64_t q = row * im.tw + tx - a.tiles.first;
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          d[i][j] = V::loadu(buffer.data() + (i * width + 4 * tx + j) * L);
        }
      }
      sandwich<T, 4, 6, kA>(d, o);
      for (int i = 0; i < 6; ++i) {
        for (int j = 0; j < 6; ++j) {
          store_tile(at_position<T>(a.tiles, i * 6 + j) + q * im.C + k0, count, o[i][j], a.stream);
        }
      }
    }
  }
  if (a.stream) {
    stream_fence();
  }
}

template <typename T>
void input_t_rows(const Args& a, int64_t parity, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const Image& im = a.image;
  const int64_t blocks = (im.C + L - 1) / L;
  const int64_t width = 4 * im.tw + 2;
  std::vector<T> buffer(static_cast<size_t>(6 * width * L));
  V d[6][6], o[6][6];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t row = a.tiles.first / im.tw + 2 * (item / blocks) + parity;
    const int64_t n = row / im.th, ty = row % im.th;
    const int64_t c0 = (item % blocks) * L;
    const int64_t count = std::min<int64_t>(L, im.C - c0);
    std::fill(buffer.begin(), buffer.end(), T(0));
    for (int64_t tx = 0; tx < im.tw; ++tx) {
      const int64_t q = row * im.tw + tx - a.tiles.first;
      for (int i = 0; i < 6; ++i) {
        for (int j = 0; j < 6; ++j) {
          d[i][j] = load_tile(at_position<T>(a.tiles, i * 6 + j) + q * im.C + c0, count);
        }
      }
      sandwich<T, 6, 6, kB>(d, o);
      for (int i = 0; i < 6; ++i) {
        for (int j = 0; j < 6; ++j) {
          T* at = buffer.data() + (i * width + 4 * tx + j) * L;
          (V::loadu(at) + o[i][j]).store(at);
        }
      }
    }
    const int64_t xb = std::min<int64_t>(width - 1, im.W);
    for (int64_t l = 0; l < count; ++l) {
      for (int r = 0; r < 6; ++r) {
        const int64_t y = 4 * ty - 1 + r;
        if (y < 0 || y >= im.H) {
          continue;
        }
        T* dst = pixel<T>(im, n, c0 + l, y, 0);
        const T* src = buffer.data() + (r * width + 1) * L + l;
        for (int64_t x = 0; x < xb; ++x) {
          dst[x] += src[x * L];
        }
      }
    }
  }
}

// output for an image whose rows are contiguous but whose channels are not (NCHW): storing a
// tile's 4x4 pixels channel by channel would write 4 floats into each of 4 * V::size() lines per
// tile, every line finished by four different tiles (measured 72 ms for a (4, 512, 64, 64)
// output, 2 threads). Instead a whole row of tiles is assembled for V::size() channels in a
// buffer, then stored row by row. Items: (tile row r of the range, channel block b), item =
// r * blocks + b; the range must be whole tile rows.
template <typename T>
void output_rows(const Args& a, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const Image& im = a.image;
  const T* bias = static_cast<const T*>(a.bias);
  const int64_t blocks = (im.C + L - 1) / L;
  const int64_t width = 4 * im.tw;
  std::vector<T> buffer(static_cast<size_t>(L * 4 * width));
  V d[6][6], o[4][4];
  alignas(64) T lanes[L];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t row = a.tiles.first / im.tw + item / blocks;
    const int64_t k0 = (item % blocks) * L;
    const int64_t n = row / im.th, ty = row % im.th;
    const int64_t count = std::min<int64_t>(L, im.C - k0);
    const V b = bias == nullptr ? V(T(0)) : load_tile(bias + k0, count);
    for (int64_t tx = 0; tx < im.tw; ++tx) {
      const int64_t q = row * im.tw + tx - a.tiles.first;
      for (int i = 0; i < 6; ++i) {
        for (int j = 0; j < 6; ++j) {
          d[i][j] = load_tile(at_position<T>(a.tiles, i * 6 + j) + q * im.C + k0, count);
        }
      }
      sandwich<T, 6, 4, kAT>(d, o);
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          (o[i][j] + b).store(lanes);
          T* column = buffer.data() + i * width + 4 * tx + j;
          for (int64_t l = 0; l < L; ++l) {
            column[l * 4 * width] = lanes[l];
          }
        }
      }
    }
    for (int64_t l = 0; l < count; ++l) {
      for (int i = 0; i < 4 && 4 * ty + i < im.H; ++i) {
        std::memcpy(pixel<T>(im, n, k0 + l, 4 * ty + i, 0), buffer.data() + (l * 4 + i) * width,
                    sizeof(T) * im.W);
      }
    }
  }
}

template <typename T, int M>
void output_t(const Args& a, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  using W = Transform<M>;
  constexpr int R = W::R;
  const Image& im = a.image;
  V d[M][M], o[R][R];
  for (int64_t q = begin; q < end; ++q) {
    const TilePos tp = tile_of(im, a.tiles.first + q);
    for (int64_t k0 = 0; k0 < im.C; k0 += V::size()) {
      const int64_t count = std::min<int64_t>(V::size(), im.C - k0);
      for (int i = 0; i < M; ++i) {
        const int64_t y = M * tp.ty + i;
        for (int j = 0; j < M; ++j) {
          const int64_t x = M * tp.tx + j;
          d[i][j] = y < im.H && x < im.W ? load_channels(pixel<T>(im, tp.n, k0, y, x), im.stride_c, count) : V(T(0));
        }
      }
      sandwich<T, M, R, W::A>(d, o);
      for (int i = 0; i < R; ++i) {
        for (int j = 0; j < R; ++j) {
          store_tile(at_position<T>(a.tiles, i * R + j) + q * im.C + k0, count, o[i][j], a.stream);
        }
      }
    }
  }
  if (a.stream) {
    stream_fence();
  }
}

template <typename T, int M>
void input_t(const Args& a, int64_t parity, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  using W = Transform<M>;
  constexpr int R = W::R;
  const Image& im = a.image;
  V d[R][R], o[R][R];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t row = a.tiles.first / im.tw + 2 * item + parity;
    const int64_t n = row / im.th;
    const int64_t ty = row % im.th;
    for (int64_t c0 = 0; c0 < im.C; c0 += V::size()) {
      const int64_t count = std::min<int64_t>(V::size(), im.C - c0);
      // left to right: tile tx + 1 adds onto the two columns tile tx wrote last
      for (int64_t tx = 0; tx < im.tw; ++tx) {
        const int64_t q = row * im.tw + tx - a.tiles.first;
        for (int i = 0; i < R; ++i) {
          for (int j = 0; j < R; ++j) {
            d[i][j] = load_tile(at_position<T>(a.tiles, i * R + j) + q * im.C + c0, count);
          }
        }
        sandwich<T, R, R, W::B>(d, o);
        for (int i = 0; i < R; ++i) {
          const int64_t y = M * ty - 1 + i;
          if (y < 0 || y >= im.H) {
            continue;
          }
          for (int j = 0; j < R; ++j) {
            const int64_t x = M * tx - 1 + j;
            if (x >= 0 && x < im.W) {
              store_channels(pixel<T>(im, n, c0, y, x), im.stride_c, count, o[i][j], true);
            }
          }
        }
      }
    }
  }
}

// F(2x2, 3x3)'s weight transform: the image is the weight (C_out, C_in, 3, 3) (N = C_out), the
// tiles the 16 (C_out, C_in) blocks of U = G g G^T. Items: output channels.
template <typename T>
void weight2(const Args& a, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  const Image& im = a.image;
  V d[3][3], o[4][4];
  for (int64_t k = begin; k < end; ++k) {
    for (int64_t c0 = 0; c0 < im.C; c0 += V::size()) {
      const int64_t count = std::min<int64_t>(V::size(), im.C - c0);
      for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
          d[i][j] = load_channels(pixel<T>(im, k, c0, i, j), im.stride_c, count);
        }
      }
      sandwich<T, 3, 4, kG2>(d, o);
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          store_tile(at_position<T>(a.tiles, i * 4 + j) + k * im.C + c0, count, o[i][j], a.stream);
        }
      }
    }
  }
  if (a.stream) {
    stream_fence();
  }
}

// Its adjoint: the weight gradient (C_out, C_in, 3, 3) = G^T dU G of the 16 blocks of dU.
template <typename T>
void weight2_t(const Args& a, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  const Image& im = a.image;
  V d[4][4], o[3][3];
  for (int64_t k = begin; k < end; ++k) {
    for (int64_t c0 = 0; c0 < im.C; c0 += V::size()) {
      const int64_t count = std::min<int64_t>(V::size(), im.C - c0);
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          d[i][j] = load_tile(at_position<T>(a.tiles, i * 4 + j) + k * im.C + c0, count);
        }
      }
      sandwich<T, 4, 3, kGT2>(d, o);
      for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
          store_channels(pixel<T>(im, k, c0, i, j), im.stride_c, count, o[i][j], false);
        }
      }
    }
  }
}

int64_t channel_blocks(int64_t C, bool f64) {
  const int64_t width = f64 ? Vectorized<double>::size() : Vectorized<float>::size();
  return (C + width - 1) / width;
}

template <typename T>
DtypeKernels dtype_kernels() {
  return {input<T, 4>,    input_rows<T>,    output<T, 4>, output_rows<T>, output_t<T, 4>,
          output_t_rows<T>, input_t<T, 4>,  input_t_rows<T>, {input<T, 2>, output<T, 2>, output_t<T, 2>, input_t<T, 2>, weight2<T>, weight2_t<T>}};
}

}  // namespace

Kernels kernels() {
  return {dtype_kernels<float>(), dtype_kernels<double>(), channel_blocks};
}

}  // namespace mtlfast::cpu::winograd_conv::CPU_CAPABILITY
