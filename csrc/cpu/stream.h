// When an op's output stores should bypass the caches (non-temporal stores, vec_common.h).
//
// They pay off for an output too large to stay in the last-level cache next to the inputs read
// with it: it reaches memory before anything reads it, and a normal store would first read every
// line of it in. They lose when the output's pages are not yet mapped in (a fresh mmap, as glibc
// gives blocks of 32 MiB or more by default): the page fault zeroes each page through the cache,
// where a normal store then hits, and a streaming store has to push the zeroed lines out first
// (measured 10-40% slower on such outputs, 20-80% faster on reused ones).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace mtlfast::cpu {

// Whether the page holding p is resident (mapped in); true where that cannot be asked.
inline bool page_resident(const void* p) {
#if defined(__linux__) || defined(__APPLE__)
  static const std::uintptr_t page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  const std::uintptr_t start = reinterpret_cast<std::uintptr_t>(p) & ~(page - 1);
#if defined(__APPLE__)
  char resident = 0;
#else
  unsigned char resident = 0;
#endif
  if (mincore(reinterpret_cast<void*>(start), page, &resident) != 0) {
    return false;
  }
  return (resident & 1) != 0;
#else
  (void)p;
  return true;
#endif
}

// Streaming stores for out: at least min_bytes, and its first and last pages already mapped in.
inline bool stream_into(const at::Tensor& out, int64_t min_bytes) {
  const int64_t bytes = static_cast<int64_t>(out.nbytes());
  if (bytes < min_bytes) {
    return false;
  }
  const char* data = static_cast<const char*>(out.const_data_ptr());
  return page_resident(data) && page_resident(data + bytes - 1);
}

}  // namespace mtlfast::cpu
