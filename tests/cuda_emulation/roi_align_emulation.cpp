// The RoIAlign CUDA kernels (csrc/cuda/roi_align_kernels.cuh), compiled as
// host C++ and run by the serial grid emulator of cuda_shim.h, behind a C
// interface for ctypes (tests/test_cuda_kernels_emulated.py). Each entry
// point runs the launch sequence of csrc/cuda/roi_align.cu itself
// (launch_forward, launch_backward, launch_deterministic_backward, with the
// emulator's launcher) on maps built by the same builder; only the memory is
// the caller's (CPU tensors).
#include "cuda_shim.h"

#include <vector>

#include "common/roi_align_pyramid.h"
#include "cuda/roi_align_kernels.cuh"

namespace {

using namespace maskrcnn_ops;

// The maps, as roi_align.cu's multi-level ops build them. (A one-level
// pyramid behaves as single_level_pyramid's: its RoIs skip the FPN mapping.)
template <typename T>
Pyramid<T> maps_of(int levels, const int64_t* heights, const int64_t* widths, const double* scales,
                   int64_t channels, double canonical_scale, int64_t canonical_level,
                   int channels_last) {
  return fpn_pyramid(channels, levels, heights, widths, scales, canonical_scale, canonical_level,
                     channels_last != 0)
      .as<T>();
}

}  // namespace

// blocks: 0 for the grids roi_align.cu launches, otherwise a cap on them
// (fewer blocks exercise the grid-stride loops). max_abs_grad: max|grad|, the
// deterministic path's one reduction (done by ATen on the GPU).
#define MRO_EMULATION_ENTRY_POINTS(T, suffix)                                                       \
  extern "C" void mro_roi_align_forward_##suffix(                                                   \
      int levels, const T* const* data, const int64_t* heights, const int64_t* widths,              \
      const double* scales, int64_t channels, double canonical_scale, int64_t canonical_level,      \
      int channels_last, const T* rois, int64_t num_rois, T* output, int32_t* argmax,               \
      int64_t batch, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, int aligned,       \
      unsigned int blocks) {                                                                        \
    launch_forward<T, T>(EmulatedLaunch{blocks},                                                    \
                         maps_of<T>(levels, heights, widths, scales, channels, canonical_scale,     \
                                    canonical_level, channels_last),                                \
                         data,                                                                      \
                         PoolArgs<T>{rois, num_rois, batch, pooled_h, pooled_w, sampling_ratio,     \
                                     aligned != 0},                                                 \
                         output, argmax);                                                           \
  }                                                                                                 \
  extern "C" void mro_roi_align_backward_##suffix(                                                  \
      int levels, const int64_t* heights, const int64_t* widths, const double* scales,              \
      int64_t channels, double canonical_scale, int64_t canonical_level, int channels_last,         \
      const T* grad, const T* rois, int64_t num_rois, const int32_t* argmax,                        \
      T* const* grad_inputs, int64_t batch, int64_t pooled_h, int64_t pooled_w,                     \
      int64_t sampling_ratio, int aligned, int deterministic, double max_abs_grad,                  \
      unsigned int blocks) {                                                                        \
    const auto maps = maps_of<T>(levels, heights, widths, scales, channels, canonical_scale,        \
                                 canonical_level, channels_last);                                   \
    const PoolArgs<T> args{rois, num_rois, batch, pooled_h, pooled_w, sampling_ratio, aligned != 0}; \
    if (!deterministic) {                                                                           \
      launch_backward<T, T>(EmulatedLaunch{blocks}, maps, grad, argmax, args, grad_inputs);         \
      return;                                                                                       \
    }                                                                                               \
    std::vector<unsigned long long> fixed(static_cast<size_t>(maps.total_numel(batch)), 0);         \
    double scale = 0.0;                                                                             \
    launch_deterministic_backward<T, T>(EmulatedLaunch{blocks}, maps, grad, argmax, args,           \
                                        &max_abs_grad, fixed.data(), &scale, grad_inputs);          \
  }

MRO_EMULATION_ENTRY_POINTS(float, f32)
MRO_EMULATION_ENTRY_POINTS(double, f64)
