// The mask pasting CUDA kernel (csrc/cuda/paste_kernels.cuh), compiled as
// host C++ and run by cuda_shim.h's serial grid emulator, behind a C
// interface for ctypes (tests/test_cuda_kernels_emulated.py). Each entry point runs
// paste.cu's launch sequence (launch_paste, with the emulator's launcher) on
// the caller's (CPU) memory; the caller zeroes the output, as paste.cu does.
#include "cuda_shim.h"

#include "cuda/paste_kernels.cuh"

using namespace maskrcnn_ops;

// blocks: 0 for the grid paste.cu launches, otherwise a cap on it (fewer
// blocks exercise the grid-stride loop over masks).
extern "C" void mro_paste_f32(const float* masks, const float* boxes, float* out, int64_t num, int64_t side,
                              int64_t padding, int64_t height, int64_t width, unsigned int blocks) {
  launch_paste(EmulatedLaunch{blocks},
               PasteArgs<float, float, float>{masks, boxes, out, num, side, padding, height, width, 0.0f});
}

extern "C" void mro_paste_bool(const float* masks, const float* boxes, bool* out, int64_t num, int64_t side,
                               int64_t padding, int64_t height, int64_t width, double threshold,
                               unsigned int blocks) {
  launch_paste(EmulatedLaunch{blocks},
               PasteArgs<float, bool, float>{masks, boxes, out, num, side, padding, height, width,
                                             static_cast<float>(threshold)});
}

extern "C" void mro_paste_f64(const double* masks, const double* boxes, double* out, int64_t num,
                              int64_t side, int64_t padding, int64_t height, int64_t width,
                              unsigned int blocks) {
  launch_paste(EmulatedLaunch{blocks},
               PasteArgs<double, double, double>{masks, boxes, out, num, side, padding, height, width, 0.0});
}
