// Exact greedy NMS on CUDA, plain and batched, with no host synchronization
// in the fixed-size form.
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
// 64-bit.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/box_iou.h"
#include "../common/dtypes.h"
#include "../common/nms_common.h"
#include "nms_kernels.cuh"

namespace maskrcnn_ops {
namespace {

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
  const int64_t words = (n + kBitsPerWord - 1) / kBitsPerWord;
  // The tile grid's y dimension is limited to 65535 blocks.
  TORCH_CHECK(words <= 65535, "maskrcnn_ops: CUDA NMS supports up to ", 65535 * kBitsPerWord,
              " boxes per call, got ", n);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto long_options = boxes.options().dtype(at::kLong);

  // Last sorted position of each box's segment: a reverse running minimum of
  // the segment ends (no host sync).
  at::Tensor is_end = at::ones_like(starts);
  is_end.narrow(0, 0, n - 1).copy_(starts.narrow(0, 1, n - 1));
  const at::Tensor ends = at::arange(n, long_options).masked_fill_(is_end.logical_not(), n);
  const at::Tensor seg_last = std::get<0>(ends.flip({0}).cummin(0)).flip({0}).contiguous();

  at::Tensor mask = at::empty({n, words}, long_options);
  at::Tensor keep_sorted = at::zeros({n}, boxes.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "batched_nms_cuda", [&] {
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
  keep.index_put_({order.by_segment}, keep_sorted);
  return {keep, order.by_score};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  using Ops = NmsOps<&batched_nms_keep_cuda_impl>;
  m.impl("nms", &Ops::nms);
  m.impl("batched_nms", &Ops::batched_nms);
  m.impl("batched_nms_keep", &Ops::batched_nms_keep);
}

}  // namespace maskrcnn_ops
