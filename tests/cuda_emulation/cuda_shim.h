// The CUDA built-ins that csrc/cuda/*_kernels.cuh use, defined for a host
// compiler, so those kernels, and the launch sequences written over a
// launcher there (csrc/cuda/launch.cuh), run on the CPU. Two launchers:
//   * emulate_launch: every (block, thread) runs the kernel body once, in
//     order, on the calling thread. For kernels whose threads do not
//     cooperate (no shared memory, no barrier), such as the RoIAlign
//     kernels; their atomics are plain read-modify-writes, exact in a serial
//     run.
//   * emulate_block_launch: the blocks in order, the threads of a block as
//     real concurrent threads, with a barrier for __syncthreads and one
//     shared-memory buffer per block. For the NMS kernels. (No atomics there;
//     the shim's atomics are not thread-safe.)
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A block's threads run concurrently and blocks one after another, so a
// function-local static is exactly one block's shared array.
#define __shared__ static

struct EmulatedDim3 {
  unsigned int x = 1, y = 1, z = 1;
};

inline thread_local EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emulation {

inline thread_local std::barrier<>* block_barrier = nullptr;
inline std::vector<unsigned char> dynamic_shared;  // the current block's

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::block_barrier->arrive_and_wait(); }

#define MRO_DYNAMIC_SHARED_ARRAY(type, name) \
  type* name = reinterpret_cast<type*>(cuda_emulation::dynamic_shared.data())

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

// Runs kernel(args...) for every thread of a one-dimensional grid, serially.
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

// The launcher of the shared launch sequences (csrc/cuda/launch.cuh), the
// emulator's counterpart of the GPU's StreamLaunch: each launch through
// emulate_launch. max_blocks, when not 0, caps every grid: fewer blocks than
// a launch asks for make the kernels' grid-stride loops take several turns.
struct EmulatedLaunch {
  unsigned int max_blocks = 0;

  template <typename Kernel, typename... Args>
  void operator()(unsigned int blocks, unsigned int threads, Kernel kernel, Args... args) const {
    emulate_launch(max_blocks != 0 ? std::min(blocks, max_blocks) : blocks, threads, kernel, args...);
  }
};

// Runs a two-dimensional grid of blocks of `threads` concurrent threads.
// A thread that returns leaves the barrier, as on the GPU a finished thread
// no longer holds the block at __syncthreads.
template <typename Kernel, typename... Args>
void emulate_block_launch(EmulatedDim3 grid, unsigned int threads, size_t shared_bytes, Kernel kernel,
                          Args... args) {
  for (unsigned int by = 0; by < grid.y; ++by) {
    for (unsigned int bx = 0; bx < grid.x; ++bx) {
      // Garbage, not zeros: a kernel must initialize its shared memory.
      cuda_emulation::dynamic_shared.assign(shared_bytes, 0xA5);
      std::barrier<> barrier(threads);
      std::vector<std::thread> workers;
      workers.reserve(threads);
      for (unsigned int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
          gridDim = {grid.x, grid.y, 1};
          blockDim = {threads, 1, 1};
          blockIdx = {bx, by, 0};
          threadIdx = {t, 0, 0};
          cuda_emulation::block_barrier = &barrier;
          kernel(args...);
          barrier.arrive_and_drop();
        });
      }
      for (auto& worker : workers) worker.join();
    }
  }
}

// The launcher of the shared launch sequences for kernels whose threads
// cooperate (shared memory, __syncthreads): each launch, a one-dimensional
// grid, through emulate_block_launch. max_threads and max_blocks, when not 0,
// cap the threads of a block and the blocks (those kernels loop over their
// work in strides of both): fewer threads keep the emulation fast, fewer
// blocks make the grid-stride loop take several turns.
struct EmulatedBlockLaunch {
  unsigned int max_threads = 0;
  unsigned int max_blocks = 0;

  template <typename Kernel, typename... Args>
  void operator()(unsigned int blocks, unsigned int threads, Kernel kernel, Args... args) const {
    emulate_block_launch({max_blocks != 0 ? std::min(blocks, max_blocks) : blocks, 1, 1},
                         max_threads != 0 ? std::min(threads, max_threads) : threads, 0, kernel, args...);
  }
};
