// The RoIAlign CUDA kernels (csrc/cuda/roi_align_kernels.cuh), compiled as
// host C++ and run by the serial grid emulator of cuda_shim.h, behind a C
// interface for ctypes (tests/test_cuda_kernels_emulated.py). The host-side
// steps mirror pool_forward / pool_backward in csrc/cuda/roi_align.cu: the
// same Pyramid, work counts, kernels and fixed-point passes; only the memory
// is the caller's (CPU tensors) and the launches are emulated.
#include "cuda_shim.h"

#include "cuda/roi_align_kernels.cuh"

namespace {

using namespace maskrcnn_ops;

// The maps' geometry, as roi_align.cu's single_level / fpn_pyramid make it.
PyramidSpec make_spec(int levels, const int64_t* heights, const int64_t* widths,
                      const double* scales, int64_t first_level, int64_t channels,
                      double canonical_scale, int64_t canonical_level, int channels_last) {
  PyramidSpec spec;
  spec.heights.assign(heights, heights + levels);
  spec.widths.assign(widths, widths + levels);
  spec.scales.assign(scales, scales + levels);
  spec.first_level = first_level;
  spec.channels = channels;
  spec.canonical_scale = canonical_scale;
  spec.canonical_level = canonical_level;
  spec.channels_last = channels_last != 0;
  return spec;
}

// blocks == 0: the launch size roi_align.cu uses; otherwise that many blocks
// (fewer exercise the grid-stride loops).
unsigned int blocks_for(int64_t work, unsigned int blocks) {
  return blocks != 0 ? blocks : grid_size(work);
}

template <typename T>
void forward(const PyramidSpec& spec, const T* const* data, const T* rois, int64_t num_rois,
             T* output, int32_t* argmax, int64_t batch, int64_t pooled_h, int64_t pooled_w,
             int64_t sampling_ratio, int aligned, unsigned int blocks) {
  const int64_t work = spec.forward_work(num_rois, pooled_h, pooled_w);
  if (work == 0) return;
  const auto maps = spec.on_device<const T, T>(std::vector<const T*>(data, data + spec.levels()));
  if (argmax != nullptr) {
    emulate_launch(blocks_for(work, blocks), kThreads, roi_align_forward_kernel<T, T, kChannelsPerThread, true>,
                   maps, rois, output, argmax, work, batch, pooled_h, pooled_w, sampling_ratio,
                   aligned != 0);
  } else {
    emulate_launch(blocks_for(work, blocks), kThreads, roi_align_forward_kernel<T, T, kChannelsPerThread, false>,
                   maps, rois, output, static_cast<int32_t*>(nullptr), work, batch, pooled_h, pooled_w,
                   sampling_ratio, aligned != 0);
  }
}

// grad_inputs: one zeroed [N, C, H_l, W_l] buffer per level in the layout of
// spec. max_abs_grad: max|grad| (the deterministic path's one reduction).
template <typename T>
void backward(const PyramidSpec& spec, const T* grad, const T* rois, int64_t num_rois,
              const int32_t* argmax, T* const* grad_inputs, int64_t batch, int64_t pooled_h,
              int64_t pooled_w, int64_t sampling_ratio, int aligned, int deterministic,
              double max_abs_grad, unsigned int blocks) {
  const int64_t work = num_rois * spec.channels * pooled_h * pooled_w;
  if (work == 0) return;
  if (!deterministic) {
    const auto maps = spec.on_device<T, T>(std::vector<T*>(grad_inputs, grad_inputs + spec.levels()));
    emulate_launch(blocks_for(work, blocks), kThreads, roi_align_backward_kernel<T, T, FloatAtomicSink<T>>,
                   grad, rois, argmax, FloatAtomicSink<T>{}, maps, work, batch, pooled_h, pooled_w,
                   sampling_ratio, aligned != 0);
    return;
  }
  const std::vector<int64_t> sizes = spec.level_sizes(batch);
  int64_t total = 0;
  for (const int64_t size : sizes) total += size;
  std::vector<unsigned long long> fixed(static_cast<size_t>(total), 0);
  std::vector<unsigned long long*> level_data;
  for (int64_t l = 0, offset = 0; l < spec.levels(); offset += sizes[l], ++l)
    level_data.push_back(fixed.data() + offset);
  double scale = 0.0;
  emulate_launch(1, 1, fixed_point_scale_kernel, static_cast<const double*>(&max_abs_grad),
                 fixed_point_bound(num_rois, pooled_h, pooled_w), &scale);
  const FixedPointSink<T> sink{&scale};
  emulate_launch(blocks_for(work, blocks), kThreads, roi_align_backward_kernel<T, T, FixedPointSink<T>>,
                 grad, rois, argmax, sink, spec.on_device<unsigned long long, T>(level_data), work, batch,
                 pooled_h, pooled_w, sampling_ratio, aligned != 0);
  for (int64_t l = 0; l < spec.levels(); ++l) {
    if (sizes[l] == 0) continue;
    emulate_launch(blocks_for(sizes[l], blocks), kThreads, fixed_point_to_float_kernel<T>,
                   static_cast<const unsigned long long*>(level_data[l]), static_cast<const double*>(&scale),
                   grad_inputs[l], sizes[l]);
  }
}

}  // namespace

#define MRO_EMULATION_ENTRY_POINTS(T, suffix)                                                       \
  extern "C" void mro_roi_align_forward_##suffix(                                                   \
      int levels, const T* const* data, const int64_t* heights, const int64_t* widths,              \
      const double* scales, int64_t first_level, int64_t channels, double canonical_scale,          \
      int64_t canonical_level, int channels_last, const T* rois, int64_t num_rois, T* output,       \
      int32_t* argmax, int64_t batch, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,   \
      int aligned, unsigned int blocks) {                                                           \
    forward<T>(make_spec(levels, heights, widths, scales, first_level, channels, canonical_scale,   \
                         canonical_level, channels_last),                                           \
               data, rois, num_rois, output, argmax, batch, pooled_h, pooled_w, sampling_ratio,     \
               aligned, blocks);                                                                    \
  }                                                                                                 \
  extern "C" void mro_roi_align_backward_##suffix(                                                  \
      int levels, const int64_t* heights, const int64_t* widths, const double* scales,              \
      int64_t first_level, int64_t channels, double canonical_scale, int64_t canonical_level,       \
      int channels_last, const T* grad, const T* rois, int64_t num_rois, const int32_t* argmax,     \
      T* const* grad_inputs, int64_t batch, int64_t pooled_h, int64_t pooled_w,                     \
      int64_t sampling_ratio, int aligned, int deterministic, double max_abs_grad,                  \
      unsigned int blocks) {                                                                        \
    backward<T>(make_spec(levels, heights, widths, scales, first_level, channels, canonical_scale,  \
                          canonical_level, channels_last),                                          \
                grad, rois, num_rois, argmax, grad_inputs, batch, pooled_h, pooled_w,               \
                sampling_ratio, aligned, deterministic, max_abs_grad, blocks);                      \
  }

MRO_EMULATION_ENTRY_POINTS(float, f32)
MRO_EMULATION_ENTRY_POINTS(double, f64)
