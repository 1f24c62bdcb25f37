#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <utility>

#include "cpu/dispatch.h"
#include "cpu/stream.h"
#include "cpu/winograd_conv.h"

namespace mtlfast::cpu::winograd_conv {
namespace {

// Tiles of at least this size are written with non-temporal stores: they reach memory before the
// GEMM reads them back (measured: the input transform of (4, 256, 64, 64) 10 -> 7 ms, 2 threads).
constexpr int64_t kStreamBytes = 8 << 20;

// Narrowest NCHW image that the *_rows kernels take (see winograd_output for the measurements).
constexpr int64_t kRowsMinWidth = 64;

const Kernels& isa_kernels() {
  static const Kernels table = MTLFAST_ISA_TABLE(kernels);
  return table;
}

const DtypeKernels& dtype_kernels(const char* op, at::ScalarType dtype) {
  const Kernels& table = isa_kernels();
  switch (dtype) {
    case at::kFloat:
      return table.f32;
    case at::kDouble:
      return table.f64;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (expected float32 or float64)");
  }
}

// The output tile side M of the transform the caller chose, told by how many tile positions it
// passes: 36 for F(4x4, 3x3), 16 for F(2x2, 3x3).
int64_t tile_side(const char* op, at::TensorList tiles) {
  TORCH_CHECK(tiles.size() == 36 || tiles.size() == 16, op,
              ": tiles must be 36 tensors (F(4x4, 3x3)) or 16 (F(2x2, 3x3)), one per tile position, got ",
              tiles.size());
  return tiles.size() == 36 ? 4 : 2;
}

Image image_of(const char* op, const char* name, const at::Tensor& t, int64_t m) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided && t.dim() == 4, op, ": ", name, " must be a strided 4-d tensor, got shape ",
              t.sizes());
  return {const_cast<void*>(t.const_data_ptr()),
          t.size(0),
          t.size(1),
          t.size(2),
          t.size(3),
          t.stride(0),
          t.stride(1),
          t.stride(2),
          t.stride(3),
          (t.size(2) + m - 1) / m,
          (t.size(3) + m - 1) / m};
}

Tiles tiles_for(const char* op, at::TensorList tiles, int64_t first, const Image& im, at::ScalarType dtype) {
  const int64_t P = im.N * im.th * im.tw;
  const int64_t count = tiles[0].dim() == 2 ? tiles[0].size(0) : -1;
  Tiles t{{}, first, count};
  for (size_t ij = 0; ij < tiles.size(); ++ij) {
    const at::Tensor& b = tiles[ij];
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == dtype, op, ": tiles must be CPU ", dtype,
                " tensors, got ", b.scalar_type(), " on ", b.device());
    TORCH_CHECK(b.dim() == 2 && b.size(0) == count && b.size(1) == im.C, op,
                ": tiles must have shape (Q, ", im.C, ") each, got ", b.sizes(), " at position ", ij);
    TORCH_CHECK((count <= 1 || b.stride(0) == im.C) && (im.C <= 1 || b.stride(1) == 1), op,
                ": each (Q, C) block of tiles must be dense, got strides ", b.strides(), " at position ", ij);
    t.data[ij] = const_cast<void*>(b.const_data_ptr());
  }
  TORCH_CHECK(first >= 0 && first + count <= P, op, ": the tiles [", first, ", ", first + count,
              ") are not within the image's ", P);
  return t;
}

// Streaming stores into the blocks: together at least kStreamBytes, every one mapped in.
bool stream_into_all(at::TensorList tiles) {
  int64_t bytes = 0;
  for (const at::Tensor& b : tiles) {
    bytes += static_cast<int64_t>(b.nbytes());
  }
  if (bytes < kStreamBytes) {
    return false;
  }
  for (const at::Tensor& b : tiles) {
    if (!stream_into(b, 0)) {
      return false;
    }
  }
  return true;
}

// Whether the *_rows kernels serve this image and range: F(4x4, 3x3), NCHW-like (contiguous rows,
// channels apart) on maps at least kRowsMinWidth wide, whole tile rows.
bool by_rows(const Image& im, const Tiles& tiles, int64_t m) {
  return m == 4 && im.stride_w == 1 && im.stride_c != 1 && im.W >= kRowsMinWidth && tiles.first % im.tw == 0 &&
         tiles.count % im.tw == 0;
}

int64_t blocks_of(const Image& im, at::ScalarType dtype) {
  return isa_kernels().channel_blocks(im.C, dtype == at::kDouble);
}

template <typename Fn>
void over_tiles(const Tiles& tiles, Fn fn) {
  // a grain of a few tiles: each is up to 36 * C values in and out
  at::parallel_for(0, tiles.count, 4, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

void winograd_input(const at::Tensor& x, int64_t first, at::TensorList tiles) {
  constexpr const char* op = "mtlfast_C::winograd_input";
  const int64_t m = tile_side(op, tiles);
  const Image im = image_of(op, "x", x, m);
  const Args args{im, tiles_for(op, tiles, first, im, x.scalar_type()), nullptr, stream_into_all(tiles)};
  const DtypeKernels& kernels = dtype_kernels(op, x.scalar_type());
  if (m == 2) {
    over_tiles(args.tiles, [&](int64_t b, int64_t e) { kernels.f2.input(args, b, e); });
    return;
  }
  if (by_rows(im, args.tiles, m)) {
    const int64_t items = args.tiles.count / im.tw * blocks_of(im, x.scalar_type());
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) { kernels.input_rows(args, b, e); });
    return;
  }
  over_tiles(args.tiles, [&](int64_t b, int64_t e) { kernels.input(args, b, e); });
}

void winograd_output_t(const at::Tensor& grad_out, int64_t first, at::TensorList tiles) {
  constexpr const char* op = "mtlfast_C::winograd_output_t";
  const int64_t m = tile_side(op, tiles);
  const Image im = image_of(op, "grad_out", grad_out, m);
  const Args args{im, tiles_for(op, tiles, first, im, grad_out.scalar_type()), nullptr, stream_into_all(tiles)};
  const DtypeKernels& kernels = dtype_kernels(op, grad_out.scalar_type());
  if (m == 2) {
    over_tiles(args.tiles, [&](int64_t b, int64_t e) { kernels.f2.output_t(args, b, e); });
    return;
  }
  if (by_rows(im, args.tiles, m)) {
    const int64_t items = args.tiles.count / im.tw * blocks_of(im, grad_out.scalar_type());
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) { kernels.output_t_rows(args, b, e); });
    return;
  }
  over_tiles(args.tiles, [&](int64_t b, int64_t e) { kernels.output_t(args, b, e); });
}

void winograd_output(at::TensorList tiles, int64_t first, const std::optional<at::Tensor>& bias,
                     const at::Tensor& out) {
  constexpr const char* op = "mtlfast_C::winograd_output";
  const int64_t m = tile_side(op, tiles);
  const Image im = image_of(op, "out", out, m);
  const void* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == im.C && bias->is_contiguous() &&
                    bias->scalar_type() == out.scalar_type() && bias->device().is_cpu(),
                op, ": bias must be a contiguous CPU (", im.C, ",) tensor of out's dtype, got ", bias->sizes());
    b = bias->const_data_ptr();
  }
  const Args args{im, tiles_for(op, tiles, first, im, out.scalar_type()), b, false};
  const DtypeKernels& kernels = dtype_kernels(op, out.scalar_type());
  if (m == 2) {
    over_tiles(args.tiles, [&](int64_t begin, int64_t end) { kernels.f2.output(args, begin, end); });
    return;
  }
  // a row of tiles at a time pays on wide maps only: measured (4, 512, 64, 64) forward 0.61x ->
  // 0.53x of oneDNN's, (4, 128, 128, 128) 0.85x -> 0.71x, but (4, 512, 32, 32) 0.59x -> 0.76x
  if (by_rows(im, args.tiles, m)) {
    const int64_t items = args.tiles.count / im.tw * blocks_of(im, out.scalar_type());
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { kernels.output_rows(args, begin, end); });
    return;
  }
  over_tiles(args.tiles, [&](int64_t begin, int64_t end) { kernels.output(args, begin, end); });
}

void winograd_input_t(at::TensorList tiles, int64_t first, const at::Tensor& grad_x) {
  constexpr const char* op = "mtlfast_C::winograd_input_t";
  const int64_t m = tile_side(op, tiles);
  const Image im = image_of(op, "grad_x", grad_x, m);
  const Args args{im, tiles_for(op, tiles, first, im, grad_x.scalar_type()), nullptr, false};
  TORCH_CHECK(first % im.tw == 0 && args.tiles.count % im.tw == 0, op, ": the tiles [", first, ", ",
              first + args.tiles.count, ") must be whole rows of ", im.tw, " tiles");
  const DtypeKernels& kernels = dtype_kernels(op, grad_x.scalar_type());
  const bool rows_kernel = by_rows(im, args.tiles, m);
  const ParityFn kernel = m == 2 ? kernels.f2.input_t : rows_kernel ? kernels.input_t_rows : kernels.input_t;
  const int64_t blocks = rows_kernel ? blocks_of(im, grad_x.scalar_type()) : 1;
  const int64_t rows = args.tiles.count / im.tw;
  for (int64_t parity = 0; parity < 2; ++parity) {
    const int64_t items = (rows - parity + 1) / 2 * blocks;
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) { kernel(args, parity, b, e); });
  }
}

// The weight (C_out, C_in, 3, 3) as an image of C_out "samples" of one 3x3 tile, tiles all of them.
std::pair<Image, Tiles> weight_tiles(const char* op, const at::Tensor& weight, at::TensorList tiles) {
  TORCH_CHECK(tile_side(op, tiles) == 2, op, ": only F(2x2, 3x3)'s 16 blocks are transformed here, got ",
              tiles.size());
  Image im = image_of(op, "weight", weight, 4);
  TORCH_CHECK(im.H == 3 && im.W == 3, op, ": weight must be (C_out, C_in, 3, 3), got ", weight.sizes());
  im.N = 1, im.th = 1, im.tw = weight.size(0);  // P = C_out: tile p is kernel p
  Tiles t = tiles_for(op, tiles, 0, im, weight.scalar_type());
  TORCH_CHECK(t.count == weight.size(0), op, ": tiles must have ", weight.size(0), " rows, got ", t.count);
  im.N = weight.size(0);
  return {im, t};
}

void winograd_weight(const at::Tensor& weight, at::TensorList tiles) {
  constexpr const char* op = "mtlfast_C::winograd_weight";
  const auto [im, t] = weight_tiles(op, weight, tiles);
  const Args args{im, t, nullptr, stream_into_all(tiles)};
  const DtypeKernels& kernels = dtype_kernels(op, weight.scalar_type());
  at::parallel_for(0, t.count, 8, [&](int64_t b, int64_t e) { kernels.f2.weight(args, b, e); });
}

void winograd_weight_t(at::TensorList tiles, const at::Tensor& grad_weight) {
  constexpr const char* op = "mtlfast_C::winograd_weight_t";
  const auto [im, t] = weight_tiles(op, grad_weight, tiles);
  const Args args{im, t, nullptr, false};
  const DtypeKernels& kernels = dtype_kernels(op, grad_weight.scalar_type());
  at::parallel_for(0, t.count, 8, [&](int64_t b, int64_t e) { kernels.f2.weight_t(args, b, e); });
}

}  // namespace
}  // namespace mtlfast::cpu::winograd_conv

TORCH_LIBRARY_IMPL(mtlfast_C, CPU, m) {
  m.impl("winograd_input", &mtlfast::cpu::winograd_conv::winograd_input);
  m.impl("winograd_input_t", &mtlfast::cpu::winograd_conv::winograd_input_t);
  m.impl("winograd_output", &mtlfast::cpu::winograd_conv::winograd_output);
  m.impl("winograd_output_t", &mtlfast::cpu::winograd_conv::winograd_output_t);
  m.impl("winograd_weight", &mtlfast::cpu::winograd_conv::winograd_weight);
  m.impl("winograd_weight_t", &mtlfast::cpu::winograd_conv::winograd_weight_t);
}
