// Portability macros for math headers compiled by both g++ (CPU kernels) and
// nvcc (CUDA kernels). Everything in csrc/common/ is written once against
// these so the CPU tests exercise the exact arithmetic the GPU runs.
#pragma once

#include <cmath>

// MRO_HOST_DEVICE_ALWAYS_INLINE: also inlined on the host, as on the device.
// For per-element code that a host loop reaches through a function object
// (the box-coding rows), where g++'s heuristics would keep a call per element.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MRO_HOST_DEVICE __host__ __device__ __forceinline__
#define MRO_HOST_DEVICE_ALWAYS_INLINE __host__ __device__ __forceinline__
#else
#define MRO_HOST_DEVICE inline
#define MRO_HOST_DEVICE_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace maskrcnn_ops {

// True for finite values, false for NaN and +-Inf. Written without
// std::isfinite so it is callable from device code for float and double.
template <typename T>
MRO_HOST_DEVICE bool is_finite(T value) {
  return (value - value) == T(0);
}

template <typename T>
MRO_HOST_DEVICE T max_of(T a, T b) {
  return a > b ? a : b;
}

template <typename T>
MRO_HOST_DEVICE T min_of(T a, T b) {
  return a < b ? a : b;
}

// Math functions for float and double, callable from host code (std::) and
// device code (CUDA's overloads), so shared headers name one function.
#ifdef __CUDA_ARCH__
#define MRO_MATH_FUNCTION(name, fn) \
  template <typename T>             \
  MRO_HOST_DEVICE T name(T x) {     \
    return ::fn(x);                 \
  }
#else
#define MRO_MATH_FUNCTION(name, fn) \
  template <typename T>             \
  MRO_HOST_DEVICE T name(T x) {     \
    return std::fn(x);              \
  }
#endif
MRO_MATH_FUNCTION(exp_of, exp)
MRO_MATH_FUNCTION(log_of, log)
MRO_MATH_FUNCTION(log2_of, log2)
MRO_MATH_FUNCTION(sqrt_of, sqrt)
MRO_MATH_FUNCTION(floor_of, floor)
#undef MRO_MATH_FUNCTION

}  // namespace maskrcnn_ops
