// The keypoint decoding CUDA kernel and its launch sequence, free of ATen so
// that the same source also compiles as host C++ under tests/cuda_emulation/
// (the test suite runs it there, each block's threads as real threads,
// against the CPU kernel). The per-pixel math is csrc/common/keypoint_math.h,
// the CPU kernel's. The host code that checks and allocates lives in
// keypoints.cu.
//
// One block per (RoI, keypoint) pair (a grid-stride loop over pairs when
// there are more than the grid holds). Each thread computes the resized
// values of every blockDim-th pixel of the pair's map in row-major order, all
// sixteen taps at once (no scratch: the row sums the CPU kernel shares
// between output rows are recomputed, with the same operations), and keeps
// its first maximum; a tree reduction in shared memory then picks the
// block's, the lower index among equal values, and thread 0 writes the
// keypoint and its score. No resized map is formed, nothing is synchronized
// with the host.
#pragma once

#include <cstdint>

#include "../common/keypoint_math.h"
#include "launch.cuh"

namespace maskrcnn_ops {
namespace {

template <typename scalar_t, typename acc_t>
struct KeypointArgs {
  const scalar_t* heatmaps;  // [rois, per_roi, height, width]
  const acc_t* boxes;        // [rois, 4]
  acc_t* keypoints;          // [rois, per_roi, 3]
  acc_t* scores;             // [rois, per_roi]
  int64_t rois, per_roi, height, width;
};

// Merges the candidate of thread `other` into thread `mine`'s slot.
// A slot whose index is -1 holds no candidate (a thread without pixels).
template <typename acc_t>
__device__ void keep_preferred(acc_t* values, int64_t* indices, int mine, int other) {
  if (indices[other] < 0) return;
  if (indices[mine] < 0 || argmax_prefers(values[other], indices[other], values[mine], indices[mine])) {
    values[mine] = values[other];
    indices[mine] = indices[other];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) keypoints_kernel(KeypointArgs<scalar_t, acc_t> args) {
  __shared__ acc_t best_values[kThreads];
  __shared__ int64_t best_indices[kThreads];
  const int thread = static_cast<int>(threadIdx.x), threads = static_cast<int>(blockDim.x);
  const int64_t pairs = args.rois * args.per_roi;
  for (int64_t pair = blockIdx.x; pair < pairs; pair += gridDim.x) {
    const KeypointBox<acc_t> box = keypoint_box(args.boxes + (pair / args.per_roi) * 4);
    const scalar_t* map = args.heatmaps + pair * args.height * args.width;
    acc_t best = acc_t(0);
    int64_t best_index = -1;
    for (int64_t i = thread; i < box.pixels(); i += threads) {
      const int64_t y = i / box.map_w, x = i % box.map_w;
      const acc_t value = cubic_value<scalar_t>(map, args.width, cubic_taps<scalar_t, acc_t>(y, args.height, box.map_h),
                                                cubic_taps<scalar_t, acc_t>(x, args.width, box.map_w));
      if (best_index < 0 || argmax_prefers(value, i, best, best_index)) {
        best = value;
        best_index = i;
      }
    }
    best_values[thread] = best;
    best_indices[thread] = best_index;
    __syncthreads();
    // Pairs at distance 1, 2, 4, ...: works for any block size.
    for (int stride = 1; stride < threads; stride *= 2) {
      if (thread % (2 * stride) == 0 && thread + stride < threads)
        keep_preferred(best_values, best_indices, thread, thread + stride);
      __syncthreads();
    }
    if (thread == 0) {
      const int64_t index = best_indices[0];  // >= 0: every map has a pixel
      acc_t* out = args.keypoints + pair * 3;
      out[0] = keypoint_coordinate(index % box.map_w, box.width, box.map_w, box.x1);
      out[1] = keypoint_coordinate(index / box.map_w, box.height, box.map_h, box.y1);
      out[2] = acc_t(1);
      args.scores[pair] = best_values[0];
    }
    __syncthreads();  // the slots are reused by the next pair
  }
}

template <typename Launch, typename scalar_t, typename acc_t>
void launch_keypoints(const Launch& launch, const KeypointArgs<scalar_t, acc_t>& args) {
  const int64_t pairs = args.rois * args.per_roi;
  if (pairs == 0) return;  // a zero-size grid cannot launch
  const auto blocks = static_cast<unsigned int>(pairs < kMaxBlocks ? pairs : kMaxBlocks);
  launch(blocks, kThreads, keypoints_kernel<scalar_t, acc_t>, args);
}

}  // namespace
}  // namespace maskrcnn_ops
