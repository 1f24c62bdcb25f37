// Building blocks shared by the kernel copies of every op, compiled once per instruction set like
// them: included by the per-ISA kernel headers with CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>)
// defined, so each copy gets its own. Loads and stores in steps of two accumulation vectors,
// non-temporal stores, and a vectorised sigmoid.
#pragma once

// at::vec's headers trip GCC warnings that are noise here: the AVX512 intrinsics' self-initialised
// placeholder vectors read as maybe uninitialised, and -Wpsabi notes that vector arguments are
// passed differently with and without AVX (the copies only pass them to their own inline code).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) before including vec_common.h"
#endif

namespace mtlfast::cpu::CPU_CAPABILITY {

// Non-temporal store of the bytes of one vector at p, aligned to their size.
template <typename Vec>
inline void stream_store(void* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512i bits;
  static_assert(sizeof(Vec) == sizeof(bits));
  std::memcpy(&bits, &v, sizeof(bits));
  _mm512_stream_si512(static_cast<__m512i*>(p), bits);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256i bits;
  static_assert(sizeof(Vec) == sizeof(bits));
  std::memcpy(&bits, &v, sizeof(bits));
  _mm256_stream_si256(static_cast<__m256i*>(p), bits);
#else
  v.store(p);
#endif
}

// Orders this thread's non-temporal stores before whatever the caller does next.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Loads and stores of one step: two accumulation vectors, i.e. one full Vectorized<T> for
// fp16/bf16, converted to and from fp32. count < kStep only on a tail; partial loads fill the
// missing lanes with zeros.
template <typename T>
struct Step {
  using Acc = at::opmath_type<T>;
  using V = at::vec::Vectorized<Acc>;
  static constexpr int64_t kStep = 2 * V::size();

  static std::tuple<V, V> load(const T* p, int64_t count) {
    if constexpr (at::vec::is_reduced_floating_point_v<T>) {
      using W = at::vec::Vectorized<T>;
      return at::vec::convert_to_float<T>(count >= kStep ? W::loadu(p) : W::loadu(p, count));
    } else {
      if (count >= kStep) {
        return {V::loadu(p), V::loadu(p + V::size())};
      }
      if (count <= V::size()) {
        return {V::loadu(p, count), V(Acc(0))};
      }
      return {V::loadu(p), V::loadu(p + V::size(), count - V::size())};
    }
  }

  static void store(T* p, const V& a, const V& b, int64_t count) {
    if constexpr (at::vec::is_reduced_floating_point_v<T>) {
      const at::vec::Vectorized<T> r = at::vec::convert_from_float<T>(a, b);
      count >= kStep ? r.store(p) : r.store(p, count);
    } else if (count >= kStep) {
      a.store(p);
      b.store(p + V::size());
    } else if (count <= V::size()) {
      a.store(p, count);
    } else {
      a.store(p);
      b.store(p + V::size(), count - V::size());
    }
  }

  // A full step at an address aligned to a vector can bypass the caches.
  static bool can_stream(const T* p, int64_t count) {
    return count == kStep && reinterpret_cast<std::uintptr_t>(p) % sizeof(V) == 0;
  }

  static void stream(T* p, const V& a, const V& b) {
    if constexpr (at::vec::is_reduced_floating_point_v<T>) {
      stream_store(p, at::vec::convert_from_float<T>(a, b));
    } else {
      stream_store(p, a);
      stream_store(p + V::size(), b);
    }
  }
};

// Calls step(p, count) over [0, len): full steps, then one partial step. Once step is inlined,
// count is a constant in the main loop and the tail branches of Step fold away there.
template <int64_t K, typename F>
inline void for_each_step(int64_t len, const F& step) {
  int64_t p = 0;
  for (; p + K <= len; p += K) {
    step(p, K);
  }
  if (p < len) {
    step(p, len - p);
  }
}

// exp_u20 (a short polynomial, about 20 ulp) keeps sigmoid within 5e-7 relative of torch.sigmoid
// at a fraction of Sleef's cost; fexp_u20 is cheaper still but 1e-5 off. It clamps its input, which
// turns NaN into a finite value, so NaN logits are passed through explicitly, as torch.sigmoid does.
inline at::vec::Vectorized<float> sigmoid(const at::vec::Vectorized<float>& x) {
  const at::vec::Vectorized<float> one(1.f);
  const at::vec::Vectorized<float> sig = one / (one + x.neg().exp_u20());
  return at::vec::Vectorized<float>::blendv(sig, x, x.isnan());
}

// double only serves gradcheck, so exactness matters more than speed here.
inline at::vec::Vectorized<double> sigmoid(const at::vec::Vectorized<double>& x) {
  const at::vec::Vectorized<double> one(1.);
  return one / (one + x.neg().map(std::exp));
}

}  // namespace mtlfast::cpu::CPU_CAPABILITY
