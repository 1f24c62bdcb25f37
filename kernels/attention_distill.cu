// MTI-Net attention distillation, CUDA: out = feats + sum_s sigmoid(mask_logits) * messages, and its
// backward. Pure bandwidth: every block streams one chunk of one (n, t) pair's inner block and
// loops over the S sources; math in float, 16-byte vector accesses when alignment allows.
#include "attention_distill.cuh"

#include "common.cuh"

#include <algorithm>
#include <climits>
#include <initializer_list>

namespace mtlfast::cuda {
namespace {

using namespace detail;

constexpr int kMaxThreads = 256;

// MUFU exp + reciprocal; saturates cleanly to 0 / 1 (1/inf = 0), which is all the op needs.
__device__ __forceinline__ float fast_sigmoid(float x) {
  return __fdividef(1.0f, 1.0f + __expf(-x));
}

// Where block b of the flat (pair-major, chunk-minor) block space starts reading, and how many
// elements of its chunk are in bounds. Mirrors the Triton kernels' program decomposition.
struct BlockSpan {
  int64_t n, t, start, remaining;
};

__device__ __forceinline__ BlockSpan block_span(int64_t b, int64_t n_chunks, int64_t chunk_elems,
                                                const DistillShape& shape) {
  const int64_t pair = b / n_chunks;
  const int64_t start = (b - pair * n_chunks) * chunk_elems;
  const int64_t n = pair / shape.t;
  return {n, pair - n * shape.t, start, shape.p - start};
}

__device__ __forceinline__ int64_t offset(const OuterStrides& st, const BlockSpan& sp) {
  return sp.n * st.n + sp.t * st.t + sp.start;
}

// Calls body(at) for every block of the flat block space that this thread's block visits and in
// which the thread has elements; at(strides) is the offset of the thread's first element in a
// tensor of those outer strides.
template <int V, typename Body>
__device__ __forceinline__ void for_each_block(const DistillShape& shape, int64_t n_chunks, Body&& body) {
  const int64_t chunk_elems = int64_t(blockDim.x) * V;
  const int64_t lane = int64_t(threadIdx.x) * V;
  const int64_t n_blocks = shape.n * shape.t * n_chunks;
  // Grid-stride only matters past 2^31-1 blocks; normally every block runs one iteration.
  for (int64_t b = blockIdx.x; b < n_blocks; b += gridDim.x) {
    const BlockSpan sp = block_span(b, n_chunks, chunk_elems, shape);
    if (lane >= sp.remaining) continue;
    body([&](const OuterStrides& st) { return offset(st, sp) + lane; });
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kMaxThreads)
    fwd_kernel(DistillShape shape, int64_t n_chunks, const T* __restrict__ feats, OuterStrides fs,
               const T* __restrict__ mask, OuterStrides ms, const T* __restrict__ msg, OuterStrides gs,
               T* __restrict__ out, OuterStrides os) {
  for_each_block<V>(shape, n_chunks, [&](const auto& at) {
    float acc[V];
    load_floats<T, V>(feats + at(fs), acc);
    const T* m = mask + at(ms);
    const T* g = msg + at(gs);
#pragma unroll 4
    for (int64_t s = 0; s < shape.s; ++s) {
      float logit[V], x[V];
      load_floats<T, V>(m + s * ms.s, logit);
      load_floats<T, V>(g + s * gs.s, x);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += fast_sigmoid(logit[i]) * x[i];
    }
    store_floats<T, V>(out + at(os), acc);
  });
}

template <typename T, int V>
__global__ void __launch_bounds__(kMaxThreads)
    bwd_kernel(DistillShape shape, int64_t n_chunks, const T* __restrict__ grad_out, OuterStrides gos,
               const T* __restrict__ mask, OuterStrides ms, const T* __restrict__ msg, OuterStrides gs,
               T* __restrict__ grad_mask, OuterStrides gms, T* __restrict__ grad_msg, OuterStrides ggs) {
  for_each_block<V>(shape, n_chunks, [&](const auto& at) {
    float g[V];
    load_floats<T, V>(grad_out + at(gos), g);
    const T* m = mask + at(ms);
    const T* x = msg + at(gs);
    T* dm = grad_mask + at(gms);
    T* dx = grad_msg + at(ggs);
#pragma unroll 4
    for (int64_t s = 0; s < shape.s; ++s) {
      float logit[V], xs[V], d_mask[V], d_msg[V];
      load_floats<T, V>(m + s * ms.s, logit);
      load_floats<T, V>(x + s * gs.s, xs);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float sig = fast_sigmoid(logit[i]);
        d_msg[i] = g[i] * sig;
        d_mask[i] = d_msg[i] * xs[i] * (1.0f - sig);
      }
      store_floats<T, V>(dm + s * gms.s, d_mask);
      store_floats<T, V>(dx + s * ggs.s, d_msg);
    }
  });
}

// Launch geometry for inner blocks of p elements moved v at a time: narrow blocks for tiny p so
// that most threads have work, otherwise kMaxThreads; one chunk = threads * v elements.
struct Geometry {
  int threads;
  int64_t n_chunks;
  unsigned blocks;
};

Geometry geometry(const DistillShape& shape, int v) {
  const int64_t vectors = (shape.p + v - 1) / v;
  const int threads = int(std::min<int64_t>(kMaxThreads, (vectors + 31) / 32 * 32));
  const int64_t n_chunks = (shape.p + int64_t(threads) * v - 1) / (int64_t(threads) * v);
  const int64_t blocks = std::min<int64_t>(shape.n * shape.t * n_chunks, INT_MAX);
  return {threads, n_chunks, unsigned(blocks)};
}

// A stride only moves the address when its dimension has more than one index.
bool stride_ok(int64_t stride, int64_t size, int64_t vec) {
  return size <= 1 || stride % vec == 0;
}

// True when every (n, t, s) inner block starts on a 16-byte boundary and P fills whole vectors.
template <typename T>
bool vectorizable(const DistillShape& shape, std::initializer_list<const void*> ptrs,
                  std::initializer_list<OuterStrides> strides) {
  constexpr int64_t vec = kVecBytes / sizeof(T);
  if (shape.p % vec != 0 || !aligned(ptrs)) return false;
  for (const OuterStrides& st : strides) {
    if (!stride_ok(st.n, shape.n, vec) || !stride_ok(st.t, shape.t, vec) || !stride_ok(st.s, shape.s, vec))
      return false;
  }
  return true;
}

template <typename T, int V>
void launch_fwd(const DistillShape& shape, const T* feats, OuterStrides fs, const T* mask, OuterStrides ms,
                const T* msg, OuterStrides gs, T* out, OuterStrides os, cudaStream_t stream) {
  const Geometry geo = geometry(shape, V);
  fwd_kernel<T, V><<<geo.blocks, geo.threads, 0, stream>>>(shape, geo.n_chunks, feats, fs, mask, ms, msg, gs,
                                                            out, os);
}

template <typename T, int V>
void launch_bwd(const DistillShape& shape, const T* grad_out, OuterStrides gos, const T* mask, OuterStrides ms,
                const T* msg, OuterStrides gs, T* grad_mask, OuterStrides gms, T* grad_msg, OuterStrides ggs,
                cudaStream_t stream) {
  const Geometry geo = geometry(shape, V);
  bwd_kernel<T, V><<<geo.blocks, geo.threads, 0, stream>>>(shape, geo.n_chunks, grad_out, gos, mask, ms, msg,
                                                            gs, grad_mask, gms, grad_msg, ggs);
}

}  // namespace

template <typename scalar_t>
cudaError_t attention_distill_fwd(DistillShape shape, const scalar_t* feats, OuterStrides feats_strides,
                                  const scalar_t* mask_logits, OuterStrides mask_strides,
                                  const scalar_t* messages, OuterStrides messages_strides, scalar_t* out,
                                  OuterStrides out_strides, cudaStream_t stream) {
  if (shape.n * shape.t * shape.p == 0) return cudaSuccess;
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  // With S == 0 the source pointers are never dereferenced, so they must not veto the vector path.
  const bool vec = shape.s == 0
                       ? vectorizable<scalar_t>(shape, {feats, out}, {feats_strides, out_strides})
                       : vectorizable<scalar_t>(shape, {feats, mask_logits, messages, out},
                                                {feats_strides, mask_strides, messages_strides, out_strides});
  if (vec) {
    launch_fwd<scalar_t, kVec>(shape, feats, feats_strides, mask_logits, mask_strides, messages, messages_strides,
                               out, out_strides, stream);
  } else {
    launch_fwd<scalar_t, 1>(shape, feats, feats_strides, mask_logits, mask_strides, messages, messages_strides,
                            out, out_strides, stream);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t attention_distill_bwd(DistillShape shape, const scalar_t* grad_out, OuterStrides grad_out_strides,
                                  const scalar_t* mask_logits, OuterStrides mask_strides,
                                  const scalar_t* messages, OuterStrides messages_strides,
                                  scalar_t* grad_mask_logits, OuterStrides grad_mask_strides,
                                  scalar_t* grad_messages, OuterStrides grad_messages_strides,
                                  cudaStream_t stream) {
  if (shape.n * shape.t * shape.s * shape.p == 0) return cudaSuccess;
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  const bool vec = vectorizable<scalar_t>(
      shape, {grad_out, mask_logits, messages, grad_mask_logits, grad_messages},
      {grad_out_strides, mask_strides, messages_strides, grad_mask_strides, grad_messages_strides});
  if (vec) {
    launch_bwd<scalar_t, kVec>(shape, grad_out, grad_out_strides, mask_logits, mask_strides, messages,
                               messages_strides, grad_mask_logits, grad_mask_strides, grad_messages,
                               grad_messages_strides, stream);
  } else {
    launch_bwd<scalar_t, 1>(shape, grad_out, grad_out_strides, mask_logits, mask_strides, messages,
                            messages_strides, grad_mask_logits, grad_mask_strides, grad_messages,
                            grad_messages_strides, stream);
  }
  return cudaGetLastError();
}

#define MTLFAST_INSTANTIATE(T)                                                                                   \
  template cudaError_t attention_distill_fwd<T>(DistillShape, const T*, OuterStrides, const T*, OuterStrides,  \
                                                const T*, OuterStrides, T*, OuterStrides, cudaStream_t);       \
  template cudaError_t attention_distill_bwd<T>(DistillShape, const T*, OuterStrides, const T*, OuterStrides,  \
                                                const T*, OuterStrides, T*, OuterStrides, T*, OuterStrides,    \
                                                cudaStream_t);

MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(__half)
MTLFAST_INSTANTIATE(__nv_bfloat16)

#undef MTLFAST_INSTANTIATE

}  // namespace mtlfast::cuda
