// Exact greedy NMS on CUDA, plain, batched and per row (nms_keep_rows), with
// no host synchronization in the fixed-size forms.
//
// 1. Sort (csrc/common/nms_common.h): by (image, class) segment, then by
//    decreasing score; each box learns the last position of its segment.
// 2. Mask kernel: 64x64 tiles of the upper triangle; bit j of word (i, w) is
//    set when box w*64+j (later in the order, same segment) has IoU > t with
//    box i. Tiles whose row and column boxes share no segment are skipped:
//    the reduction never reads them. IoU in float32 (float64 for double).
// 3. Reduction kernel: one block walks the boxes in order keeping a bitmask of
//    removed boxes (shared memory when it fits, global memory beyond), and
//    ORs the row of each kept box into it, up to its segment's end. Unlike
//    torchvision, the mask never goes to the host.
// Mask memory is N * ceil(N/64) * 8 bytes (as torchvision); all indexing is
// 64-bit. nms_keep_rows sorts within each row in step 1 and runs steps 2 and
// 3 over groups of whole rows, which bounds N per launch (nms_limits.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../common/box_iou.h"
#include "../common/dtypes.h"
#include "../common/nms_common.h"
#include "../common/nms_limits.h"
#include "nms_kernels.cuh"

namespace maskrcnn_ops {
namespace {

// Steps 2 and 3 for boxes already in processing order: sorted [n, 4] in the
// accumulation dtype, seg_last [n] the last position of each box's segment.
// Returns the keep flags in that order.
at::Tensor keep_sorted_cuda(const at::Tensor& sorted, const at::Tensor& seg_last,
                            double iou_threshold) {
  const int64_t n = sorted.size(0);
  const int64_t words = (n + kBitsPerWord - 1) / kBitsPerWord;
  // The tile grid's y dimension is limited to 65535 blocks.
  TORCH_CHECK(words <= 65535, "maskrcnn_ops: CUDA NMS supports up to ", 65535 * kBitsPerWord,
              " boxes per call, got ", n);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto long_options = sorted.options().dtype(at::kLong);
  at::Tensor mask = at::empty({n, words}, long_options);
  at::Tensor keep_sorted = at::zeros({n}, sorted.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(sorted.scalar_type(), "batched_nms_cuda", [&] {
    const dim3 blocks(static_cast<unsigned int>(words), static_cast<unsigned int>(words));
    nms_mask_kernel<scalar_t><<<blocks, kBitsPerWord, 0, stream>>>(
        sorted.const_data_ptr<scalar_t>(), seg_last.const_data_ptr<int64_t>(), n, words,
        threshold_as<scalar_t>(iou_threshold),
        reinterpret_cast<unsigned long long*>(mask.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor removed_global;
  size_t shared_bytes = 0;
  if (words <= kSharedRemovedWords) {
    shared_bytes = static_cast<size_t>(words) * sizeof(unsigned long long);
  } else {
    removed_global = at::empty({words}, long_options);
  }
  nms_reduce_kernel<<<1, kReduceThreads, shared_bytes, stream>>>(
      reinterpret_cast<const unsigned long long*>(mask.const_data_ptr<int64_t>()),
      seg_last.const_data_ptr<int64_t>(), n, words,
      removed_global.defined()
          ? reinterpret_cast<unsigned long long*>(removed_global.mutable_data_ptr<int64_t>())
          : nullptr,
      keep_sorted.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep_sorted;
}

NmsKeep batched_nms_keep_cuda_impl(const at::Tensor& boxes, const at::Tensor& scores,
                                   const c10::optional<at::Tensor>& idxs,
                                   const c10::optional<at::Tensor>& image_ids, double iou_threshold) {
  const c10::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t n = boxes.size(0);
  const NmsOrder order = make_nms_order(scores, idxs, image_ids);
  at::Tensor keep = at::zeros({n}, boxes.options().dtype(at::kBool));
  if (n == 0) return {keep, order.by_score};
  const at::Tensor starts = segment_starts(order.by_segment, idxs, image_ids);
  const auto acc_dtype = accumulate_dtype(boxes.scalar_type());
  const at::Tensor sorted = boxes.index_select(0, order.by_segment).to(acc_dtype).contiguous();
  const at::Tensor seg_last = segment_last(starts);

  keep.index_put_({order.by_segment}, keep_sorted_cuda(sorted, seg_last, iou_threshold));
  return {keep, order.by_score};
}

// nms_keep_rows: the rows of boxes [S, B, 4] are the segments. Whole rows go
// through steps 2 and 3 in groups of at most kNmsBoxesPerCall boxes (a row
// with more is a group of its own), which bounds the quadratic mask; the
// groups follow from the shapes alone, so there is no host sync. Step 1 is a
// sort of each row's scores.
at::Tensor nms_keep_rows_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                              double iou_threshold) {
  check_nms_rows_args("maskrcnn_ops::nms_keep_rows", boxes, scores, iou_threshold);
  const c10::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t rows = boxes.size(0), row_length = boxes.size(1);
  at::Tensor keep = at::zeros({rows, row_length}, boxes.options().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  const at::Tensor keep_flat = keep.view({-1});
  const auto long_options = boxes.options().dtype(at::kLong);
  const auto acc_dtype = accumulate_dtype(boxes.scalar_type());
  const int64_t rows_per_call = std::max<int64_t>(1, kNmsBoxesPerCall / row_length);
  for (int64_t first = 0; first < rows; first += rows_per_call) {
    const int64_t count = std::min(rows_per_call, rows - first);
    const int64_t n = count * row_length;
    // Each row by decreasing score, ties by index (NaN first, as torch.sort),
    // as flat positions into the group's boxes.
    const at::Tensor row_start = at::arange(count, long_options).mul_(row_length).unsqueeze(1);
    const at::Tensor by_score = std::get<1>(
        scores.narrow(0, first, count).sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
    const at::Tensor by_segment = by_score.add(row_start).view({-1});
    const at::Tensor sorted = boxes.narrow(0, first, count)
                                  .reshape({n, 4})
                                  .index_select(0, by_segment)
                                  .to(acc_dtype)
                                  .contiguous();
    const at::Tensor seg_last =
        row_start.add(row_length - 1).expand({count, row_length}).reshape({n});
    keep_flat.narrow(0, first * row_length, n)
        .index_put_({by_segment}, keep_sorted_cuda(sorted, seg_last, iou_threshold));
  }
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  using Ops = NmsOps<&batched_nms_keep_cuda_impl>;
  m.impl("nms", &Ops::nms);
  m.impl("batched_nms", &Ops::batched_nms);
  m.impl("batched_nms_keep", &Ops::batched_nms_keep);
  m.impl("nms_keep_rows", &nms_keep_rows_cuda);
}

}  // namespace maskrcnn_ops
