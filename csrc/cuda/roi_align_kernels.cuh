// RoIAlign CUDA kernels and the device-side structures they use, free of
// ATen so that the same source also compiles as host C++ under
// tests/cuda_emulation/, where a serial grid emulator runs these very
// kernels on the CPU (the test suite compares them with the CPU kernels; no
// GPU is needed to check their index arithmetic and layouts). At the end,
// the launch sequences of a call, templated over the launcher
// (csrc/cuda/launch.cuh): roi_align.cu runs them on the GPU and the emulator
// on the CPU, so the tests also check the host side of the launches. The host
// code that checks and allocates lives in roi_align.cu.
//
// Compiled by nvcc, or by a host compiler after tests/cuda_emulation/
// cuda_shim.h has defined the CUDA built-ins it uses (threadIdx, blockIdx,
// blockDim, gridDim, __global__, __device__, __forceinline__, atomicAdd,
// __double2ll_rn, __longlong_as_double).
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/roi_align_math.h"
#include "../common/roi_align_pyramid.h"
#include "launch.cuh"

namespace maskrcnn_ops {
namespace {

constexpr int kChannelsPerThread = 4;

// What the kernels take by value: the maps (csrc/common/roi_align_pyramid.h)
// and a pointer per level to element 0 of its map. T is the element type the
// kernel reads (features) or writes (gradient sinks).
template <typename T, typename acc_t>
struct PyramidData : Pyramid<acc_t> {
  T* data[kMaxPyramidLevels];
};

template <typename T, typename acc_t>
PyramidData<T, acc_t> with_data(const Pyramid<acc_t>& maps, T* const* data) {
  PyramidData<T, acc_t> p{};
  static_cast<Pyramid<acc_t>&>(p) = maps;
  for (int64_t l = 0; l < maps.levels; ++l) p.data[l] = data[l];
  return p;
}

// The deterministic backward's bound on any accumulated magnitude, in units
// of max|grad|: each bin spreads |grad| / count over count samples of total
// weight 1, so no element can gather more than K * PH * PW * max|grad|.
inline double fixed_point_bound(int64_t num_rois, int64_t pooled_h, int64_t pooled_w) {
  return static_cast<double>(std::max<int64_t>(1, num_rois * pooled_h * pooled_w));
}

struct Bin {
  int64_t k, c, ph, pw;
};

// Decomposes a flat work index. channels_last: (k, ph, pw, c), c fastest, one
// channel per thread. NCHW: (k, channel group, ph, pw), pw fastest.
__device__ __forceinline__ Bin decompose(int64_t index, int64_t channels,
                                         int64_t pooled_h, int64_t pooled_w,
                                         bool channels_last, int group) {
  Bin bin;
  if (channels_last) {
    bin.c = index % channels;
    index /= channels;
    bin.pw = index % pooled_w;
    index /= pooled_w;
    bin.ph = index % pooled_h;
    bin.k = index / pooled_h;
  } else {
    const int64_t groups = (channels + group - 1) / group;
    bin.pw = index % pooled_w;
    index /= pooled_w;
    bin.ph = index % pooled_h;
    index /= pooled_h;
    bin.c = (index % groups) * group;
    bin.k = index / groups;
  }
  return bin;
}

// kMax: mmcv's max pooling, which also writes the winning sample of each bin
// to argmax (-1 for a RoI without samples); otherwise the average.
template <typename scalar_t, typename acc_t, int CPT, bool kMax>
__global__ void roi_align_forward_kernel(
    PyramidData<const scalar_t, acc_t> maps, const acc_t* __restrict__ rois,
    scalar_t* __restrict__ output, int32_t* __restrict__ argmax, int64_t work,
    int64_t batch, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
    bool aligned) {
  const int group = maps.channels_last ? 1 : CPT;
  const int64_t channels = maps.channels;
  MRO_GRID_STRIDE(index, work) {
    const Bin bin = decompose(index, channels, pooled_h, pooled_w,
                              maps.channels_last, group);
    const int64_t level = maps.level_of(rois + bin.k * 5);
    const FeatureLayout layout = maps.layout(level);
    const auto g = maps.geometry(rois + bin.k * 5, level, batch, pooled_h, pooled_w,
                                 sampling_ratio, aligned);
    const int n = static_cast<int>(min_of<int64_t>(group, channels - bin.c));
    acc_t sum[CPT];  // the sum, or in max mode the best sample
    int32_t best[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      sum[j] = acc_t(0);
      best[j] = -1;
    }
    if (g.grid_h > 0 && g.grid_w > 0) {
      const scalar_t* base = maps.data[level] + layout.channel_origin(g.batch_index, bin.c);
      const int64_t cs = layout.channel_stride(), sy = layout.y_stride(), sx = layout.x_stride();
      for (int iy = 0; iy < g.grid_h; ++iy) {
        const auto ty = bin_sample_tap(g.start_h, g.bin_h, bin.ph, iy, g.grid_h, layout.height);
        for (int ix = 0; ix < g.grid_w; ++ix) {
          const auto tx = bin_sample_tap(g.start_w, g.bin_w, bin.pw, ix, g.grid_w, layout.width);
          // An outside sample reads nothing: it adds 0 (is a candidate of value
          // 0 in max mode).
          const bool outside = ty.outside() || tx.outside();
          const int64_t o1 = ty.low * sy + tx.low * sx, o2 = ty.low * sy + tx.high * sx;
          const int64_t o3 = ty.high * sy + tx.low * sx, o4 = ty.high * sy + tx.high * sx;
          const acc_t w1 = ty.w_low * tx.w_low, w2 = ty.w_low * tx.w_high;
          const acc_t w3 = ty.w_high * tx.w_low, w4 = ty.w_high * tx.w_high;
#pragma unroll
          for (int j = 0; j < CPT; ++j) {
            if (j < n) {
              const scalar_t* p = base + j * cs;
              const acc_t value =
                  outside ? acc_t(0)
                          : w1 * static_cast<acc_t>(p[o1]) + w2 * static_cast<acc_t>(p[o2]) +
                                w3 * static_cast<acc_t>(p[o3]) + w4 * static_cast<acc_t>(p[o4]);
              if constexpr (kMax) {
                if (best[j] < 0 || beats_max(value, sum[j])) {
                  sum[j] = value;
                  best[j] = iy * g.grid_w + ix;
                }
              } else {
                sum[j] += value;
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      if (j < n) {
        const int64_t o = layout.output_offset(bin.k, bin.c + j, bin.ph, bin.pw, pooled_h, pooled_w);
        if constexpr (kMax) {
          output[o] = static_cast<scalar_t>(sum[j]);
          argmax[o] = best[j];
        } else {
          output[o] = static_cast<scalar_t>(sum[j] / g.count);
        }
      }
    }
  }
}

// ----------------------------------------------------------------- backward

// Gradient sinks: where the backward kernel adds its contributions. `data`
// points at element 0 of the level's gradient map.
// A kernel calls bind() once, then add() per contribution.
template <typename acc_t>
struct FloatAtomicSink {
  using element_t = acc_t;
  __device__ __forceinline__ FloatAtomicSink bind() const { return *this; }
  __device__ __forceinline__ void add(acc_t* data, int64_t i, acc_t v) const {
    atomicAdd(data + i, v);
  }
};

// Deterministic: contributions are rounded to fixed point (integer atomics
// commute). A NaN or Inf in grad has no fixed-point form; then (scale 0) the
// same 64-bit words hold float64 sums instead, so non-finite values land
// exactly where the CPU puts them (NaN, +-Inf: the same whatever the order)
// and only finite sums may differ in their last bit between runs.
template <typename acc_t>
struct FixedPointSink {
  using element_t = unsigned long long;
  const double* scale;  // device scalar; 0 flags a non-finite grad

  struct Bound {
    double scale;
    __device__ __forceinline__ void add(unsigned long long* data, int64_t i, acc_t v) const {
      if (scale == 0.0) {
        atomicAdd(reinterpret_cast<double*>(data + i), static_cast<double>(v));
      } else {
        const long long q = __double2ll_rn(static_cast<double>(v) * scale);
        atomicAdd(data + i, static_cast<unsigned long long>(q));
      }
    }
  };
  // The scale is read once per thread, not once per contribution.
  __device__ __forceinline__ Bound bind() const { return Bound{*scale}; }
};

// argmax: null for average pooling; for max pooling, the winning sample of
// each bin (as the forward wrote it), which alone receives the bin's gradient.
// Entries outside the bin's samples (-1, or a corrupt value) add nothing.
template <typename scalar_t, typename acc_t, typename Sink>
__global__ void roi_align_backward_kernel(
    const scalar_t* __restrict__ grad, const acc_t* __restrict__ rois,
    const int32_t* __restrict__ argmax, Sink sink,
    PyramidData<typename Sink::element_t, acc_t> maps, int64_t work, int64_t batch,
    int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  const auto sink_bound = sink.bind();
  MRO_GRID_STRIDE(index, work) {
    const Bin bin = decompose(index, maps.channels, pooled_h, pooled_w,
                              maps.channels_last, 1);
    const int64_t level = maps.level_of(rois + bin.k * 5);
    const FeatureLayout layout = maps.layout(level);
    const auto g = maps.geometry(rois + bin.k * 5, level, batch, pooled_h, pooled_w,
                                 sampling_ratio, aligned);
    if (g.grid_h == 0 || g.grid_w == 0) continue;
    // With one channel per thread, the work index is grad's (and argmax's)
    // storage offset in either layout.
    int iy_begin = 0, iy_end = g.grid_h, ix_begin = 0, ix_end = g.grid_w;
    acc_t divisor = g.count;
    if (argmax != nullptr) {
      const int32_t sample = argmax[index];
      if (sample < 0 || sample >= g.grid_h * g.grid_w) continue;
      iy_begin = sample / g.grid_w;
      ix_begin = sample % g.grid_w;
      iy_end = iy_begin + 1;
      ix_end = ix_begin + 1;
      divisor = acc_t(1);
    }
    const acc_t gbin = static_cast<acc_t>(grad[index]) / divisor;
    auto* data = maps.data[level] + layout.channel_origin(g.batch_index, bin.c);
    const int64_t sy = layout.y_stride(), sx = layout.x_stride();
    for (int iy = iy_begin; iy < iy_end; ++iy) {
      const auto ty = bin_sample_tap(g.start_h, g.bin_h, bin.ph, iy, g.grid_h, layout.height);
      if (ty.outside()) continue;
      const acc_t g_lo = gbin * ty.w_low, g_hi = gbin * ty.w_high;
      for (int ix = ix_begin; ix < ix_end; ++ix) {
        const auto tx = bin_sample_tap(g.start_w, g.bin_w, bin.pw, ix, g.grid_w, layout.width);
        if (tx.outside()) continue;
        sink_bound.add(data, ty.low * sy + tx.low * sx, g_lo * tx.w_low);
        sink_bound.add(data, ty.low * sy + tx.high * sx, g_lo * tx.w_high);
        sink_bound.add(data, ty.high * sy + tx.low * sx, g_hi * tx.w_low);
        sink_bound.add(data, ty.high * sy + tx.high * sx, g_hi * tx.w_high);
      }
    }
  }
}

// Largest power of two such that the largest possible accumulated magnitude,
// max|grad| * bound, times the scale stays below 2^62.
// The exponent is capped so the scale stays finite for tiny float64 grads.
// max_abs_grad is null for an empty grad (scale 1: the sums are all zero).
__global__ void fixed_point_scale_kernel(const double* max_abs_grad, double bound,
                                         double* scale) {
  const double m = max_abs_grad != nullptr ? *max_abs_grad : 0.0;
  if (!(m - m == 0.0)) {
    *scale = 0.0;  // NaN or Inf in grad
  } else if (m == 0.0) {
    *scale = 1.0;
  } else {
    *scale = exp2(fmin(floor(62.0 - log2(m * bound) - 1.0), 1000.0));
  }
}

template <typename scalar_t>
__global__ void fixed_point_to_float_kernel(const unsigned long long* __restrict__ fixed,
                                            const double* scale, scalar_t* __restrict__ out,
                                            int64_t n) {
  const double s = *scale;
  MRO_GRID_STRIDE(i, n) {
    const double value = s == 0.0 ? __longlong_as_double(static_cast<long long>(fixed[i]))
                                  : static_cast<double>(static_cast<long long>(fixed[i])) / s;
    out[i] = static_cast<scalar_t>(value);
  }
}

// ------------------------------------------------ launch sequences (host) --
//
// The launches of one call, for roi_align.cu (StreamLaunch) and the emulator
// (EmulatedLaunch). The caller has checked the arguments and owns the
// memory; `maps` describes the feature maps (and so the gradients) in the
// accumulation type.

// What every launch of a call is given besides the maps and its buffers.
template <typename acc_t>
struct PoolArgs {
  const acc_t* rois;  // [num_rois, 5] in acc_t
  int64_t num_rois, batch, pooled_h, pooled_w, sampling_ratio;
  bool aligned;
};

// Threads of the backward kernel: one per element of grad [K, C, PH, PW].
template <typename acc_t>
int64_t backward_work(const Pyramid<acc_t>& maps, const PoolArgs<acc_t>& a) {
  return a.num_rois * maps.channels * a.pooled_h * a.pooled_w;
}

// Forward: output (and, for max pooling, argmax; null for the average)
// [K, C, PH, PW] in the maps' layout, from one feature map per level. One
// launch for all RoIs and levels. Threads: one per (RoI, bin, channel) for
// channels_last, per (RoI, channel group, bin) for NCHW.
template <typename scalar_t, typename acc_t, typename Launch>
void launch_forward(const Launch& launch, const Pyramid<acc_t>& maps,
                    const scalar_t* const* features, const PoolArgs<acc_t>& a, scalar_t* output,
                    int32_t* argmax) {
  const int64_t groups = maps.channels_last
                             ? maps.channels
                             : (maps.channels + kChannelsPerThread - 1) / kChannelsPerThread;
  const int64_t work = a.num_rois * a.pooled_h * a.pooled_w * groups;
  if (work == 0) return;
  const auto kernel = argmax != nullptr
                          ? roi_align_forward_kernel<scalar_t, acc_t, kChannelsPerThread, true>
                          : roi_align_forward_kernel<scalar_t, acc_t, kChannelsPerThread, false>;
  launch(grid_size(work), kThreads, kernel, with_data(maps, features), a.rois, output, argmax, work,
         a.batch, a.pooled_h, a.pooled_w, a.sampling_ratio, a.aligned);
}

// Backward with float atomics: adds grad (argmax: as launch_forward) into
// grad_inputs, one zeroed acc_t map per level in the maps' layout.
template <typename scalar_t, typename acc_t, typename Launch>
void launch_backward(const Launch& launch, const Pyramid<acc_t>& maps, const scalar_t* grad,
                     const int32_t* argmax, const PoolArgs<acc_t>& a, acc_t* const* grad_inputs) {
  const int64_t work = backward_work(maps, a);
  if (work == 0 || maps.total_numel(a.batch) == 0) return;
  launch(grid_size(work), kThreads, roi_align_backward_kernel<scalar_t, acc_t, FloatAtomicSink<acc_t>>,
         grad, a.rois, argmax, FloatAtomicSink<acc_t>{}, with_data(maps, grad_inputs), work, a.batch,
         a.pooled_h, a.pooled_w, a.sampling_ratio, a.aligned);
}

// Deterministic backward: the sums in 64-bit fixed point, then converted to
// scalar_t, which overwrites every element of grad_inputs (one map per level
// in the maps' layout). Scratch: `fixed`, zeroed, one word per element of
// every level, level after level (Pyramid::total_numel); `scale`, one double.
// max_abs_grad: max|grad| as a double in device memory, read only when grad
// has elements.
template <typename scalar_t, typename acc_t, typename Launch>
void launch_deterministic_backward(const Launch& launch, const Pyramid<acc_t>& maps,
                                   const scalar_t* grad, const int32_t* argmax,
                                   const PoolArgs<acc_t>& a, const double* max_abs_grad,
                                   unsigned long long* fixed, double* scale,
                                   scalar_t* const* grad_inputs) {
  const int64_t work = backward_work(maps, a);
  unsigned long long* level_fixed[kMaxPyramidLevels] = {};
  int64_t total = 0;
  for (int64_t l = 0; l < maps.levels; ++l) {
    level_fixed[l] = fixed + total;
    total += maps.numel(l, a.batch);
  }
  if (total == 0) return;
  launch(1, 1, fixed_point_scale_kernel, work > 0 ? max_abs_grad : nullptr,
         fixed_point_bound(a.num_rois, a.pooled_h, a.pooled_w), scale);
  if (work > 0) {
    launch(grid_size(work), kThreads, roi_align_backward_kernel<scalar_t, acc_t, FixedPointSink<acc_t>>,
           grad, a.rois, argmax, FixedPointSink<acc_t>{scale}, with_data(maps, level_fixed), work,
           a.batch, a.pooled_h, a.pooled_w, a.sampling_ratio, a.aligned);
  }
  for (int64_t l = 0; l < maps.levels; ++l) {
    const int64_t n = maps.numel(l, a.batch);
    if (n == 0) continue;
    launch(grid_size(n), kThreads, fixed_point_to_float_kernel<scalar_t>, level_fixed[l], scale,
           grad_inputs[l], n);
  }
}

}  // namespace
}  // namespace maskrcnn_ops
