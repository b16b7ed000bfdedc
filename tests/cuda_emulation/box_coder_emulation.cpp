// The box-coding CUDA kernel (csrc/cuda/launch.cuh's rows_kernel running the
// rows of csrc/common/box_coder.h), compiled as host C++ and run by
// cuda_shim.h's serial grid emulator, behind a C interface for ctypes
// (tests/test_cuda_kernels_emulated.py). Each entry point is the launch of
// box_coder.cu (launch_rows, with the emulator's launcher) on the caller's
// (CPU) memory; as there, the boxes, anchors, proposals, scores and image
// sizes arrive in the accumulation type.
#include "cuda_shim.h"

#include "common/box_coder.h"
#include "cuda/launch.cuh"

namespace {

using namespace maskrcnn_ops;

template <typename T>
BoxWeights<T> weights_of(const double* w) {
  return {static_cast<T>(w[0]), static_cast<T>(w[1]), static_cast<T>(w[2]), static_cast<T>(w[3])};
}

}  // namespace

// blocks: 0 for box_coder.cu's grid, otherwise a cap on it (fewer blocks
// exercise the grid-stride loop).
#define MRO_BOX_CODER_ENTRY_POINTS(T, suffix)                                                          \
  extern "C" void mro_decode_##suffix(const T* deltas, const T* boxes, T* out, int64_t rows,           \
                                      int64_t classes, const double* w, double clip,                   \
                                      unsigned int blocks) {                                           \
    launch_rows(EmulatedLaunch{blocks},                                                                \
                DecodeRow<T, T>{deltas, boxes, out, classes, weights_of<T>(w), static_cast<T>(clip)},  \
                rows);                                                                                 \
  }                                                                                                    \
  extern "C" void mro_decode_backward_##suffix(const T* grad, const T* deltas, const T* boxes, T* out, \
                                               int64_t rows, int64_t classes, const double* w,         \
                                               double clip, unsigned int blocks) {                     \
    launch_rows(EmulatedLaunch{blocks},                                                                \
                DecodeBackwardRow<T, T>{grad, deltas, boxes, out, classes, weights_of<T>(w),           \
                                        static_cast<T>(clip)},                                         \
                rows);                                                                                 \
  }                                                                                                    \
  extern "C" void mro_encode_##suffix(const T* reference, const T* proposals, T* out, int64_t rows,    \
                                      const double* w, unsigned int blocks) {                          \
    launch_rows(EmulatedLaunch{blocks}, EncodeRow<T, T>{reference, proposals, out, weights_of<T>(w)},  \
                rows);                                                                                 \
  }                                                                                                    \
  extern "C" void mro_rpn_decode_filter_##suffix(                                                      \
      const T* deltas, const T* anchors, const T* scores, const T* image_hw, T* boxes, bool* keep,     \
      int64_t rows, int64_t per_image, const double* w, double clip, double min_size,                  \
      double score_thresh, unsigned int blocks) {                                                      \
    launch_rows(EmulatedLaunch{blocks},                                                                \
                RpnDecodeFilterRow<T, T>{deltas, anchors, scores, image_hw, boxes, keep, per_image,    \
                                         weights_of<T>(w), static_cast<T>(clip),                       \
                                         static_cast<T>(min_size), static_cast<T>(score_thresh)},      \
                rows);                                                                                 \
  }

MRO_BOX_CODER_ENTRY_POINTS(float, f32)
MRO_BOX_CODER_ENTRY_POINTS(double, f64)
