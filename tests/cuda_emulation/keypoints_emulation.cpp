// The keypoint decoding CUDA kernel (csrc/cuda/keypoints_kernels.cuh),
// compiled as host C++ and run by cuda_shim.h's block emulator (each block's
// threads concurrently, __syncthreads a barrier), behind a C interface for
// ctypes (tests/test_cuda_kernels_emulated.py). Each entry point runs
// keypoints.cu's launch sequence (launch_keypoints, with the emulator's
// launcher) on the caller's (CPU) memory.
#include "cuda_shim.h"

#include "cuda/keypoints_kernels.cuh"

using namespace maskrcnn_ops;

// threads, blocks: 0 for what keypoints.cu launches, otherwise caps on the
// block size (fewer threads keep the emulation fast and leave some without
// pixels or with several) and on the grid (the grid-stride loop over pairs).
extern "C" void mro_keypoints_f32(const float* heatmaps, const float* boxes, float* keypoints, float* scores,
                                  int64_t rois, int64_t per_roi, int64_t height, int64_t width,
                                  unsigned int threads, unsigned int blocks) {
  launch_keypoints(EmulatedBlockLaunch{threads, blocks},
                   KeypointArgs<float, float>{heatmaps, boxes, keypoints, scores, rois, per_roi, height, width});
}

extern "C" void mro_keypoints_f64(const double* heatmaps, const double* boxes, double* keypoints, double* scores,
                                  int64_t rois, int64_t per_roi, int64_t height, int64_t width,
                                  unsigned int threads, unsigned int blocks) {
  launch_keypoints(EmulatedBlockLaunch{threads, blocks},
                   KeypointArgs<double, double>{heatmaps, boxes, keypoints, scores, rois, per_roi, height, width});
}
