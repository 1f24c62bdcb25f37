// Interface between the portable dispatcher (winograd_conv.cpp) and the copies of the Winograd
// F(4x4, 3x3) and F(2x2, 3x3) transforms compiled once per instruction set (winograd_conv_kernel.h).
// Plain data only, so that the per-ISA objects depend on nothing from torch but at::vec.
#pragma once

#include <cstdint>

namespace mtlfast::cpu::winograd_conv {

// An image (N, C, H, W) with any strides (element units) and the tiling of the convolution: with
// output tiles of M x M (4 or 2) and input tiles of R x R (R = M + 2), tile p = (n * th + ty) * tw
// + tx reads input rows M ty - 1 .. M ty + M and columns M tx - 1 .. M tx + M (zero outside) and
// writes output rows M ty .. M ty + M - 1 and columns likewise (clipped to H, W).
struct Image {
  void* data;
  int64_t N, C, H, W;
  int64_t stride_n, stride_c, stride_h, stride_w;
  int64_t th, tw;
};

// The transformed tiles [first, first + count) of the P = N * th * tw: position ij (i * R + j) of
// tile first + q, channel c at data[ij] + q * C + c (R * R dense (count, C) blocks, anywhere: each
// may be a GEMM's own output; F(2x2) uses the first 16 pointers).
struct Tiles {
  void* data[36];
  int64_t first, count;
};

struct Args {
  Image image;
  Tiles tiles;
  const void* bias;  // output only: (C,) added to every pixel, or null
  bool stream;       // the tiles' stores bypass the caches
};

// Each kernel processes the work items [begin, end):
//   input:    tiles = B^T d B of every input tile d (R x R)            items: tiles q of the range
//   output:   image = A^T m A (+ bias) of every transformed tile m    items: tiles q of the range
//   *_rows:   input, output, output_t and input_t for an image with contiguous rows (stride_w == 1)
//             and a range of whole tile rows, a row of tiles at a time: items (row r, channel
//             block b) = r * blocks + b, blocks = ceil(C / the vector width) (channel_blocks);
//             input_t_rows's item i is the row 2 * (i / blocks) + parity of the range
//   output_t: tiles = A g A^T of every output-gradient tile g (M x M)   items: tiles q of the range
//   input_t:  image += B e B^T of every transformed gradient e. The range is whole tile rows (first
//             and count multiples of tw); the R x R windows of rows r = n * th + ty and r + 1 overlap,
//             so item i is the row first / tw + 2 * i + parity, and the caller runs parity 0, then 1.
using Fn = void (*)(const Args&, int64_t begin, int64_t end);
using ParityFn = void (*)(const Args&, int64_t parity, int64_t begin, int64_t end);

// F(2x2, 3x3)'s generic kernels (no *_rows forms: it serves small maps), and its weight transform
// and adjoint: the image is the weight (C_out, C_in, 3, 3), the tiles its 16 (C_out, C_in) blocks
// of U = G g G^T, items output channels.
struct SmallTileKernels {
  Fn input, output, output_t;
  ParityFn input_t;
  Fn weight, weight_t;
};

struct DtypeKernels {
  Fn input, input_rows, output, output_rows, output_t, output_t_rows;  // F(4x4, 3x3)
  ParityFn input_t, input_t_rows;
  SmallTileKernels f2;
};

struct Kernels {
  DtypeKernels f32, f64;
  int64_t (*channel_blocks)(int64_t C, bool f64);  // channel blocks of the *_rows kernels
};

namespace DEFAULT {
Kernels kernels();
}
#if defined(__x86_64__)
namespace AVX2 {
Kernels kernels();
}
namespace AVX512 {
Kernels kernels();
}
#endif

}  // namespace mtlfast::cpu::winograd_conv
