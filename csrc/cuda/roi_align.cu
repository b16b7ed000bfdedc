// RoIAlign forward and backward on CUDA, for one feature map (roi_align) and
// for a feature pyramid (multi_level_roi_align, where each thread maps its RoI
// to an FPN level and reads that level's map). One kernel serves both: a
// single map is a pyramid of one level.
//
// Thread mapping follows the memory layout, so that neighbouring threads
// touch neighbouring addresses:
//   * channels_last: one thread per (RoI, bin, channel), channel fastest. Loads
//     of a warp are one contiguous run of channels; the backward's atomics are
//     coalesced the same way.
//   * NCHW: one thread per (RoI, channel group, bin), output column fastest;
//     each thread computes the sample taps once and applies them to
//     kChannelsPerThread channel planes, which amortizes the geometry and
//     keeps several independent loads in flight.
// The geometry and bilinear taps are the shared code in csrc/common, so the
// CPU tests check the arithmetic these kernels run. All index arithmetic is
// 64-bit.
//
// Backward: atomics into a zeroed buffer (float32 for half types, rounded once
// at the end). With torch.use_deterministic_algorithms(True) the atomics add
// 64-bit fixed-point integers instead: integer addition is associative, so the
// sum, and the result, is bitwise independent of the order of the atomics. The
// fixed-point scale is derived on the device from max|grad| (no host sync), at
// 2^-45 of the largest possible sum or finer, far below float32 resolution.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../common/roi_align_checks.h"
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
};

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

// Batch indices are checked with one device-to-host copy; during CUDA graph
// capture that copy is impossible, and the kernels' own guard (invalid rows
// give zeros and read nothing) is what remains.
void check_batch_indices(const char* op, const at::Tensor& rois, int64_t batch) {
  if (rois.size(0) == 0) return;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  const at::Tensor index = rois.select(1, 0);
  const at::Tensor bad = index.le(-1).logical_or_(index.ge(batch)).logical_or_(index.ne(index));
  const bool any_bad = bad.any().item<bool>();
  TORCH_CHECK(!any_bad, op, ": rois[:, 0] holds a batch index outside the valid range [0, ",
              batch, ") (or NaN)");
}

PyramidSpec single_level(int64_t channels, int64_t height, int64_t width,
                         double spatial_scale, bool channels_last) {
  PyramidSpec spec;
  spec.heights = {height};
  spec.widths = {width};
  spec.scales = {spatial_scale};
  spec.channels = channels;
  spec.channels_last = channels_last;
  return spec;
}

PyramidSpec fpn_pyramid(int64_t channels, std::vector<int64_t> heights,
                        std::vector<int64_t> widths, c10::ArrayRef<double> scales,
                        double canonical_scale, int64_t canonical_level,
                        bool channels_last) {
  PyramidSpec spec;
  spec.heights = std::move(heights);
  spec.widths = std::move(widths);
  spec.scales.assign(scales.begin(), scales.end());
  spec.first_level = fpn_first_level(scales);
  spec.channels = channels;
  spec.canonical_scale = canonical_scale;
  spec.canonical_level = canonical_level;
  spec.channels_last = channels_last;
  return spec;
}

// Forward over same-layout feature maps [N, C, H_l, W_l] (spec describes
// them). One launch for all RoIs and levels; no host synchronization. With an
// argmax tensor (int32, the output's shape and layout), max pooling.
at::Tensor pool_forward(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                        const PyramidSpec& spec, int64_t pooled_h, int64_t pooled_w,
                        int64_t sampling_ratio, bool aligned, at::Tensor* argmax = nullptr) {
  const at::Tensor& first = features.front();
  const auto memory_format = spec.channels_last ? at::MemoryFormat::ChannelsLast
                                                : at::MemoryFormat::Contiguous;
  const int64_t num_rois = rois.size(0), batch = first.size(0), channels = spec.channels;
  const at::Tensor rois_acc = rois.to(accumulate_dtype(first.scalar_type())).contiguous();
  at::Tensor output = at::empty({num_rois, channels, pooled_h, pooled_w},
                                first.options().memory_format(memory_format));
  if (argmax != nullptr) {
    *argmax = at::empty(output.sizes(), first.options().dtype(at::kInt).memory_format(memory_format));
  }
  if (output.numel() == 0) return output;
  std::vector<at::Tensor> contiguous;
  for (const auto& f : features) contiguous.push_back(f.contiguous(memory_format));
  const int64_t groups =
      spec.channels_last ? channels : (channels + kChannelsPerThread - 1) / kChannelsPerThread;
  const int64_t work = num_rois * pooled_h * pooled_w * groups;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, first.scalar_type(), "roi_align_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        std::vector<const scalar_t*> data;
        for (const auto& f : contiguous) data.push_back(f.const_data_ptr<scalar_t>());
        const auto maps = spec.on_device<const scalar_t, acc_t>(data);
        if (argmax != nullptr) {
          roi_align_forward_kernel<scalar_t, acc_t, kChannelsPerThread, true>
              <<<grid_size(work), kThreads, 0, stream>>>(
                  maps, rois_acc.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(),
                  argmax->mutable_data_ptr<int32_t>(), work, batch, pooled_h, pooled_w,
                  sampling_ratio, aligned);
        } else {
          roi_align_forward_kernel<scalar_t, acc_t, kChannelsPerThread, false>
              <<<grid_size(work), kThreads, 0, stream>>>(
                  maps, rois_acc.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(),
                  nullptr, work, batch, pooled_h, pooled_w, sampling_ratio, aligned);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                  int64_t sampling_ratio, bool aligned) {
  check_roi_align_forward(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor rois_acc = rois.to(accumulate_dtype(input.scalar_type())).contiguous();
  check_batch_indices("maskrcnn_ops::roi_align", rois_acc, input.size(0));
  return pool_forward({input}, rois_acc,
                      single_level(input.size(1), input.size(2), input.size(3), spatial_scale,
                                   use_channels_last(input)),
                      pooled_h, pooled_w, sampling_ratio, aligned);
}

at::Tensor multi_level_roi_align_forward_cuda(at::TensorList features, const at::Tensor& rois,
                                              c10::ArrayRef<double> spatial_scales,
                                              int64_t pooled_h, int64_t pooled_w,
                                              int64_t sampling_ratio, bool aligned,
                                              double canonical_scale, int64_t canonical_level) {
  check_multi_level_roi_align_forward(features, rois, spatial_scales, pooled_h, pooled_w,
                                      sampling_ratio, canonical_scale);
  const c10::cuda::CUDAGuard device_guard(features[0].device());
  std::vector<int64_t> heights, widths;
  for (const auto& f : features) {
    heights.push_back(f.size(2));
    widths.push_back(f.size(3));
  }
  return pool_forward(features.vec(), rois,
                      fpn_pyramid(features[0].size(1), heights, widths, spatial_scales,
                                  canonical_scale, canonical_level,
                                  use_channels_last(features[0])),
                      pooled_h, pooled_w, sampling_ratio, aligned);
}

// Backward over the maps spec describes: one gradient [N, C, H_l, W_l] per
// level, in grad's dtype and layout. One launch for all RoIs and levels.
std::vector<at::Tensor> pool_backward(const at::Tensor& grad, const at::Tensor& rois,
                                      const PyramidSpec& spec, int64_t pooled_h,
                                      int64_t pooled_w, int64_t batch,
                                      int64_t sampling_ratio, bool aligned,
                                      const at::Tensor* argmax = nullptr) {
  const auto memory_format = spec.channels_last ? at::MemoryFormat::ChannelsLast
                                                : at::MemoryFormat::Contiguous;
  const int64_t channels = spec.channels, levels = spec.levels();
  const auto acc_dtype = accumulate_dtype(grad.scalar_type());
  const at::Tensor rois_acc = rois.to(acc_dtype).contiguous();
  const auto options = grad.options().memory_format(memory_format);
  const int64_t work = grad.numel();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<int64_t> sizes;  // elements per level
  int64_t total = 0;
  for (int64_t l = 0; l < levels; ++l) {
    sizes.push_back(batch * channels * spec.heights[l] * spec.widths[l]);
    total += sizes.back();
  }
  auto empty_level = [&](int64_t l, c10::ScalarType dtype) {
    return at::empty({batch, channels, spec.heights[l], spec.widths[l]}, options.dtype(dtype));
  };
  const at::Tensor grad_c = grad.contiguous(memory_format);
  const at::Tensor argmax_c = argmax != nullptr ? argmax->contiguous(memory_format) : at::Tensor();
  const int32_t* argmax_data = argmax != nullptr ? argmax_c.const_data_ptr<int32_t>() : nullptr;

  if (deterministic) {
    std::vector<at::Tensor> grad_inputs;
    for (int64_t l = 0; l < levels; ++l) grad_inputs.push_back(empty_level(l, grad.scalar_type()));
    if (total == 0) return grad_inputs;
    // One fixed-point buffer holds every level, back to back.
    at::Tensor fixed = at::zeros({total}, grad.options().dtype(at::kLong));
    at::Tensor scale = at::empty({}, grad.options().dtype(at::kDouble));
    if (work > 0) {
      const at::Tensor max_abs = grad.abs().max().to(at::kDouble);
      // Each bin spreads |grad| / count over count samples of total weight 1,
      // so no element can gather more than K * PH * PW * max|grad|.
      const double bound = static_cast<double>(std::max<int64_t>(1, rois.size(0) * pooled_h * pooled_w));
      fixed_point_scale_kernel<<<1, 1, 0, stream>>>(max_abs.const_data_ptr<double>(), bound,
                                                    scale.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      scale.fill_(1.0);
    }
    auto* fixed_data = reinterpret_cast<unsigned long long*>(fixed.mutable_data_ptr<int64_t>());
    std::vector<unsigned long long*> level_data;
    for (int64_t l = 0, offset = 0; l < levels; offset += sizes[l], ++l)
      level_data.push_back(fixed_data + offset);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda_deterministic", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          if (work > 0) {
            const FixedPointSink<acc_t> sink{scale.const_data_ptr<double>()};
            roi_align_backward_kernel<scalar_t, acc_t><<<grid_size(work), kThreads, 0, stream>>>(
                grad_c.const_data_ptr<scalar_t>(), rois_acc.const_data_ptr<acc_t>(), argmax_data,
                sink, spec.on_device<unsigned long long, acc_t>(level_data), work, batch, pooled_h,
                pooled_w, sampling_ratio, aligned);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          for (int64_t l = 0; l < levels; ++l) {
            if (sizes[l] == 0) continue;
            fixed_point_to_float_kernel<scalar_t><<<grid_size(sizes[l]), kThreads, 0, stream>>>(
                level_data[l], scale.const_data_ptr<double>(),
                grad_inputs[l].mutable_data_ptr<scalar_t>(), sizes[l]);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
    return grad_inputs;
  }

  // Half types gather into float32 and are rounded once at the end.
  // (at::zeros would drop the memory format from the options.)
  std::vector<at::Tensor> grad_inputs;
  for (int64_t l = 0; l < levels; ++l) grad_inputs.push_back(empty_level(l, acc_dtype).zero_());
  if (total > 0 && work > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          std::vector<acc_t*> level_data;
          for (auto& t : grad_inputs) level_data.push_back(t.mutable_data_ptr<acc_t>());
          roi_align_backward_kernel<scalar_t, acc_t><<<grid_size(work), kThreads, 0, stream>>>(
              grad_c.const_data_ptr<scalar_t>(), rois_acc.const_data_ptr<acc_t>(), argmax_data,
              FloatAtomicSink<acc_t>{}, spec.on_device<acc_t, acc_t>(level_data), work, batch,
              pooled_h, pooled_w, sampling_ratio, aligned);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  for (auto& t : grad_inputs) {
    if (t.scalar_type() != grad.scalar_type()) t = t.to(grad.scalar_type());
  }
  return grad_inputs;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                   int64_t batch, int64_t channels, int64_t height,
                                   int64_t width, int64_t sampling_ratio, bool aligned) {
  check_roi_align_backward(grad, rois, spatial_scale, pooled_h, pooled_w, batch, channels,
                           height, width, sampling_ratio);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  return pool_backward(grad, rois,
                       single_level(channels, height, width, spatial_scale, use_channels_last(grad)),
                       pooled_h, pooled_w, batch, sampling_ratio, aligned)
      .front();
}

std::tuple<at::Tensor, at::Tensor> roi_align_max_forward_cuda(
    const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_h,
    int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  check_roi_align_forward(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor rois_acc = rois.to(accumulate_dtype(input.scalar_type())).contiguous();
  check_batch_indices("maskrcnn_ops::roi_align_max", rois_acc, input.size(0));
  at::Tensor argmax;
  at::Tensor output = pool_forward(
      {input}, rois_acc,
      single_level(input.size(1), input.size(2), input.size(3), spatial_scale,
                   use_channels_last(input)),
      pooled_h, pooled_w, sampling_ratio, aligned, &argmax);
  return {output, argmax};
}

at::Tensor roi_align_max_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                       const at::Tensor& argmax, double spatial_scale,
                                       int64_t pooled_h, int64_t pooled_w, int64_t batch,
                                       int64_t channels, int64_t height, int64_t width,
                                       int64_t sampling_ratio, bool aligned) {
  check_roi_align_backward(grad, rois, spatial_scale, pooled_h, pooled_w, batch, channels,
                           height, width, sampling_ratio);
  check_argmax(grad, argmax);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  return pool_backward(grad, rois,
                       single_level(channels, height, width, spatial_scale, use_channels_last(grad)),
                       pooled_h, pooled_w, batch, sampling_ratio, aligned, &argmax)
      .front();
}

std::vector<at::Tensor> multi_level_roi_align_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, c10::ArrayRef<double> spatial_scales,
    int64_t pooled_h, int64_t pooled_w, int64_t batch, int64_t channels,
    c10::IntArrayRef heights, c10::IntArrayRef widths, int64_t sampling_ratio, bool aligned,
    double canonical_scale, int64_t canonical_level) {
  check_multi_level_roi_align_backward(grad, rois, spatial_scales, pooled_h, pooled_w, batch,
                                       channels, heights, widths, sampling_ratio, canonical_scale);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  return pool_backward(grad, rois,
                       fpn_pyramid(channels, heights.vec(), widths.vec(), spatial_scales,
                                   canonical_scale, canonical_level, use_channels_last(grad)),
                       pooled_h, pooled_w, batch, sampling_ratio, aligned);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  m.impl("roi_align", &roi_align_forward_cuda);
  m.impl("roi_align_backward", &roi_align_backward_cuda);
  m.impl("roi_align_max", &roi_align_max_forward_cuda);
  m.impl("roi_align_max_backward", &roi_align_max_backward_cuda);
  m.impl("multi_level_roi_align", &multi_level_roi_align_forward_cuda);
  m.impl("multi_level_roi_align_backward", &multi_level_roi_align_backward_cuda);
}

}  // namespace maskrcnn_ops
