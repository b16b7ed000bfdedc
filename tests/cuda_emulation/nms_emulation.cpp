// The NMS CUDA kernels (csrc/cuda/nms_kernels.cuh), compiled as host C++ and
// run by cuda_shim.h's block emulator (each block's threads concurrently,
// __syncthreads a barrier), behind a C interface for ctypes
// (tests/test_cuda_kernels_emulated.py). The steps mirror the kernel part of
// batched_nms_keep_cuda_impl in csrc/cuda/nms.cu; the caller does its host
// part (the processing order and each box's segment end).
#include "cuda_shim.h"

#include <vector>

#include "cuda/nms_kernels.cuh"

namespace {

using namespace maskrcnn_ops;

// sorted_boxes [n, 4] in segment order (acc_t), seg_last [n]: the last
// position of each box's segment. Sets keep_sorted[i] (zeroed by the caller)
// for the boxes the greedy pass keeps. force_global: the removed-box bitmask
// in global memory even when it would fit in shared memory.
template <typename T>
void nms_keep_sorted(const T* sorted_boxes, const int64_t* seg_last, int64_t n, double iou_threshold,
                     int force_global, bool* keep_sorted) {
  if (n == 0) return;
  const int64_t words = (n + kBitsPerWord - 1) / kBitsPerWord;
  // Garbage where no tile is computed: the reduction must never read it.
  std::vector<unsigned long long> mask(static_cast<size_t>(n * words), 0xDEADBEEFDEADBEEFULL);
  const auto blocks = static_cast<unsigned int>(words);
  emulate_block_launch({blocks, blocks, 1}, kBitsPerWord, 0, nms_mask_kernel<T>, sorted_boxes, seg_last, n,
                       words, threshold_as<T>(iou_threshold), mask.data());
  std::vector<unsigned long long> removed_global;
  size_t shared_bytes = 0;
  if (words <= kSharedRemovedWords && !force_global) {
    shared_bytes = static_cast<size_t>(words) * sizeof(unsigned long long);
  } else {
    removed_global.assign(static_cast<size_t>(words), 0xA5A5A5A5A5A5A5A5ULL);
  }
  emulate_block_launch({1, 1, 1}, kReduceThreads, shared_bytes, nms_reduce_kernel,
                       static_cast<const unsigned long long*>(mask.data()), seg_last, n, words,
                       removed_global.empty() ? nullptr : removed_global.data(), keep_sorted);
}

}  // namespace

extern "C" void mro_nms_keep_sorted_f32(const float* boxes, const int64_t* seg_last, int64_t n,
                                        double iou_threshold, int force_global, bool* keep_sorted) {
  nms_keep_sorted<float>(boxes, seg_last, n, iou_threshold, force_global, keep_sorted);
}

extern "C" void mro_nms_keep_sorted_f64(const double* boxes, const int64_t* seg_last, int64_t n,
                                        double iou_threshold, int force_global, bool* keep_sorted) {
  nms_keep_sorted<double>(boxes, seg_last, n, iou_threshold, force_global, keep_sorted);
}
