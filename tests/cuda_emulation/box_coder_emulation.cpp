// The box-coding CUDA kernels (csrc/cuda/box_coder_kernels.cuh), compiled as
// host C++ and run by cuda_shim.h's serial grid emulator, behind a C
// interface for ctypes (tests/test_cuda_kernels_emulated.py). Each entry
// point is one launch of box_coder.cu with the caller's (CPU) memory; as
// there, the boxes, anchors, proposals, scores and image sizes arrive in the
// accumulation type.
#include "cuda_shim.h"

#include "cuda/box_coder_kernels.cuh"

namespace {

using namespace maskrcnn_ops;

template <typename T>
BoxWeights<T> weights_of(const double* w) {
  return {static_cast<T>(w[0]), static_cast<T>(w[1]), static_cast<T>(w[2]), static_cast<T>(w[3])};
}

// blocks == 0: box_coder.cu's launch size; otherwise that many blocks.
unsigned int launch_blocks(int64_t rows, unsigned int blocks) { return blocks != 0 ? blocks : blocks_for(rows); }

}  // namespace

#define MRO_BOX_CODER_ENTRY_POINTS(T, suffix)                                                          \
  extern "C" void mro_decode_##suffix(const T* deltas, const T* boxes, T* out, int64_t rows,           \
                                      int64_t classes, const double* w, double clip,                   \
                                      unsigned int blocks) {                                           \
    if (rows == 0) return;                                                                             \
    emulate_launch(launch_blocks(rows, blocks), kThreads, decode_kernel<T, T>, deltas, boxes, out,     \
                   rows, classes, weights_of<T>(w), static_cast<T>(clip));                             \
  }                                                                                                    \
  extern "C" void mro_decode_backward_##suffix(const T* grad, const T* deltas, const T* boxes, T* out, \
                                               int64_t rows, int64_t classes, const double* w,         \
                                               double clip, unsigned int blocks) {                     \
    if (rows == 0) return;                                                                             \
    emulate_launch(launch_blocks(rows, blocks), kThreads, decode_backward_kernel<T, T>, grad, deltas,  \
                   boxes, out, rows, classes, weights_of<T>(w), static_cast<T>(clip));                 \
  }                                                                                                    \
  extern "C" void mro_encode_##suffix(const T* reference, const T* proposals, T* out, int64_t rows,    \
                                      const double* w, unsigned int blocks) {                          \
    if (rows == 0) return;                                                                             \
    emulate_launch(launch_blocks(rows, blocks), kThreads, encode_kernel<T, T>, reference, proposals,   \
                   out, rows, weights_of<T>(w));                                                       \
  }                                                                                                    \
  extern "C" void mro_rpn_decode_filter_##suffix(                                                      \
      const T* deltas, const T* anchors, const T* scores, const T* image_hw, T* boxes, bool* keep,     \
      int64_t rows, int64_t per_image, const double* w, double clip, double min_size,                  \
      double score_thresh, unsigned int blocks) {                                                      \
    if (rows == 0) return;                                                                             \
    emulate_launch(launch_blocks(rows, blocks), kThreads, rpn_decode_filter_kernel<T, T>, deltas,      \
                   anchors, scores, image_hw, boxes, keep, rows, per_image, weights_of<T>(w),          \
                   static_cast<T>(clip), static_cast<T>(min_size), static_cast<T>(score_thresh));      \
  }

MRO_BOX_CODER_ENTRY_POINTS(float, f32)
MRO_BOX_CODER_ENTRY_POINTS(double, f64)
