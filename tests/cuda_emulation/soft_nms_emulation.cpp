// The soft-NMS CUDA kernel (csrc/cuda/soft_nms_kernels.cuh), compiled as host
// C++ and launched by soft_nms.cu's launch sequence (launch_soft_nms) with
// cuda_shim.h's block emulator (each block's threads concurrently,
// __syncthreads a barrier), behind a C interface for ctypes
// (tests/test_soft_nms.py). The caller does the ATen steps of soft_nms.cu
// (grouping, each position's segment end, the final order).
#include "cuda_shim.h"

#include "common/soft_nms.h"
#include "cuda/soft_nms_kernels.cuh"

namespace {

using namespace maskrcnn_ops;

// boxes [n, 4] and scores [n] (overwritten) in segment order, seg_last [n];
// method 0 linear, 1 gaussian; threads: the block size (a power of two, at
// most kSoftNmsThreads); blocks: 0 for soft_nms.cu's grid, otherwise a cap on
// it. Sets kept[pos] (zeroed by the caller) and
// kept_score[pos] for the kept positions.
template <typename T>
void soft_nms_sorted(const T* boxes, T* scores, const int64_t* seg_last, int64_t n, int method,
                     double iou_threshold, double sigma, double score_threshold, unsigned int threads,
                     unsigned int blocks, T* kept_score, bool* kept) {
  const SoftNmsDecay<T> decay{static_cast<SoftNmsMethod>(method), threshold_as<T>(iou_threshold),
                              static_cast<T>(sigma)};
  launch_soft_nms<T>(EmulatedBlockLaunch{threads, blocks}, boxes, scores, seg_last, n, decay,
                     at_least_as<T>(score_threshold), kept_score, kept);
}

}  // namespace

#define MRO_SOFT_NMS_ENTRY_POINT(T, suffix)                                                              \
  extern "C" void mro_soft_nms_sorted_##suffix(const T* boxes, T* scores, const int64_t* seg_last,       \
                                               int64_t n, int method, double iou_threshold, double sigma, \
                                               double score_threshold, unsigned int threads,             \
                                               unsigned int blocks, T* kept_score, bool* kept) {         \
    soft_nms_sorted<T>(boxes, scores, seg_last, n, method, iou_threshold, sigma, score_threshold,         \
                       threads, blocks, kept_score, kept);                                               \
  }

MRO_SOFT_NMS_ENTRY_POINT(float, f32)
MRO_SOFT_NMS_ENTRY_POINT(double, f64)
