// Soft-NMS on CUDA, plain and batched (per class, optionally per image).
//
// 1. Group: positions by (image, class) segment, index order within (stable
//    sorts of the labels), boxes and scores gathered in that order in the
//    accumulation dtype; each position learns its segment's last position.
// 2. soft_nms_kernel (soft_nms_kernels.cuh): one block per segment runs the
//    sequential algorithm, flagging kept positions and their decayed scores.
// 3. Order: the kept boxes by decreasing decayed score, ties by index (a
//    stable sort by score of the scores at the original positions); the one
//    host sync is for the output's size.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../common/dtypes.h"
#include "../common/nms_common.h"
#include "../common/soft_nms.h"
#include "../common/soft_nms_ops.h"
#include "launch.cuh"
#include "soft_nms_kernels.cuh"

namespace maskrcnn_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> soft_nms_cuda_impl(const at::Tensor& boxes,
                                                      const at::Tensor& scores,
                                                      const c10::optional<at::Tensor>& idxs,
                                                      const c10::optional<at::Tensor>& image_ids,
                                                      const SoftNmsParams& params) {
  const c10::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t n = boxes.size(0);
  const auto long_options = boxes.options().dtype(at::kLong);
  if (n == 0) return {at::empty({0}, long_options), at::empty({0}, scores.options())};

  // 1. Stable sorts by the minor key, then the major key: lexicographic
  // (image, class) order with the index order inside each segment.
  at::Tensor order = at::arange(n, long_options);
  for (const auto* key : {&idxs, &image_ids}) {
    if (!key->has_value()) continue;
    const at::Tensor k = (*key)->index_select(0, order);
    order = order.index_select(0, std::get<1>(k.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false)));
  }
  const at::Tensor seg_last = segment_last(segment_starts(order, idxs, image_ids));
  const auto acc_dtype = accumulate_dtype(boxes.scalar_type());
  const at::Tensor sorted_boxes = boxes.index_select(0, order).to(acc_dtype).contiguous();
  // A fresh copy (index_select allocates): the kernel's working scores.
  at::Tensor work = scores.index_select(0, order).to(acc_dtype).contiguous();
  at::Tensor kept_sorted = at::zeros({n}, boxes.options().dtype(at::kBool));
  at::Tensor kept_score = at::empty({n}, work.options());

  // 2.
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "soft_nms_cuda", [&] {
    launch_soft_nms<scalar_t>(current_stream_launch(), sorted_boxes.const_data_ptr<scalar_t>(),
                              work.mutable_data_ptr<scalar_t>(), seg_last.const_data_ptr<int64_t>(),
                              n, params.decay<scalar_t>(),
                              at_least_as<scalar_t>(params.score_threshold),
                              kept_score.mutable_data_ptr<scalar_t>(),
                              kept_sorted.mutable_data_ptr<bool>());
  });

  // 3. Decayed scores at the original positions, -inf where not kept (kept
  // scores are >= score_threshold >= 0).
  const double gone = -std::numeric_limits<double>::infinity();
  at::Tensor decayed = at::full({n}, gone, work.options());
  decayed.index_put_({order}, kept_score.masked_fill(kept_sorted.logical_not(), gone));
  at::Tensor keep = at::zeros({n}, kept_sorted.options());
  keep.index_put_({order}, kept_sorted);
  const at::Tensor by_score =
      std::get<1>(decayed.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor kept = by_score.masked_select(keep.index_select(0, by_score));
  return {kept, decayed.index_select(0, kept).to(scores.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  using Ops = SoftNmsOps<&soft_nms_cuda_impl>;
  m.impl("soft_nms", &Ops::soft_nms);
  m.impl("batched_soft_nms", &Ops::batched_soft_nms);
}

}  // namespace maskrcnn_ops
