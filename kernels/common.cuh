// What the CUDA kernels share: elements as bit images converted to and from float, runs of them
// moved as single vector accesses, and the alignment test that picks the vector path.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mtlfast::cuda::detail {

constexpr int kVecBytes = 16;

// Bit image of one element and its conversions to and from float.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Bits = unsigned int;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_float(float x) { return __float_as_uint(x); }
};
template <>
struct Elem<__half> {
  using Bits = unsigned short;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Bits = unsigned short;
  static __device__ __forceinline__ float to_float(Bits b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  static __device__ __forceinline__ Bits from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

// V elements packed in N 32-bit words as one access moves them, element 0 in the low bits of
// word 0: unpacked into floats by shifts, and floats packed back.
template <typename T, int V, int N>
__device__ __forceinline__ void unpack_words(const unsigned (&words)[N], float (&x)[V]) {
  static_assert(V * sizeof(T) == N * sizeof(unsigned), "V elements fill the N words");
  constexpr int kPerWord = 4 / sizeof(T);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const unsigned shift = 8 * sizeof(T) * (i % kPerWord);
    x[i] = Elem<T>::to_float(typename Elem<T>::Bits(words[i / kPerWord] >> shift));
  }
}

// ORs the packed floats into words, which the caller zero-initializes: zeroing them here instead
// changes how nvcc unrolls attention_distill's source loop.
template <typename T, int V, int N>
__device__ __forceinline__ void pack_words(const float (&x)[V], unsigned (&words)[N]) {
  static_assert(V * sizeof(T) == N * sizeof(unsigned), "V elements fill the N words");
  constexpr int kPerWord = 4 / sizeof(T);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const unsigned shift = 8 * sizeof(T) * (i % kPerWord);
    words[i / kPerWord] |= unsigned(Elem<T>::from_float(x[i])) << shift;
  }
}

// V consecutive elements as loaded: their bit image, one 16-byte word (V > 1) or one element.
// Kernels that batch loads keep them raw until used, so that a batch costs no more registers than
// its bytes.
template <typename T, int V>
using Raw = std::conditional_t<V == 1, typename Elem<T>::Bits, uint4>;

template <typename T, int V>
__device__ __forceinline__ Raw<T, V> load_raw(const T* __restrict__ p) {
  static_assert(V == 1 || V * sizeof(T) == sizeof(uint4), "vector path moves 16 bytes");
  return *reinterpret_cast<const Raw<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void unpack(Raw<T, V> raw, float (&x)[V]) {
  if constexpr (V == 1) {
    x[0] = Elem<T>::to_float(raw);
  } else {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
    unpack_words<T>(words, x);
  }
}

// V consecutive elements in float registers: V == 1 is the scalar path, otherwise V elements are
// one 16-byte access.
template <typename T, int V>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&x)[V]) {
  unpack<T, V>(load_raw<T, V>(p), x);
}

// The vector store is explicit PTX because nvcc splits a plain uint4 store of computed words into
// four 32-bit STGs. It has no "memory" clobber, so that later loads may be hoisted above it: a
// kernel must not read back what it stores through here.
template <typename T, int V>
__device__ __forceinline__ void store_floats(T* __restrict__ p, const float (&x)[V]) {
  if constexpr (V == 1) {
    *reinterpret_cast<typename Elem<T>::Bits*>(p) = Elem<T>::from_float(x[0]);
  } else {
    unsigned words[4] = {};
    pack_words<T>(x, words);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(words[0]), "r"(words[1]), "r"(words[2]),
                 "r"(words[3]));
  }
}

// True when every pointer is 16-byte aligned; null, an absent operand, is.
inline bool aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % kVecBytes != 0) return false;
  }
  return true;
}

}  // namespace mtlfast::cuda::detail
