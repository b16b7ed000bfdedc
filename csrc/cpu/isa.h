// CPU kernels compiled for several instruction sets from one source, and the
// choice among them at run time.
//
// The package is compiled for baseline x86-64 (SSE2) so that it loads on any
// x86-64 CPU. A hot loop written as a Body (a struct with a static
// MASKRCNN_ALWAYS_INLINE `run`) gets one copy per instruction set through
// run_for_isa: the Body is inlined into a baseline, an AVX2 and an AVX-512
// function, so each copy is vectorized for its registers. The copy that runs
// is the one ATen's own kernels use: the CPU's best, or a lower one that the
// ATEN_CPU_CAPABILITY environment variable asks for (default, avx2, avx512),
// which is how the tests exercise every copy on one machine.
//
// Every copy performs the same IEEE operations in the same order: setup.py
// forbids contracting a * b + c into an FMA, and the compiler vectorizes only
// independent lanes (no reassociation without -ffast-math). So results do not
// depend on the instruction set, and the CPU kernels keep rounding like the
// CUDA ones.
//
// Functions a Body calls in its hot loops must be MASKRCNN_ALWAYS_INLINE too:
// a function that is not inlined is compiled once, for the baseline.
#pragma once

#include <ATen/Version.h>

#include <string>
#include <utility>

#define MASKRCNN_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__)
#define MASKRCNN_TARGET_AVX2 __attribute__((target("avx2")))
#define MASKRCNN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2")))
#define MASKRCNN_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2")))
#define MASKRCNN_MULTI_ISA 1
#else
#define MASKRCNN_MULTI_ISA 0
#endif

namespace maskrcnn_ops {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The instruction set ATen dispatches its CPU kernels to (read once: ATen
// fixes it at its first use too).
inline Isa active_isa() {
  static const Isa isa = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Isa::kAvx512;
    if (capability == "AVX2") return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
}

// Whether bfloat16 kernels may use the AVX-512 BF16 instructions (a
// bfloat16 pair dot product accumulated in float32, VDPBF16PS, and float32
// to bfloat16 rounding, VCVTNEPS2BF16): the CPU has them and the active
// instruction set is AVX-512. Kernels that do round differently from the
// other copies (the instructions flush denormals and their dot product
// rounds its own way), so their results match the others to a tolerance,
// not bit for bit; a lower ATEN_CPU_CAPABILITY turns them off.
inline bool use_avx512_bf16() {
#if MASKRCNN_MULTI_ISA
  static const bool use = active_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  return use;
#else
  return false;
#endif
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

template <typename Body, typename... Args>
void run_baseline(Args&&... args) {
  Body::run(std::forward<Args>(args)...);
}

#if MASKRCNN_MULTI_ISA
template <typename Body, typename... Args>
MASKRCNN_TARGET_AVX2 void run_avx2(Args&&... args) {
  Body::run(std::forward<Args>(args)...);
}

template <typename Body, typename... Args>
MASKRCNN_TARGET_AVX512 void run_avx512(Args&&... args) {
  Body::run(std::forward<Args>(args)...);
}
#endif

#if MASKRCNN_MULTI_ISA
// Body::run(args...) compiled with the AVX-512 BF16 instructions: call only
// when use_avx512_bf16().
template <typename Body, typename... Args>
MASKRCNN_TARGET_AVX512_BF16 void run_avx512_bf16(Args&&... args) {
  Body::run(std::forward<Args>(args)...);
}
#endif

// Body::run(args...) in the copy for active_isa().
template <typename Body, typename... Args>
void run_for_isa(Args&&... args) {
#if MASKRCNN_MULTI_ISA
  switch (active_isa()) {
    case Isa::kAvx512:
      return run_avx512<Body>(std::forward<Args>(args)...);
    case Isa::kAvx2:
      return run_avx2<Body>(std::forward<Args>(args)...);
    default:
      break;
  }
#endif
  run_baseline<Body>(std::forward<Args>(args)...);
}

}  // namespace maskrcnn_ops
