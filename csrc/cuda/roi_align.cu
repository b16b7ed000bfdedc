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
// CPU tests check the arithmetic these kernels run; the maps are the CPU
// kernels' Pyramid (csrc/common/roi_align_pyramid.h); the launches are the
// launch sequences of roi_align_kernels.cuh, which the test suite's emulator
// runs too. This file checks, allocates and dispatches. All index arithmetic
// is 64-bit.
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
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../common/roi_align_checks.h"
#include "../common/roi_align_pyramid.h"
#include "launch.cuh"
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

// Forward over same-layout feature maps [N, C, H_l, W_l] (spec describes
// them). One launch for all RoIs and levels; no host synchronization. With an
// argmax tensor (int32, the output's shape and layout), max pooling.
at::Tensor pool_forward(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                        const Pyramid<double>& spec, int64_t pooled_h, int64_t pooled_w,
                        int64_t sampling_ratio, bool aligned, at::Tensor* argmax = nullptr) {
  const at::Tensor& first = features.front();
  const auto memory_format = memory_format_of(spec);
  const int64_t num_rois = rois.size(0), batch = first.size(0);
  const at::Tensor rois_acc = rois.to(accumulate_dtype(first.scalar_type())).contiguous();
  at::Tensor output = at::empty({num_rois, spec.channels, pooled_h, pooled_w},
                                first.options().memory_format(memory_format));
  if (argmax != nullptr) {
    *argmax = at::empty(output.sizes(), first.options().dtype(at::kInt).memory_format(memory_format));
  }
  if (output.numel() == 0) return output;
  std::vector<at::Tensor> contiguous;
  for (const auto& f : features) contiguous.push_back(f.contiguous(memory_format));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, first.scalar_type(), "roi_align_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        std::vector<const scalar_t*> data;
        for (const auto& f : contiguous) data.push_back(f.const_data_ptr<scalar_t>());
        launch_forward<scalar_t, acc_t>(
            current_stream_launch(), spec.as<acc_t>(), data.data(),
            PoolArgs<acc_t>{rois_acc.const_data_ptr<acc_t>(), num_rois, batch, pooled_h, pooled_w,
                            sampling_ratio, aligned},
            output.mutable_data_ptr<scalar_t>(),
            argmax != nullptr ? argmax->mutable_data_ptr<int32_t>() : nullptr);
      });
  return output;
}

// roi_align and roi_align_max (given argmax): one feature map.
at::Tensor single_map_forward(const char* op, const at::Tensor& input, const at::Tensor& rois,
                              double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                              int64_t sampling_ratio, bool aligned, at::Tensor* argmax = nullptr) {
  check_roi_align_forward(op, input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor rois_acc = rois.to(accumulate_dtype(input.scalar_type())).contiguous();
  check_batch_indices(op, rois_acc, input.size(0));
  return pool_forward({input}, rois_acc,
                      single_level_pyramid(input.size(1), input.size(2), input.size(3),
                                           spatial_scale, use_channels_last(input)),
                      pooled_h, pooled_w, sampling_ratio, aligned, argmax);
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                  int64_t sampling_ratio, bool aligned) {
  return single_map_forward("maskrcnn_ops::roi_align", input, rois, spatial_scale, pooled_h,
                            pooled_w, sampling_ratio, aligned);
}

std::tuple<at::Tensor, at::Tensor> roi_align_max_forward_cuda(
    const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_h,
    int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  at::Tensor argmax;
  at::Tensor output = single_map_forward("maskrcnn_ops::roi_align_max", input, rois, spatial_scale,
                                         pooled_h, pooled_w, sampling_ratio, aligned, &argmax);
  return {output, argmax};
}

at::Tensor multi_level_roi_align_forward_cuda(at::TensorList features, const at::Tensor& rois,
                                              c10::ArrayRef<double> spatial_scales,
                                              int64_t pooled_h, int64_t pooled_w,
                                              int64_t sampling_ratio, bool aligned,
                                              double canonical_scale, int64_t canonical_level) {
  check_multi_level_roi_align_forward(features, rois, spatial_scales, pooled_h, pooled_w,
                                      sampling_ratio, canonical_scale);
  const c10::cuda::CUDAGuard device_guard(features[0].device());
  return pool_forward(features.vec(), rois,
                      feature_pyramid(features, spatial_scales, canonical_scale, canonical_level),
                      pooled_h, pooled_w, sampling_ratio, aligned);
}

// ---------------------------------------------------------------- backward --

// A backward call as its kernels read it: grad and argmax (max pooling's,
// else null) in the maps' layout, rois in the accumulation dtype.
struct BackwardCall {
  const Pyramid<double>& spec;
  at::Tensor grad, rois;
  const int32_t* argmax;
  int64_t batch, pooled_h, pooled_w, sampling_ratio;
  bool aligned;

  template <typename acc_t>
  PoolArgs<acc_t> args() const {
    return {rois.const_data_ptr<acc_t>(), rois.size(0), batch, pooled_h, pooled_w, sampling_ratio,
            aligned};
  }

  // Level l's gradient [N, C, H_l, W_l] in the maps' layout, uninitialized.
  at::Tensor empty_level(int64_t l, c10::ScalarType dtype) const {
    // (at::zeros would drop the memory format from the options.)
    return at::empty({batch, spec.channels, spec.height[l], spec.width[l]},
                     grad.options().dtype(dtype).memory_format(memory_format_of(spec)));
  }
};

// Float atomics into zeroed maps of the accumulation dtype (float32 for half
// types, rounded once at the end).
std::vector<at::Tensor> backward_atomic(const BackwardCall& call) {
  const auto dtype = call.grad.scalar_type();
  std::vector<at::Tensor> grad_inputs;
  for (int64_t l = 0; l < call.spec.levels; ++l)
    grad_inputs.push_back(call.empty_level(l, accumulate_dtype(dtype)).zero_());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "roi_align_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t*> data;
    for (auto& t : grad_inputs) data.push_back(t.mutable_data_ptr<acc_t>());
    launch_backward<scalar_t, acc_t>(current_stream_launch(), call.spec.as<acc_t>(),
                                     call.grad.const_data_ptr<scalar_t>(), call.argmax,
                                     call.args<acc_t>(), data.data());
  });
  for (auto& t : grad_inputs) {
    if (t.scalar_type() != dtype) t = t.to(dtype);
  }
  return grad_inputs;
}

// Deterministic (torch.use_deterministic_algorithms): 64-bit fixed point in
// one buffer for all levels, converted into maps of grad's dtype.
std::vector<at::Tensor> backward_fixed_point(const BackwardCall& call) {
  const auto dtype = call.grad.scalar_type();
  std::vector<at::Tensor> grad_inputs;
  for (int64_t l = 0; l < call.spec.levels; ++l) grad_inputs.push_back(call.empty_level(l, dtype));
  const int64_t total = call.spec.total_numel(call.batch);
  if (total == 0) return grad_inputs;
  const auto options = call.grad.options();
  at::Tensor fixed = at::zeros({total}, options.dtype(at::kLong));
  at::Tensor scale = at::empty({}, options.dtype(at::kDouble));
  // On the device, so nothing waits on the host.
  const at::Tensor max_abs =
      call.grad.numel() > 0 ? call.grad.abs().max().to(at::kDouble) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "roi_align_backward_cuda_deterministic", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        std::vector<scalar_t*> data;
        for (auto& t : grad_inputs) data.push_back(t.mutable_data_ptr<scalar_t>());
        launch_deterministic_backward<scalar_t, acc_t>(
            current_stream_launch(), call.spec.as<acc_t>(), call.grad.const_data_ptr<scalar_t>(),
            call.argmax, call.args<acc_t>(),
            max_abs.defined() ? max_abs.const_data_ptr<double>() : nullptr,
            reinterpret_cast<unsigned long long*>(fixed.mutable_data_ptr<int64_t>()),
            scale.mutable_data_ptr<double>(), data.data());
      });
  return grad_inputs;
}

// Backward over the maps spec describes: one gradient [N, C, H_l, W_l] per
// level, in grad's dtype and layout. One launch for all RoIs and levels.
std::vector<at::Tensor> pool_backward(const at::Tensor& grad, const at::Tensor& rois,
                                      const Pyramid<double>& spec, int64_t pooled_h,
                                      int64_t pooled_w, int64_t batch, int64_t sampling_ratio,
                                      bool aligned, const at::Tensor* argmax = nullptr) {
  const auto memory_format = memory_format_of(spec);
  const at::Tensor argmax_c = argmax != nullptr ? argmax->contiguous(memory_format) : at::Tensor();
  const BackwardCall call{spec,
                          grad.contiguous(memory_format),
                          rois.to(accumulate_dtype(grad.scalar_type())).contiguous(),
                          argmax != nullptr ? argmax_c.const_data_ptr<int32_t>() : nullptr,
                          batch,
                          pooled_h,
                          pooled_w,
                          sampling_ratio,
                          aligned};
  return at::globalContext().deterministicAlgorithms() ? backward_fixed_point(call)
                                                       : backward_atomic(call);
}

// roi_align_backward and roi_align_max_backward (given argmax): one map.
at::Tensor single_map_backward(const char* op, const at::Tensor& grad, const at::Tensor& rois,
                               double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                               int64_t batch, int64_t channels, int64_t height, int64_t width,
                               int64_t sampling_ratio, bool aligned,
                               const at::Tensor* argmax = nullptr) {
  check_roi_align_backward(op, grad, rois, spatial_scale, pooled_h, pooled_w, batch, channels,
                           height, width, sampling_ratio);
  if (argmax != nullptr) check_argmax(grad, *argmax);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  return pool_backward(grad, rois,
                       single_level_pyramid(channels, height, width, spatial_scale,
                                            use_channels_last(grad)),
                       pooled_h, pooled_w, batch, sampling_ratio, aligned, argmax)
      .front();
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                   int64_t batch, int64_t channels, int64_t height,
                                   int64_t width, int64_t sampling_ratio, bool aligned) {
  return single_map_backward("maskrcnn_ops::roi_align_backward", grad, rois, spatial_scale,
                             pooled_h, pooled_w, batch, channels, height, width, sampling_ratio,
                             aligned);
}

at::Tensor roi_align_max_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                       const at::Tensor& argmax, double spatial_scale,
                                       int64_t pooled_h, int64_t pooled_w, int64_t batch,
                                       int64_t channels, int64_t height, int64_t width,
                                       int64_t sampling_ratio, bool aligned) {
  return single_map_backward("maskrcnn_ops::roi_align_max_backward", grad, rois, spatial_scale,
                             pooled_h, pooled_w, batch, channels, height, width, sampling_ratio,
                             aligned, &argmax);
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
                       gradient_pyramid(grad, channels, heights, widths, spatial_scales,
                                        canonical_scale, canonical_level),
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
