// Task-conditioned squeeze-and-excitation (ASTMT), CUDA: the memory-bound passes over the features
// around the per-task linear layers. pool and backward_gate reduce every (n, c) plane; scale and
// backward_input are elementwise with a per-(n, c) gate. Each kernel runs the program decomposition
// of its Triton twin (mtlfast/ops/triton/task_se.py); math in float, 16-byte vector accesses when
// the base pointers allow.
#include "task_se.cuh"

#include "common.cuh"

#include <algorithm>
#include <climits>
#include <type_traits>

namespace mtlfast::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kMaxVec = kVecBytes / 2;
// NCHW reductions: planes of up to kTile / 2 elements are packed kTile / next_pow2(HW) to a block;
// longer ones get a block each.
constexpr int64_t kTile = 2048;
// NHWC reductions: a block covers kChunkBytes of channels (a warp-wide 16-byte load per pixel) and
// the pixels are split until about kTargetBlocks blocks run, keeping at least kMinSplitPixels each.
constexpr int64_t kChunkBytes = 512;
constexpr int64_t kTargetBlocks = 2048;
constexpr int64_t kMinSplitPixels = 16;

// V floats to shared memory, p 16-byte aligned when V > 1: 128-bit stores avoid the V-way bank
// conflicts of a lane stride of V words.
template <int V>
__device__ __forceinline__ void store_shared(float* p, const float (&x)[V]) {
  if constexpr (V == 1) {
    p[0] = x[0];
  } else {
#pragma unroll
    for (int i = 0; i < V; i += 4) *reinterpret_cast<float4*>(p + i) = make_float4(x[i], x[i + 1], x[i + 2], x[i + 3]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, valid in thread 0; ends on a barrier so that the block may call it again.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < int(blockDim.x / 32) ? warp_sums[lane] : 0.f);
  __syncthreads();
  return v;
}

// Division by a fixed positive d: multiply-high and shift (Granlund-Montgomery) while every
// dividend is below 2^31, i.e. for any tensor under 2^31 elements; plain 64-bit division beyond.
struct Divider {
  int64_t d = 1;
  unsigned magic = 0;
  unsigned shift = 0;
  bool fast = false;

  Divider() = default;
  Divider(int64_t divisor, int64_t max_dividend) : d(std::max<int64_t>(divisor, 1)) {
    constexpr int64_t kLimit = int64_t(1) << 31;
    fast = max_dividend < kLimit && d < kLimit;
    if (!fast) return;
    while ((int64_t(1) << shift) < d) ++shift;
    magic = unsigned((uint64_t(1) << 32) * ((uint64_t(1) << shift) - uint64_t(d)) / uint64_t(d) + 1);
  }

  __device__ __forceinline__ int64_t div(int64_t n) const {
    if (fast) return (__umulhi(unsigned(n), magic) + unsigned(n)) >> shift;
    return n / d;
  }
};

// Gate index n*C + c of a flat element index of an (N,C,H,W) tensor in either memory order.
struct GateIndex {
  Divider hw;
  Divider c;
  bool channels_last;

  __device__ __forceinline__ int64_t operator()(int64_t i) const {
    if (!channels_last) return hw.div(i);
    const int64_t q = c.div(i);  // n*HW + pixel
    return hw.div(q) * c.d + (i - q * c.d);
  }

  // Indices of V consecutive elements from i: one lookup unless they cross a plane (NCHW) or a
  // pixel (NHWC), which only happens when HW, resp. C, is not a multiple of V.
  template <int V>
  __device__ __forceinline__ void run(int64_t i, int64_t (&idx)[V]) const {
    if (!channels_last) {
      const int64_t p = hw.div(i);
      if (i - p * hw.d + V <= hw.d) {
#pragma unroll
        for (int k = 0; k < V; ++k) idx[k] = p;
        return;
      }
    } else {
      const int64_t q = c.div(i);
      const int64_t ch = i - q * c.d;
      if (ch + V <= c.d) {
        const int64_t first = hw.div(q) * c.d + ch;
#pragma unroll
        for (int k = 0; k < V; ++k) idx[k] = first + k;
        return;
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) idx[k] = (*this)(i + k);
  }
};

template <int V>
__device__ __forceinline__ void load_gates(const float* __restrict__ gate, const GateIndex& gi, int64_t i,
                                           float (&g)[V]) {
  int64_t idx[V];
  gi.run(i, idx);
#pragma unroll
  for (int k = 0; k < V; ++k) g[k] = gate[idx[k]];
}

// out before the ReLU, rounded like eager PyTorch (product, then sum) so that the forward and the
// recomputation in the backward agree on its sign.
__device__ __forceinline__ float pre_activation(float x, float gate, float residual) {
  return __fadd_rn(__fmul_rn(x, gate), residual);
}

// Zeroes the grads where the ReLU was off, its input recomputed from x, gate and residual.
template <int V>
__device__ __forceinline__ void relu_mask(float (&g)[V], const float (&x)[V], const float (&gate)[V],
                                          const float (&residual)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (!(pre_activation(x[k], gate[k], residual[k]) > 0.f)) g[k] = 0.f;
  }
}

// Feature operands of a reduction. Kernels build it from their __restrict__ parameters, so the
// compiler still knows that grad_residual aliases none of the loads it may hoist above its stores.
template <typename T, bool kGrad>
struct ReduceOperands {
  const T* grad_out;
  const T* x;
  const T* residual;
  T* grad_residual;
  bool relu;

  // What a position reads: x, and for backward_gate grad_out and residual (null unless relu).
  template <int V>
  struct Loaded {
    Raw<T, V> x, g, r;
  };

  template <int V>
  __device__ __forceinline__ Loaded<V> load(int64_t i) const {
    Loaded<V> in{};
    in.x = load_raw<T, V>(x + i);
    if constexpr (kGrad) {
      in.g = load_raw<T, V>(grad_out + i);
      if (residual != nullptr) in.r = load_raw<T, V>(residual + i);
    }
    return in;
  }

  // What the V elements from i add to their planes' sums: x for pool; for backward_gate g' * x, g'
  // going to grad_residual on the way.
  template <int V>
  __device__ __forceinline__ void contribution(int64_t i, const Loaded<V>& in, const float (&gate)[V],
                                               float (&c)[V]) const {
    unpack<T, V>(in.x, c);
    if constexpr (kGrad) {
      float g[V], r[V] = {};
      unpack<T, V>(in.g, g);
      if (relu) {
        if (residual != nullptr) unpack<T, V>(in.r, r);
        relu_mask(g, c, gate, r);
      }
      if (grad_residual != nullptr) store_floats<T, V>(grad_residual + i, g);
#pragma unroll
      for (int k = 0; k < V; ++k) c[k] *= g[k];
    }
  }

  // Both of the above for one position.
  template <int V>
  __device__ __forceinline__ void contribution(int64_t i, const float (&gate)[V], float (&c)[V]) const {
    contribution(i, load<V>(i), gate, c);
  }
};

// Calls fn(i, ops.load<V>(i)) for i = first, first + step, ... below end, kBatch positions at a
// time with all their loads issued before any is used: a thread keeps kBatch accesses of each
// operand in flight.
template <int V, int kBatch = 4, typename Ops, typename Fn>
__device__ __forceinline__ void for_each_batched(const Ops& ops, int64_t first, int64_t end, int64_t step,
                                                 Fn&& fn) {
  for (int64_t base = first; base < end; base += kBatch * step) {
    typename Ops::template Loaded<V> in[kBatch] = {};
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = base + u * step;
      if (i < end) in[u] = ops.template load<V>(i);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = base + u * step;
      if (i < end) fn(i, in[u]);
    }
  }
}

// [begin, end) as a scalar head up to the first multiple of V, whole V-vectors, and a scalar
// tail; head and tail are shorter than V.
struct Span {
  int64_t begin, head_end, body_end, end;
};

__device__ __forceinline__ Span split_span(int64_t begin, int64_t end, int v) {
  const int64_t head_end = min(end, (begin + v - 1) / v * v);
  return {begin, head_end, max(head_end, end / v * v), end};
}

// NCHW, planes over kTile / 2 elements: one block per (n, c) plane, threads striding over its
// vectors; sum / divisor to out[plane].
template <typename T, int V, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    plane_reduce_kernel(int64_t planes, int64_t hw, const T* __restrict__ grad_out, const T* __restrict__ x,
                        const float* __restrict__ gate, const T* __restrict__ residual, bool relu,
                        T* __restrict__ grad_residual, float* __restrict__ out, float divisor) {
  const ReduceOperands<T, kGrad> ops{grad_out, x, residual, grad_residual, relu};
  const int64_t t = threadIdx.x;
  for (int64_t p = blockIdx.x; p < planes; p += gridDim.x) {
    float g[V] = {};
    if constexpr (kGrad) {
#pragma unroll
      for (int k = 0; k < V; ++k) g[k] = gate[p];
    }
    const Span s = split_span(p * hw, (p + 1) * hw, V);
    float acc = 0.f;
    const float g1[1] = {g[0]};
    float c1[1];
    if (t < s.head_end - s.begin) {
      ops.contribution(s.begin + t, g1, c1);
      acc += c1[0];
    }
    if (t < s.end - s.body_end) {
      ops.contribution(s.body_end + t, g1, c1);
      acc += c1[0];
    }
    for_each_batched<V>(ops, s.head_end + t * V, s.body_end, int64_t(blockDim.x) * V, [&](int64_t i, const auto& in) {
      float c[V];
      ops.contribution(i, in, g, c);
#pragma unroll
      for (int k = 0; k < V; ++k) acc += c[k];
    });
    acc = block_sum(acc);
    if (t == 0) out[p] = acc / divisor;
  }
}

// NCHW, planes of up to kTile / 2 elements: one block per planes_per_block consecutive planes.
// Their run of memory is read in vectors regardless of plane boundaries, contributions are staged
// in shared memory, then each warp sums whole planes from there. The explicit minimum of one block
// per SM lifts the register cap under which ptxas spilled the fp32 backward_gate variant.
template <typename T, int V, bool kGrad>
__global__ void __launch_bounds__(kThreads, 1)
    packed_reduce_kernel(int64_t planes, int64_t hw, int64_t planes_per_block, GateIndex gi,
                         const T* __restrict__ grad_out, const T* __restrict__ x, const float* __restrict__ gate,
                         const T* __restrict__ residual, bool relu, T* __restrict__ grad_residual,
                         float* __restrict__ out, float divisor) {
  __shared__ __align__(16) float tile[kTile + kMaxVec];
  const ReduceOperands<T, kGrad> ops{grad_out, x, residual, grad_residual, relu};
  const int64_t t = threadIdx.x;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t blocks = (planes + planes_per_block - 1) / planes_per_block;
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t p0 = b * planes_per_block;
    const int64_t p1 = min(planes, p0 + planes_per_block);
    const Span s = split_span(p0 * hw, p1 * hw, V);
    // Element j lives at tile[j - origin]; origin is a multiple of V, so vectors stay aligned.
    const int64_t origin = s.begin / V * V;
    const auto stage_one = [&](int64_t j) {
      float g1[1] = {}, c1[1];
      if constexpr (kGrad) load_gates(gate, gi, j, g1);
      ops.contribution(j, g1, c1);
      tile[j - origin] = c1[0];
    };
    if (t < s.head_end - s.begin) stage_one(s.begin + t);
    if (t < s.end - s.body_end) stage_one(s.body_end + t);
    // A block's run is at most kTile elements: batch no more positions than a thread can have.
    constexpr int kPerThread = kTile / (kThreads * V);
    constexpr int kBatch = kPerThread < 1 ? 1 : kPerThread > 4 ? 4 : kPerThread;
    for_each_batched<V, kBatch>(ops, s.head_end + t * V, s.body_end, int64_t(blockDim.x) * V, [&](int64_t j,
                                                                                               const auto& in) {
      float g[V] = {}, c[V];
      if constexpr (kGrad) load_gates(gate, gi, j, g);
      ops.contribution(j, in, g, c);
      store_shared(tile + (j - origin), c);
    });
    __syncthreads();
    for (int64_t r = warp; r < p1 - p0; r += blockDim.x / 32) {
      const float* row = tile + (s.begin - origin) + r * hw;
      float sum = 0.f;
      for (int64_t k = lane; k < hw; k += 32) sum += row[k];
      sum = warp_sum(sum);
      if (lane == 0) out[p0 + r] = sum / divisor;
    }
    __syncthreads();
  }
}

// NHWC blocking: channel chunks of `chunk` channels, pixels cut into `splits` runs of
// `split_pixels`; block b is (n, chunk, split), split fastest.
struct ChannelsLastGeometry {
  int64_t n, c, hw, chunk, chunks, splits, split_pixels;
};

// NHWC: each thread owns V channels of the block's chunk and strides over the split's pixels, a
// warp reading contiguous channels; rows of threads are summed in shared memory, and the splits
// of a chunk meet in out by atomicAdd (plain stores when there is one split).
template <typename T, int V, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    channels_last_reduce_kernel(ChannelsLastGeometry geo, const T* __restrict__ grad_out, const T* __restrict__ x,
                                const float* __restrict__ gate, const T* __restrict__ residual, bool relu,
                                T* __restrict__ grad_residual, float* __restrict__ out, float divisor) {
  __shared__ __align__(16) float partial[kThreads * V];
  const ReduceOperands<T, kGrad> ops{grad_out, x, residual, grad_residual, relu};
  const int cols = int(geo.chunk / V);
  const int rows = int(blockDim.x) / cols;
  const int col = threadIdx.x % cols;
  const int row = threadIdx.x / cols;
  const int64_t blocks = geo.n * geo.chunks * geo.splits;
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t pair = b / geo.splits;
    const int64_t split = b - pair * geo.splits;
    const int64_t n = pair / geo.chunks;
    const int64_t c0 = (pair - n * geo.chunks) * geo.chunk;
    const int64_t c = c0 + int64_t(col) * V;
    float acc[V] = {};
    if (c < geo.c) {  // V divides C, so the thread's V channels are all in range
      float g[V] = {};
      if constexpr (kGrad) {
#pragma unroll
        for (int k = 0; k < V; ++k) g[k] = gate[n * geo.c + c + k];
      }
      // Element offsets of the thread's pixels: (n*HW + p)*C + c for p in the split, step rows.
      const int64_t pixel0 = n * geo.hw + split * geo.split_pixels + row;
      const int64_t pixel_end = n * geo.hw + min(geo.hw, (split + 1) * geo.split_pixels);
      for_each_batched<V>(ops, pixel0 * geo.c + c, pixel_end * geo.c, int64_t(rows) * geo.c,
                          [&](int64_t i, const auto& in) {
                            float v[V];
                            ops.contribution(i, in, g, v);
#pragma unroll
                            for (int k = 0; k < V; ++k) acc[k] += v[k];
                          });
    }
    store_shared(partial + int64_t(row) * geo.chunk + col * V, acc);
    __syncthreads();
    const int64_t ch = c0 + threadIdx.x;
    if (threadIdx.x < geo.chunk && ch < geo.c) {
      float sum = 0.f;
      for (int r = 0; r < rows; ++r) sum += partial[r * geo.chunk + threadIdx.x];
      sum /= divisor;
      if (geo.splits > 1) {
        atomicAdd(out + n * geo.c + ch, sum);
      } else {
        out[n * geo.c + ch] = sum;
      }
    }
    __syncthreads();
  }
}

template <typename T, int V>
__device__ __forceinline__ void scale_run(int64_t i, const GateIndex& gi, const T* __restrict__ x,
                                          const float* __restrict__ gate, const T* __restrict__ residual, bool relu,
                                          T* __restrict__ out) {
  const Raw<T, V> x_raw = load_raw<T, V>(x + i);
  const Raw<T, V> r_raw = residual != nullptr ? load_raw<T, V>(residual + i) : Raw<T, V>{};
  float g[V], v[V], r[V] = {};
  load_gates(gate, gi, i, g);
  unpack<T, V>(x_raw, v);
  if (residual != nullptr) unpack<T, V>(r_raw, r);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float o = pre_activation(v[k], g[k], r[k]);
    v[k] = relu && o < 0.f ? 0.f : o;  // NaN passes, as in torch.relu
  }
  store_floats<T, V>(out + i, v);
}

template <typename T, int V>
__device__ __forceinline__ void input_grad_run(int64_t i, const GateIndex& gi, const T* __restrict__ grad_out,
                                               const T* __restrict__ x, const float* __restrict__ gate,
                                               const T* __restrict__ residual, bool relu,
                                               const float* __restrict__ grad_pooled, float hw,
                                               T* __restrict__ grad_x) {
  const Raw<T, V> g_raw = load_raw<T, V>(grad_out + i);
  Raw<T, V> x_raw{}, r_raw{};
  if (relu) {
    x_raw = load_raw<T, V>(x + i);
    if (residual != nullptr) r_raw = load_raw<T, V>(residual + i);
  }
  float g[V], gv[V], gp[V];
  {
    int64_t idx[V];
    gi.run(i, idx);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      gv[k] = gate[idx[k]];
      gp[k] = grad_pooled[idx[k]] / hw;
    }
  }
  unpack<T, V>(g_raw, g);
  if (relu) {
    float xv[V], r[V] = {};
    unpack<T, V>(x_raw, xv);
    if (residual != nullptr) unpack<T, V>(r_raw, r);
    relu_mask(g, xv, gv, r);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) g[k] = g[k] * gv[k] + gp[k];
  store_floats<T, V>(grad_x + i, g);
}

// Elementwise kernels: thread i takes the i-th V-vector of the flat tensor (grid-striding), the
// numel % V elements past the last whole vector go to the first threads, one each.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(int64_t numel, GateIndex gi, const T* __restrict__ x, const float* __restrict__ gate,
                 const T* __restrict__ residual, bool relu, T* __restrict__ out) {
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vectors = numel / V;
  for (int64_t v = thread; v < vectors; v += int64_t(gridDim.x) * blockDim.x) {
    scale_run<T, V>(v * V, gi, x, gate, residual, relu, out);
  }
  if (thread < numel - vectors * V) scale_run<T, 1>(vectors * V + thread, gi, x, gate, residual, relu, out);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    input_grad_kernel(int64_t numel, GateIndex gi, const T* __restrict__ grad_out, const T* __restrict__ x,
                      const float* __restrict__ gate, const T* __restrict__ residual, bool relu,
                      const float* __restrict__ grad_pooled, float hw, T* __restrict__ grad_x) {
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vectors = numel / V;
  for (int64_t v = thread; v < vectors; v += int64_t(gridDim.x) * blockDim.x) {
    input_grad_run<T, V>(v * V, gi, grad_out, x, gate, residual, relu, grad_pooled, hw, grad_x);
  }
  if (thread < numel - vectors * V) {
    input_grad_run<T, 1>(vectors * V + thread, gi, grad_out, x, gate, residual, relu, grad_pooled, hw, grad_x);
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

unsigned grid_size(int64_t blocks) { return unsigned(std::clamp<int64_t>(blocks, 1, INT_MAX)); }

// Calls fn with std::integral_constant<int, kVec> when vec, else with <int, 1>.
template <int kVec, typename Fn>
void with_vector_width(bool vec, Fn&& fn) {
  if (vec) {
    fn(std::integral_constant<int, kVec>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

GateIndex gate_index(const SeShape& shape) {
  const int64_t numel = shape.n * shape.c * shape.hw;
  return {Divider(shape.hw, numel), Divider(shape.c, numel), shape.channels_last};
}

ChannelsLastGeometry channels_last_geometry(const SeShape& shape, int64_t elem_bytes) {
  const int64_t chunk = std::min(next_pow2(shape.c), kChunkBytes / elem_bytes);
  const int64_t chunks = cdiv(shape.c, chunk);
  const int64_t wanted = cdiv(kTargetBlocks, shape.n * chunks);
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, cdiv(shape.hw, kMinSplitPixels)));
  const int64_t split_pixels = cdiv(shape.hw, splits);
  return {shape.n, shape.c, shape.hw, chunk, chunks, cdiv(shape.hw, split_pixels), split_pixels};
}

// out[n,c] = (sum over the pixels of plane (n, c) of x, or of g' * x when kGrad) / divisor.
template <typename T, bool kGrad>
cudaError_t reduce(const SeShape& shape, const T* grad_out, const T* x, const float* gate, const T* residual,
                   bool relu, T* grad_residual, float* out, float divisor, cudaStream_t stream) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const int64_t planes = shape.n * shape.c;
  const bool vec = aligned({grad_out, x, residual, grad_residual});
  if (shape.channels_last && shape.hw > 0) {
    const ChannelsLastGeometry geo = channels_last_geometry(shape, sizeof(T));
    if (geo.splits > 1) {
      const cudaError_t err = cudaMemsetAsync(out, 0, planes * sizeof(float), stream);
      if (err != cudaSuccess) return err;
    }
    with_vector_width<kVec>(vec && shape.c % kVec == 0, [&](auto width) {
      constexpr int V = decltype(width)::value;
      channels_last_reduce_kernel<T, V, kGrad><<<grid_size(geo.n * geo.chunks * geo.splits), kThreads, 0, stream>>>(
          geo, grad_out, x, gate, residual, relu, grad_residual, out, divisor);
    });
  } else if (shape.hw > 0 && next_pow2(shape.hw) <= kTile / 2) {
    const int64_t per_block = kTile / next_pow2(shape.hw);
    const GateIndex gi = gate_index(shape);
    with_vector_width<kVec>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      packed_reduce_kernel<T, V, kGrad><<<grid_size(cdiv(planes, per_block)), kThreads, 0, stream>>>(
          planes, shape.hw, per_block, gi, grad_out, x, gate, residual, relu, grad_residual, out, divisor);
    });
  } else {
    // Also HW == 0 in either order: no element is read, every plane gets 0 / divisor.
    with_vector_width<kVec>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      plane_reduce_kernel<T, V, kGrad><<<grid_size(planes), kThreads, 0, stream>>>(
          planes, shape.hw, grad_out, x, gate, residual, relu, grad_residual, out, divisor);
    });
  }
  return cudaGetLastError();
}

unsigned elementwise_blocks(int64_t numel, int v) { return grid_size(cdiv(numel / v, kThreads)); }

}  // namespace

template <typename scalar_t>
cudaError_t task_se_pool(SeShape shape, const scalar_t* x, float* pooled, cudaStream_t stream) {
  if (shape.n * shape.c == 0) return cudaSuccess;
  return reduce<scalar_t, false>(shape, nullptr, x, nullptr, nullptr, false, nullptr, pooled, float(shape.hw),
                                 stream);
}

template <typename scalar_t>
cudaError_t task_se_scale(SeShape shape, const scalar_t* x, const float* gate, const scalar_t* residual, bool relu,
                          scalar_t* out, cudaStream_t stream) {
  const int64_t numel = shape.n * shape.c * shape.hw;
  if (numel == 0) return cudaSuccess;
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  const GateIndex gi = gate_index(shape);
  with_vector_width<kVec>(aligned({x, residual, out}), [&](auto width) {
    constexpr int V = decltype(width)::value;
    scale_kernel<scalar_t, V><<<elementwise_blocks(numel, V), kThreads, 0, stream>>>(numel, gi, x, gate, residual,
                                                                                     relu, out);
  });
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t task_se_backward_gate(SeShape shape, const scalar_t* grad_out, const scalar_t* x, const float* gate,
                                  const scalar_t* residual, bool relu, float* grad_gate, scalar_t* grad_residual,
                                  cudaStream_t stream) {
  if (shape.n * shape.c == 0) return cudaSuccess;
  // Without the ReLU the residual does not enter g'; leaving it out spares its reads.
  return reduce<scalar_t, true>(shape, grad_out, x, gate, relu ? residual : nullptr, relu, grad_residual, grad_gate,
                                1.f, stream);
}

template <typename scalar_t>
cudaError_t task_se_backward_input(SeShape shape, const scalar_t* grad_out, const scalar_t* x, const float* gate,
                                   const scalar_t* residual, bool relu, const float* grad_pooled, scalar_t* grad_x,
                                   cudaStream_t stream) {
  const int64_t numel = shape.n * shape.c * shape.hw;
  if (numel == 0) return cudaSuccess;
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  const GateIndex gi = gate_index(shape);
  if (!relu) residual = nullptr;
  with_vector_width<kVec>(aligned({grad_out, relu ? x : nullptr, residual, grad_x}), [&](auto width) {
    constexpr int V = decltype(width)::value;
    input_grad_kernel<scalar_t, V><<<elementwise_blocks(numel, V), kThreads, 0, stream>>>(
        numel, gi, grad_out, x, gate, residual, relu, grad_pooled, float(shape.hw), grad_x);
  });
  return cudaGetLastError();
}

#define MTLFAST_INSTANTIATE(T)                                                                                     \
  template cudaError_t task_se_pool<T>(SeShape, const T*, float*, cudaStream_t);                                  \
  template cudaError_t task_se_scale<T>(SeShape, const T*, const float*, const T*, bool, T*, cudaStream_t);       \
  template cudaError_t task_se_backward_gate<T>(SeShape, const T*, const T*, const float*, const T*, bool, float*, \
                                                T*, cudaStream_t);                                                \
  template cudaError_t task_se_backward_input<T>(SeShape, const T*, const T*, const float*, const T*, bool,        \
                                                 const float*, T*, cudaStream_t);

MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(__half)
MTLFAST_INSTANTIATE(__nv_bfloat16)

#undef MTLFAST_INSTANTIATE

}  // namespace mtlfast::cuda
