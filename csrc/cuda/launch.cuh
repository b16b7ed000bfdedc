// How the CUDA kernels of every op are launched, written once for both places
// they run: the GPU (the .cu files) and the CUDA emulator of the test suite
// (tests/cuda_emulation/cuda_shim.h), which compiles the kernel headers, and
// the launch sequences in them, as host C++.
//
// A launch sequence (the kernels one call runs, their grids and arguments) is
// a function template over a launcher: an object called as
//   launch(blocks, threads, kernel, args...)
// that runs kernel<<<blocks, threads>>>(args...). StreamLaunch below is the
// GPU's (on the current stream, with the launch check); the emulator's
// EmulatedLaunch runs every thread on the CPU. So the emulated tests run the
// host sequence the GPU runs, not a copy of it.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef __CUDACC__
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace maskrcnn_ops {
namespace {

constexpr int kThreads = 256;

// The grid of a launch over `work` items, one per thread. Capped: the
// kernels loop over their work in grid strides, and 2^20 blocks of kThreads
// (268M threads) already fill any GPU hundreds of times over.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline unsigned int grid_size(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)));
}

// `for (i ...)` over [0, n), each thread taking every (grid size)-th item.
#define MRO_GRID_STRIDE(i, n)                                                          \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// One thread per row: row(i) for every i in [0, n). `row` is a host-device
// function object (the box-coding rows of csrc/common/box_coder.h), so the
// CPU kernels run the same row code in their loops.
template <typename Row>
__global__ void rows_kernel(Row row, int64_t n) {
  MRO_GRID_STRIDE(i, n) { row(i); }
}

template <typename Launch, typename Row>
void launch_rows(const Launch& launch, const Row& row, int64_t n) {
  if (n == 0) return;  // a zero-size grid cannot launch
  launch(grid_size(n), kThreads, rows_kernel<Row>, row, n);
}

#ifdef __CUDACC__
// The GPU's launcher: the kernel on `stream`, then the launch check.
struct StreamLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(unsigned int blocks, unsigned int threads, void (*kernel)(Params...),
                  Args... args) const {
    kernel<<<blocks, threads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// On the current stream of the current device.
inline StreamLaunch current_stream_launch() {
  return StreamLaunch{c10::cuda::getCurrentCUDAStream()};
}
#endif

}  // namespace
}  // namespace maskrcnn_ops
