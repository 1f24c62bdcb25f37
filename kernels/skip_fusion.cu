// UberNet's skip-layer score fusion, CUDA: out = bias + sum_k weight[k] * bilinear(scores[k]), and
// its backward, without a full-resolution map per layer. Every thread owns a tile of kRows output
// rows by kVec columns of one (n, c) plane and loops over the layers: a layer's horizontal taps are
// shared down the tile's rows, and consecutive rows mostly read (forward) or feed (backward) the
// same source rows, so the forward interpolates each source row once per tile and the backward
// merges the tile's contributions per source pixel before one atomic add each.
#include "skip_fusion.cuh"

#include "common.cuh"

#include <algorithm>
#include <climits>
#include <type_traits>

namespace mtlfast::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kRows = 8;
constexpr int kVec = 4;  // one 16-byte access of float, 8 bytes of a 2-byte type
constexpr int kMaxLayers = kSkipFusionMaxLayers;

template <typename T>
__device__ __forceinline__ float load1(const T* p) {
  return Elem<T>::to_float(__ldg(reinterpret_cast<const typename Elem<T>::Bits*>(p)));
}

template <typename T>
__device__ __forceinline__ void store1(T* p, float x) {
  *reinterpret_cast<typename Elem<T>::Bits*>(p) = Elem<T>::from_float(x);
}

// kVec consecutive elements as one access of 32-bit words, element 0 in the low bits.
template <typename T>
struct Words {
  static constexpr int kCount = kVec * int(sizeof(T)) / 4;
  using Vector = std::conditional_t<kCount == 4, uint4, uint2>;
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[kVec]) {
  using W = Words<T>;
  const typename W::Vector v = *reinterpret_cast<const typename W::Vector*>(p);
  unsigned words[W::kCount];
  if constexpr (W::kCount == 4) {
    words[0] = v.x, words[1] = v.y, words[2] = v.z, words[3] = v.w;
  } else {
    words[0] = v.x, words[1] = v.y;
  }
  unpack_words<T>(words, x);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&x)[kVec]) {
  using W = Words<T>;
  unsigned words[W::kCount] = {};
  pack_words<T>(x, words);
  if constexpr (W::kCount == 4) {
    *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
    *reinterpret_cast<uint2*>(p) = make_uint2(words[0], words[1]);
  }
}

// One layer's sizes and aten's resize scales H_k / H, W_k / W (rounded once, on the host).
struct Layer {
  int h, w;
  float scale_h, scale_w;
};

template <typename T>
struct FwdLayers {
  const T* scores[kMaxLayers];
  Layer layer[kMaxLayers];
};

// The backward also names each layer's float accumulator (grad_scores itself for float).
template <typename T>
struct BwdLayers {
  const T* scores[kMaxLayers];
  float* grads[kMaxLayers];
  Layer layer[kMaxLayers];
};

// Where the threads' tiles lie: planes of h x w outputs cut into row_groups x col_groups tiles.
struct Tiling {
  int64_t planes;
  int c, h, w, k;
  int row_groups, col_groups;
};

// aten's align_corners=False source taps of output index dst: value = l0 * s[i0] + l1 * s[i1].
struct Tap {
  int i0, i1;
  float l0, l1;
};

__device__ __forceinline__ Tap tap(int dst, float scale, int size) {
  // aten's scale * (dst + 0.5) - 0.5 as its CPU and CUDA builds compile it: one fused multiply-add.
  float src = __fmaf_rn(scale, float(dst) + 0.5f, -0.5f);
  src = src < 0.0f ? 0.0f : src;
  const int i0 = int(src);
  const float l1 = src - float(i0);
  return {i0, i0 + (i0 < size - 1 ? 1 : 0), 1.0f - l1, l1};
}

// Taps of the tile's kVec columns; columns past the plane repeat the last one (their values are
// never stored, their gradients are zero).
__device__ __forceinline__ void column_taps(int x_base, int w, const Layer& layer, Tap (&tx)[kVec]) {
#pragma unroll
  for (int v = 0; v < kVec; ++v) tx[v] = tap(min(x_base + v, w - 1), layer.scale_w, layer.w);
}

template <typename T>
__device__ __forceinline__ void lerp_row(const T* row, const Tap (&tx)[kVec], float (&out)[kVec]) {
#pragma unroll
  for (int v = 0; v < kVec; ++v) out[v] = tx[v].l0 * load1(row + tx[v].i0) + tx[v].l1 * load1(row + tx[v].i1);
}

// acc[r][v] += w * bilinear(src)[y_base + r, x_base + v]: each source row is interpolated along x
// once per run of output rows that reads it.
template <typename T>
__device__ __forceinline__ void add_layer(float (&acc)[kRows][kVec], const T* src, const Layer& layer, float w,
                                          int y_base, int x_base, const Tiling& t) {
  Tap tx[kVec];
  column_taps(x_base, t.w, layer, tx);
  float top[kVec], bottom[kVec];
  int row_top = -1, row_bottom = -1;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (y_base + r >= t.h) break;
    const Tap ty = tap(y_base + r, layer.scale_h, layer.h);
    if (ty.i0 != row_top) {
      if (ty.i0 == row_bottom) {
#pragma unroll
        for (int v = 0; v < kVec; ++v) top[v] = bottom[v];
      } else {
        lerp_row(src + ty.i0 * layer.w, tx, top);
      }
      lerp_row(src + ty.i1 * layer.w, tx, bottom);
      row_top = ty.i0;
      row_bottom = ty.i1;
    }
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[r][v] += w * (ty.l0 * top[v] + ty.l1 * bottom[v]);
  }
}

// First output row and column of the tile-th tile of a plane.
struct TileAt {
  int y, x;
};

__device__ __forceinline__ TileAt tile_at(int tile, const Tiling& t) {
  return {tile / t.col_groups * kRows, tile % t.col_groups * kVec};
}

template <typename T, bool kVecIO>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const __grid_constant__ FwdLayers<T> layers, Tiling t, const T* __restrict__ weight,
               const T* __restrict__ bias, T* __restrict__ out) {
  const int64_t per_plane = int64_t(t.row_groups) * t.col_groups;
  const int64_t n_tiles = t.planes * per_plane;
  for (int64_t tile = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; tile < n_tiles;
       tile += int64_t(gridDim.x) * blockDim.x) {
    const int64_t plane = tile / per_plane;
    const TileAt at = tile_at(int(tile - plane * per_plane), t);
    const int c = int(plane % t.c);
    const float b = bias ? load1(bias + c) : 0.0f;
    float acc[kRows][kVec];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[r][v] = b;
    }
    for (int k = 0; k < t.k; ++k) {
      const Layer& layer = layers.layer[k];
      const T* src = layers.scores[k] + plane * (int64_t(layer.h) * layer.w);
      add_layer(acc, src, layer, load1(weight + int64_t(k) * t.c + c), at.y, at.x, t);
    }
    T* dst = out + plane * (int64_t(t.h) * t.w) + at.x;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (at.y + r >= t.h) break;
      T* row = dst + (at.y + r) * t.w;
      if constexpr (kVecIO) {
        store_vec(row, acc[r]);
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          if (at.x + v < t.w) store1(row + v, acc[r][v]);
        }
      }
    }
  }
}

// One layer's backward for a thread's tile: adds w * q to the accumulator of every source pixel the
// tile feeds, q being the tile's share of the adjoint there, and returns sum(q * source pixel).
template <typename T>
struct LayerGrad {
  const T* src;
  float* dst;
  const Layer& layer;
  float w;
  float dot = 0.0f;

  __device__ __forceinline__ void emit(int row, int col, float q) {
    // Exact zeros (equal sizes, clamped borders) would cost an atomic each and change nothing.
    if (q == 0.0f || col >= layer.w) return;
    const int at = row * layer.w + col;
    atomicAdd(dst + at, w * q);
    dot += q * load1(src + at);
  }

  // Spreads the column sums of source row `row` over its source columns: the taps' i0 never
  // decrease along the tile, so a source column is complete once the next tap starts past it.
  __device__ __forceinline__ void emit_row(int row, const Tap (&tx)[kVec], const float (&sums)[kVec]) {
    if (row >= layer.h) return;
    int col = tx[0].i0;
    float q0 = 0.0f, q1 = 0.0f;  // pending shares of columns col and col + 1
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const int step = tx[v].i0 - col;
      if (step > 0) {
        emit(row, col, q0);
        if (step > 1) {
          emit(row, col + 1, q1);
          q0 = 0.0f;
        } else {
          q0 = q1;
        }
        q1 = 0.0f;
        col = tx[v].i0;
      }
      q0 += tx[v].l0 * sums[v];
      const float right = tx[v].l1 * sums[v];
      if (tx[v].i1 == tx[v].i0) {
        q0 += right;
      } else {
        q1 += right;
      }
    }
    emit(row, col, q0);
    emit(row, col + 1, q1);
  }

  // Same merge down the tile's rows: per column, the pending sums of source rows `row`, row + 1.
  __device__ __forceinline__ void run(const float (&g)[kRows][kVec], int y_base, int x_base, const Tiling& t) {
    Tap tx[kVec];
    column_taps(x_base, t.w, layer, tx);
    float top[kVec] = {}, bottom[kVec] = {};
    int row = -1;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (y_base + r >= t.h) break;
      const Tap ty = tap(y_base + r, layer.scale_h, layer.h);
      if (ty.i0 != row) {
        if (row >= 0) {
          emit_row(row, tx, top);
          if (ty.i0 != row + 1) emit_row(row + 1, tx, bottom);
#pragma unroll
          for (int v = 0; v < kVec; ++v) {
            top[v] = ty.i0 == row + 1 ? bottom[v] : 0.0f;
            bottom[v] = 0.0f;
          }
        }
        row = ty.i0;
      }
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        top[v] += ty.l0 * g[r][v];
        const float down = ty.l1 * g[r][v];
        if (ty.i1 == ty.i0) {
          top[v] += down;
        } else {
          bottom[v] += down;
        }
      }
    }
    if (row >= 0) {
      emit_row(row, tx, top);
      emit_row(row + 1, tx, bottom);
    }
  }
};

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane gets its group's sum.
__device__ __forceinline__ float group_sum(float x, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// How the backward's blocks split the tiles: a block is chunk `b % n_chunks` of span tiles in each
// of planes_per_block consecutive planes (span a power of two, span * planes_per_block = kThreads),
// so that a plane's share of grad_weight is reduced in the block before its one atomic add.
struct Blocks {
  int span_log2;
  int planes_per_block;
  int64_t n_chunks;
  int64_t n_blocks;
};

template <typename T, bool kVecIO>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const __grid_constant__ BwdLayers<T> layers, Tiling t, Blocks blocks, const T* __restrict__ grad_out,
               const T* __restrict__ weight, float* __restrict__ grad_weight, float* __restrict__ grad_bias) {
  // Per layer (and the bias last), one partial sum per lane group of every plane in the block.
  __shared__ float partial[kMaxLayers + 1][kThreads];
  const int span = 1 << blocks.span_log2;
  const int group = min(span, 32);
  const int parts = span / group;  // partial sums per plane
  const int64_t per_plane = int64_t(t.row_groups) * t.col_groups;
  const int in_plane = threadIdx.x & (span - 1);
  const int slot = threadIdx.x / group;
  const bool leader = (threadIdx.x & (group - 1)) == 0;
  for (int64_t b = blockIdx.x; b < blocks.n_blocks; b += gridDim.x) {
    const int64_t first_plane = b / blocks.n_chunks * blocks.planes_per_block;
    const int64_t plane = first_plane + (threadIdx.x >> blocks.span_log2);
    const int64_t tile = ((b % blocks.n_chunks) << blocks.span_log2) + in_plane;
    const bool valid = plane < t.planes && tile < per_plane;
    const TileAt at = tile_at(valid ? int(tile) : 0, t);
    float g[kRows][kVec];
    float g_sum = 0.0f;
    const T* src = grad_out + plane * (int64_t(t.h) * t.w) + at.x;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const bool row_ok = valid && at.y + r < t.h;
      if (kVecIO && row_ok) {
        load_vec(src + (at.y + r) * t.w, g[r]);
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) g[r][v] = row_ok && at.x + v < t.w ? load1(src + (at.y + r) * t.w + v) : 0.0f;
      }
#pragma unroll
      for (int v = 0; v < kVec; ++v) g_sum += g[r][v];
    }
    const int c = int(plane % t.c);
    for (int k = 0; k < t.k; ++k) {
      const Layer& layer = layers.layer[k];
      const int64_t offset = plane * (int64_t(layer.h) * layer.w);
      float dot = 0.0f;
      if (valid) {
        LayerGrad<T> lg{layers.scores[k] + offset, layers.grads[k] + offset, layer,
                        load1(weight + int64_t(k) * t.c + c)};
        lg.run(g, at.y, at.x, t);
        dot = lg.dot;
      }
      dot = group_sum(dot, group);
      if (leader) partial[k][slot] = dot;
    }
    g_sum = group_sum(g_sum, group);
    if (leader) partial[t.k][slot] = g_sum;
    __syncthreads();
    const int n_sums = (t.k + (grad_bias ? 1 : 0)) * blocks.planes_per_block;
    for (int s = threadIdx.x; s < n_sums; s += blockDim.x) {
      const int k = s / blocks.planes_per_block;
      const int i = s - k * blocks.planes_per_block;
      const int64_t p = first_plane + i;
      if (p >= t.planes) continue;
      float sum = 0.0f;
      for (int j = 0; j < parts; ++j) sum += partial[k][i * parts + j];
      const int pc = int(p % t.c);
      if (sum != 0.0f) atomicAdd(k < t.k ? grad_weight + int64_t(k) * t.c + pc : grad_bias + pc, sum);
    }
    __syncthreads();  // partial is rewritten by the next block
  }
}

// The float accumulators of the reduced-precision backward, cast into their outputs: segment
// blockIdx.y, ending at end[segment] in the workspace, goes to dst[segment].
template <typename T>
struct CastSegments {
  T* dst[kMaxLayers + 2];
  int64_t end[kMaxLayers + 2];
};

template <typename T>
__global__ void __launch_bounds__(kThreads) cast_kernel(const __grid_constant__ CastSegments<T> segments,
                                                         const float* __restrict__ src) {
  const int s = blockIdx.y;
  const int64_t start = s == 0 ? 0 : segments.end[s - 1];
  const int64_t n = segments.end[s] - start;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    store1(segments.dst[s] + i, src[start + i]);
  }
}

Tiling tiling(const SkipFusionShape& shape) {
  return {shape.n * shape.c,
          int(shape.c),
          int(shape.h),
          int(shape.w),
          shape.k,
          int((shape.h + kRows - 1) / kRows),
          int((shape.w + kVec - 1) / kVec)};
}

Layer layer_of(const SkipFusionShape& shape, int k) {
  // aten's area_pixel_compute_scale: a float division of the sizes.
  return {int(shape.layer_h[k]), int(shape.layer_w[k]), float(shape.layer_h[k]) / float(shape.h),
          float(shape.layer_w[k]) / float(shape.w)};
}

// Whole kVec-element rows of 16 (float) or 8 bytes, aligned at p.
template <typename T>
bool vec_io(const SkipFusionShape& shape, const T* p) {
  return shape.w % kVec == 0 && reinterpret_cast<uintptr_t>(p) % (kVec * sizeof(T)) == 0;
}

bool valid_shape(const SkipFusionShape& shape) {
  return shape.k >= 1 && shape.k <= kMaxLayers;
}

unsigned grid_for(int64_t n, int threads) {
  return unsigned(std::min<int64_t>((n + threads - 1) / threads, INT_MAX));
}

template <typename T>
void launch_bwd(const SkipFusionShape& shape, const T* grad_out, const BwdLayers<T>& layers, const T* weight,
                float* grad_weight, float* grad_bias, cudaStream_t stream) {
  const Tiling t = tiling(shape);
  const int64_t per_plane = int64_t(t.row_groups) * t.col_groups;
  // A plane's tiles rounded up to a power of two, at most a block: small planes share blocks.
  Blocks blocks{0, 0, 0, 0};
  while ((1 << blocks.span_log2) < std::min<int64_t>(per_plane, kThreads)) ++blocks.span_log2;
  blocks.planes_per_block = kThreads >> blocks.span_log2;
  blocks.n_chunks = (per_plane + (int64_t(1) << blocks.span_log2) - 1) >> blocks.span_log2;
  blocks.n_blocks = (t.planes + blocks.planes_per_block - 1) / blocks.planes_per_block * blocks.n_chunks;
  const unsigned grid = unsigned(std::min<int64_t>(blocks.n_blocks, INT_MAX));
  if (vec_io(shape, grad_out)) {
    bwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(layers, t, blocks, grad_out, weight, grad_weight, grad_bias);
  } else {
    bwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(layers, t, blocks, grad_out, weight, grad_weight, grad_bias);
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t skip_fusion_fwd(const SkipFusionShape& shape, const scalar_t* const* scores, const scalar_t* weight,
                            const scalar_t* bias, scalar_t* out, cudaStream_t stream) {
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  if (shape.n * shape.c * shape.h * shape.w == 0) return cudaSuccess;
  FwdLayers<scalar_t> layers{};
  for (int k = 0; k < shape.k; ++k) {
    layers.scores[k] = scores[k];
    layers.layer[k] = layer_of(shape, k);
  }
  const Tiling t = tiling(shape);
  const int64_t n_tiles = t.planes * t.row_groups * t.col_groups;
  // Narrow blocks when there are few tiles, so that most threads have one.
  const int threads = int(std::min<int64_t>(kThreads, (n_tiles + 31) / 32 * 32));
  const unsigned grid = grid_for(n_tiles, threads);
  if (vec_io(shape, out)) {
    fwd_kernel<scalar_t, true><<<grid, threads, 0, stream>>>(layers, t, weight, bias, out);
  } else {
    fwd_kernel<scalar_t, false><<<grid, threads, 0, stream>>>(layers, t, weight, bias, out);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
int64_t skip_fusion_bwd_workspace(const SkipFusionShape& shape, bool with_grad_bias) {
  if (std::is_same_v<scalar_t, float>) return 0;
  int64_t n = shape.c * (shape.k + (with_grad_bias ? 1 : 0));
  for (int k = 0; k < shape.k; ++k) n += shape.n * shape.c * shape.layer_h[k] * shape.layer_w[k];
  return n;
}

template <typename scalar_t>
cudaError_t skip_fusion_bwd(const SkipFusionShape& shape, const scalar_t* grad_out, const scalar_t* const* scores,
                            const scalar_t* weight, scalar_t* const* grad_scores, scalar_t* grad_weight,
                            scalar_t* grad_bias, float* workspace, cudaStream_t stream) {
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  BwdLayers<scalar_t> layers{};
  float* acc_weight;
  float* acc_bias = nullptr;
  if constexpr (std::is_same_v<scalar_t, float>) {
    // Float gradients are their own accumulators.
    for (int k = 0; k < shape.k; ++k) {
      const int64_t n = shape.n * shape.c * shape.layer_h[k] * shape.layer_w[k];
      if (cudaError_t e = cudaMemsetAsync(grad_scores[k], 0, n * sizeof(float), stream)) return e;
      layers.grads[k] = grad_scores[k];
    }
    acc_weight = grad_weight;
    acc_bias = grad_bias;
    if (cudaError_t e = cudaMemsetAsync(acc_weight, 0, shape.k * shape.c * sizeof(float), stream)) return e;
    if (acc_bias) {
      if (cudaError_t e = cudaMemsetAsync(acc_bias, 0, shape.c * sizeof(float), stream)) return e;
    }
  } else {
    const int64_t n_floats = skip_fusion_bwd_workspace<scalar_t>(shape, grad_bias != nullptr);
    if (cudaError_t e = cudaMemsetAsync(workspace, 0, n_floats * sizeof(float), stream)) return e;
    float* next = workspace;
    for (int k = 0; k < shape.k; ++k) {
      layers.grads[k] = next;
      next += shape.n * shape.c * shape.layer_h[k] * shape.layer_w[k];
    }
    acc_weight = next;
    if (grad_bias) acc_bias = next + shape.k * shape.c;
  }
  for (int k = 0; k < shape.k; ++k) {
    layers.scores[k] = scores[k];
    layers.layer[k] = layer_of(shape, k);
  }
  if (shape.n * shape.c * shape.h * shape.w > 0) {
    launch_bwd(shape, grad_out, layers, weight, acc_weight, acc_bias, stream);
  }
  if constexpr (!std::is_same_v<scalar_t, float>) {
    // Segments in workspace order: the layers' grads, grad_weight, grad_bias.
    CastSegments<scalar_t> segments{};
    int n_segments = 0;
    int64_t end = 0, longest = 0;
    const auto add = [&](scalar_t* dst, int64_t n) {
      end += n;
      segments.dst[n_segments] = dst;
      segments.end[n_segments] = end;
      ++n_segments;
      longest = std::max(longest, n);
    };
    for (int k = 0; k < shape.k; ++k) add(grad_scores[k], shape.n * shape.c * shape.layer_h[k] * shape.layer_w[k]);
    add(grad_weight, shape.k * shape.c);
    if (grad_bias) add(grad_bias, shape.c);
    if (longest > 0) {
      const dim3 grid(std::min(grid_for(longest, kThreads), 4096u), unsigned(n_segments));
      cast_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(segments, workspace);
    }
  }
  return cudaGetLastError();
}

#define MTLFAST_INSTANTIATE(T)                                                                                  \
  template cudaError_t skip_fusion_fwd<T>(const SkipFusionShape&, const T* const*, const T*, const T*, T*,     \
                                          cudaStream_t);                                                       \
  template int64_t skip_fusion_bwd_workspace<T>(const SkipFusionShape&, bool);                                 \
  template cudaError_t skip_fusion_bwd<T>(const SkipFusionShape&, const T*, const T* const*, const T*, T* const*, \
                                          T*, T*, float*, cudaStream_t);

MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(__half)
MTLFAST_INSTANTIATE(__nv_bfloat16)

#undef MTLFAST_INSTANTIATE

}  // namespace mtlfast::cuda
