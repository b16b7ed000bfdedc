// RoIAlign CUDA kernels and the device-side structures they use, free of
// ATen so that the same source also compiles as host C++ under
// tests/cuda_emulation/, where a serial grid emulator runs these very
// kernels on the CPU (the test suite compares them with the CPU kernels; no
// GPU is needed to check their index arithmetic and layouts). The host code
// that allocates, checks and launches lives in roi_align.cu.
//
// Compiled by nvcc, or by a host compiler after tests/cuda_emulation/
// cuda_shim.h has defined the CUDA built-ins it uses (threadIdx, blockIdx,
// blockDim, gridDim, __global__, __device__, __forceinline__, atomicAdd,
// __double2ll_rn, __longlong_as_double).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/roi_align_math.h"

namespace maskrcnn_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kChannelsPerThread = 4;

inline unsigned int grid_size(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 30)));
}

// The feature maps of one call, passed to the kernels by value: a pointer and
// size per level, and the FPN level mapping (unused for a single map). T is
// the element type the kernel reads (features) or writes (gradient sinks).
template <typename T, typename acc_t>
struct Pyramid {
  T* data[kMaxPyramidLevels];
  int64_t height[kMaxPyramidLevels];
  int64_t width[kMaxPyramidLevels];
  acc_t scale[kMaxPyramidLevels];
  int64_t levels, first_level, channels;
  acc_t canonical_scale, canonical_level;
  bool channels_last;

  __device__ __forceinline__ int64_t level_of(const acc_t* roi) const {
    if (levels == 1) return 0;
    return fpn_level_index<acc_t>(roi, canonical_scale, canonical_level, first_level, levels);
  }
  __device__ __forceinline__ FeatureLayout layout(int64_t level) const {
    return FeatureLayout{channels, height[level], width[level], channels_last};
  }
  __device__ __forceinline__ RoIAlignGeometry<acc_t> geometry(
      const acc_t* roi, int64_t level, int64_t batch, int64_t pooled_h,
      int64_t pooled_w, int64_t sampling_ratio, bool aligned) const {
    return roi_geometry<acc_t>(roi, batch, height[level], width[level], scale[level],
                               pooled_h, pooled_w, sampling_ratio, aligned);
  }
};

// Host-side description of the maps, from which the kernels' Pyramid is made.
struct PyramidSpec {
  std::vector<int64_t> heights, widths;
  std::vector<double> scales;
  int64_t first_level = 0, channels = 0;
  double canonical_scale = 224.0;
  int64_t canonical_level = 4;
  bool channels_last = false;

  int64_t levels() const { return static_cast<int64_t>(heights.size()); }

  template <typename T, typename acc_t>
  Pyramid<T, acc_t> on_device(const std::vector<T*>& data) const {
    Pyramid<T, acc_t> p{};
    for (int64_t l = 0; l < levels(); ++l) {
      p.data[l] = data[l];
      p.height[l] = heights[l];
      p.width[l] = widths[l];
      p.scale[l] = static_cast<acc_t>(scales[l]);
    }
    p.levels = levels();
    p.first_level = first_level;
    p.channels = channels;
    p.canonical_scale = static_cast<acc_t>(canonical_scale);
    p.canonical_level = static_cast<acc_t>(canonical_level);
    p.channels_last = channels_last;
    return p;
  }

  // Threads of the forward kernel: one per (RoI, bin, channel) for
  // channels_last, per (RoI, channel group, bin) for NCHW.
  int64_t forward_work(int64_t num_rois, int64_t pooled_h, int64_t pooled_w) const {
    const int64_t groups =
        channels_last ? channels : (channels + kChannelsPerThread - 1) / kChannelsPerThread;
    return num_rois * pooled_h * pooled_w * groups;
  }

  // Elements of each level's gradient [batch, channels, H_l, W_l].
  std::vector<int64_t> level_sizes(int64_t batch) const {
    std::vector<int64_t> sizes;
    for (int64_t l = 0; l < levels(); ++l) sizes.push_back(batch * channels * heights[l] * widths[l]);
    return sizes;
  }
};

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
    Pyramid<const scalar_t, acc_t> maps, const acc_t* __restrict__ rois,
    scalar_t* __restrict__ output, int32_t* __restrict__ argmax, int64_t work,
    int64_t batch, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
    bool aligned) {
  const int group = maps.channels_last ? 1 : CPT;
  const int64_t channels = maps.channels;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < work; index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
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
    Pyramid<typename Sink::element_t, acc_t> maps, int64_t work, int64_t batch,
    int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  const auto sink_bound = sink.bind();
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < work; index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
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
__global__ void fixed_point_scale_kernel(const double* max_abs_grad, double bound,
                                         double* scale) {
  const double m = *max_abs_grad;
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
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double value = s == 0.0 ? __longlong_as_double(static_cast<long long>(fixed[i]))
                                  : static_cast<double>(static_cast<long long>(fixed[i])) / s;
    out[i] = static_cast<scalar_t>(value);
  }
}

}  // namespace
}  // namespace maskrcnn_ops
