// The attention-distillation kernels, compiled once per instruction set: included by exactly one
// translation unit per ISA (attention_distill_default.cpp, isa/attention_distill_<isa>.cpp), which
// first defines CPU_CAPABILITY (the namespace of its copy) and CPU_CAPABILITY_<ISA> the way ATen
// does, so that at::vec below resolves to that instruction set's Vectorized specialisations.
//
//   out[n,t]              = feats[n,t] + sum_s sigmoid(mask_logits[n,t,s]) * messages[n,t,s]
//   grad_messages[n,t,s]    = grad_out[n,t] * sig
//   grad_mask_logits[n,t,s] = grad_out[n,t] * messages[n,t,s] * sig * (1 - sig)
//
// Every input is read from memory once and every output written once; the arithmetic is done in
// fp32 (fp64 for double) registers whatever the storage dtype.
#pragma once

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "cpu/attention_distill.h"
#include "cpu/vec_common.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) before including attention_distill_kernel.h"
#endif

namespace mtlfast::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// The (n, t) block and element range of one work item.
struct Span {
  int64_t n, t, begin, len;
};

inline Span span_of(const Work& w, int64_t item) {
  const int64_t block = item / w.chunks;
  const int64_t begin = (item - block * w.chunks) * w.chunk;
  return {block / w.T, block % w.T, begin, std::min(w.chunk, w.P - begin)};
}

template <typename T, typename Ptr>
auto at_span(const Operand<Ptr>& o, const Span& sp) {
  using Elem = std::conditional_t<std::is_const_v<std::remove_pointer_t<Ptr>>, const T, T>;
  return static_cast<Elem*>(o.data) + sp.n * o.stride_n + sp.t * o.stride_t + sp.begin;
}

// Each vector position is finished across all sources while it sits in registers, so there is no
// accumulator round trip through memory. This measured 10-30% faster than passes over a chunk
// per source into an L1 accumulator, whose short streams keep restarting the prefetchers.
template <typename T>
void fwd(const FwdArgs& a, int64_t begin, int64_t end) {
  using St = Step<T>;
  const int64_t S = a.work.S;
  const int64_t mask_s = a.mask_logits.stride_s;
  const int64_t msg_s = a.messages.stride_s;
  for (int64_t item = begin; item < end; ++item) {
    const Span sp = span_of(a.work, item);
    const T* feats = at_span<T>(a.feats, sp);
    const T* mask = at_span<T>(a.mask_logits, sp);
    const T* msg = at_span<T>(a.messages, sp);
    T* out = at_span<T>(a.out, sp);
    for_each_step<St::kStep>(sp.len, [&](int64_t p, int64_t count) {
      auto [acc0, acc1] = St::load(feats + p, count);
      for (int64_t s = 0; s < S; ++s) {
        const auto [m0, m1] = St::load(mask + s * mask_s + p, count);
        const auto [v0, v1] = St::load(msg + s * msg_s + p, count);
        acc0 = at::vec::fmadd(sigmoid(m0), v0, acc0);
        acc1 = at::vec::fmadd(sigmoid(m1), v1, acc1);
      }
      St::store(out + p, acc0, acc1, count);
    });
  }
}

// Unlike fwd, sources are the outer loop within a chunk (the grad_out chunk is reread from L1):
// finishing all sources per vector would keep 2S write streams in flight next to 2S + 1 read
// streams, which measured 20-40% slower than two reads and two writes at a time.
template <typename T>
void bwd(const BwdArgs& a, int64_t begin, int64_t end) {
  using St = Step<T>;
  using V = typename St::V;
  const V one(typename St::Acc(1));
  for (int64_t item = begin; item < end; ++item) {
    const Span sp = span_of(a.work, item);
    const T* grad_out = at_span<T>(a.grad_out, sp);
    for (int64_t s = 0; s < a.work.S; ++s) {
      const T* mask = at_span<T>(a.mask_logits, sp) + s * a.mask_logits.stride_s;
      const T* msg = at_span<T>(a.messages, sp) + s * a.messages.stride_s;
      T* grad_mask = at_span<T>(a.grad_mask_logits, sp) + s * a.grad_mask_logits.stride_s;
      T* grad_msg = at_span<T>(a.grad_messages, sp) + s * a.grad_messages.stride_s;
      for_each_step<St::kStep>(sp.len, [&](int64_t p, int64_t count) {
        const auto [g0, g1] = St::load(grad_out + p, count);
        const auto [m0, m1] = St::load(mask + p, count);
        const auto [v0, v1] = St::load(msg + p, count);
        const V sig0 = sigmoid(m0);
        const V sig1 = sigmoid(m1);
        const V gv0 = g0 * sig0;
        const V gv1 = g1 * sig1;
        const V gm0 = gv0 * v0 * (one - sig0);
        const V gm1 = gv1 * v1 * (one - sig1);
        if (a.stream && St::can_stream(grad_msg + p, count) && St::can_stream(grad_mask + p, count)) {
          St::stream(grad_msg + p, gv0, gv1);
          St::stream(grad_mask + p, gm0, gm1);
        } else {
          St::store(grad_msg + p, gv0, gv1, count);
          St::store(grad_mask + p, gm0, gm1, count);
        }
      });
    }
  }
  if (a.stream) {
    stream_fence();
  }
}

}  // namespace

IsaKernels attention_distill_kernels() {
  return {
      {fwd<float>, bwd<float>},
      {fwd<double>, bwd<double>},
      {fwd<c10::Half>, bwd<c10::Half>},
      {fwd<c10::BFloat16>, bwd<c10::BFloat16>},
  };
}

}  // namespace mtlfast::cpu::CPU_CAPABILITY
