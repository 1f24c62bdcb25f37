// Interface between the portable dispatcher (attention_distill.cpp) and the copies of the kernel
// compiled once per instruction set (attention_distill_kernel.h). Plain data only, so that the
// per-ISA objects depend on nothing from torch but at::vec and no torch inline function is ever
// emitted with wide instructions only.
#pragma once

#include <cstdint>

namespace mtlfast::cpu {

// One tensor of the call: its (C, H, W) block is a dense run of P elements starting at
// data + n * stride_n + t * stride_t + s * stride_s (element units; stride_s unused for 5-d tensors).
template <typename Ptr>
struct Operand {
  Ptr data;
  int64_t stride_n, stride_t, stride_s;
};
using Input = Operand<const void*>;
using Output = Operand<void*>;

// The work is cut into items, one per chunk of one (n, t) block: item = (n * T + t) * chunks + c,
// covering elements [c * chunk, min((c + 1) * chunk, P)). Items are what the threads share out.
struct Work {
  int64_t T, S, P, chunk, chunks;
};

struct FwdArgs {
  Work work;
  Input feats, mask_logits, messages;
  Output out;
};

struct BwdArgs {
  Work work;
  Input grad_out, mask_logits, messages;
  Output grad_mask_logits, grad_messages;
  bool stream;  // the gradients' stores bypass the caches
};

// A kernel processes the items [begin, end).
using FwdFn = void (*)(const FwdArgs&, int64_t begin, int64_t end);
using BwdFn = void (*)(const BwdArgs&, int64_t begin, int64_t end);

struct DtypeKernels {
  FwdFn fwd;
  BwdFn bwd;
};

struct IsaKernels {
  DtypeKernels f32, f64, f16, bf16;
};

// Each copy lives in a namespace named after its instruction set, like ATen's CPU_CAPABILITY
// namespaces, so the copies never clash at link time.
namespace DEFAULT {
IsaKernels attention_distill_kernels();
}
#if defined(__x86_64__)
namespace AVX2 {
IsaKernels attention_distill_kernels();
}
namespace AVX512 {
IsaKernels attention_distill_kernels();
}
#endif

}  // namespace mtlfast::cpu
