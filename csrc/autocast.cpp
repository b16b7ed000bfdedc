// Autocast policy for RoIAlign, the same for CPU and CUDA.
//
// torchvision's autocast kernel casts features and boxes to float32, runs, and
// casts the result back to the input's dtype. Our kernels already accumulate
// half types in float32 and read boxes in float32 whatever their dtype, so the
// policy here gives the same output dtype (the input's) without the two full
// copies of the feature map: run the op as it is, with autocast switched off
// below it, and never cast the boxes down (box coordinates in float16 would
// lose up to half a pixel at 1000 px).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace maskrcnn_ops {
namespace {

at::Tensor roi_align_autocast(const at::Tensor& input, const at::Tensor& rois,
                              double spatial_scale, c10::SymInt pooled_height,
                              c10::SymInt pooled_width, int64_t sampling_ratio,
                              bool aligned) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskrcnn_ops::roi_align", "")
                       .typed<decltype(roi_align_autocast)>();
  return op.call(input, rois, spatial_scale, std::move(pooled_height),
                 std::move(pooled_width), sampling_ratio, aligned);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, AutocastCPU, m) {
  m.impl("roi_align", &roi_align_autocast);
}

TORCH_LIBRARY_IMPL(maskrcnn_ops, AutocastCUDA, m) {
  m.impl("roi_align", &roi_align_autocast);
}

}  // namespace maskrcnn_ops
