// The CUDA built-ins that csrc/cuda/*_kernels.cuh use, defined for a host
// compiler, so those kernels run on the CPU under a serial grid emulator:
// every (block, thread) of a launch runs the kernel body once, in order.
// Valid for kernels whose threads do not cooperate (no __shared__,
// __syncthreads or warp intrinsics), which is what the RoIAlign kernels are:
// grid-stride loops with atomics. Atomics are plain read-modify-writes here,
// which is exact for a serial run.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct EmulatedDim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// One launch at a time (the emulator is serial).
inline EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address = old + value;  // wraps modulo 2^64, as the GPU's integer atomics
  return old;
}

// Round to nearest, ties to even (the default floating-point environment).
inline long long __double2ll_rn(double value) { return std::llrint(value); }

inline double __longlong_as_double(long long bits) {
  double value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// Runs kernel(args...) for every thread of a one-dimensional grid.
template <typename Kernel, typename... Args>
void emulate_launch(unsigned int blocks, unsigned int threads, Kernel kernel, Args... args) {
  gridDim = {blocks, 1, 1};
  blockDim = {threads, 1, 1};
  for (unsigned int b = 0; b < blocks; ++b) {
    blockIdx = {b, 0, 0};
    for (unsigned int t = 0; t < threads; ++t) {
      threadIdx = {t, 0, 0};
      kernel(args...);
    }
  }
}
