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
#include "roi_align_kernels.cuh"

namespace maskrcnn_ops {
namespace {

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
  const int64_t work = spec.forward_work(num_rois, pooled_h, pooled_w);
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
  const std::vector<int64_t> sizes = spec.level_sizes(batch);
  int64_t total = 0;
  for (const int64_t size : sizes) total += size;
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
      fixed_point_scale_kernel<<<1, 1, 0, stream>>>(max_abs.const_data_ptr<double>(),
                                                    fixed_point_bound(rois.size(0), pooled_h, pooled_w),
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
