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
#include "../common/nms_common.h"

namespace maskrcnn_ops {
namespace {

constexpr int kBitsPerWord = 64;
constexpr int kReduceThreads = 1024;
constexpr int64_t kSharedRemovedWords = 48 * 1024 / 8;  // default dynamic shared limit

template <typename acc_t>
__global__ void nms_mask_kernel(const acc_t* __restrict__ boxes,
                                const int64_t* __restrict__ seg_last, int64_t n, int64_t words,
                                acc_t threshold, unsigned long long* __restrict__ mask) {
  const int64_t row_block = blockIdx.y;
  const int64_t col_block = blockIdx.x;
  if (col_block < row_block) return;
  const int64_t row0 = row_block * kBitsPerWord, col0 = col_block * kBitsPerWord;
  const int rows = static_cast<int>(min_of<int64_t>(kBitsPerWord, n - row0));
  // No box of the row tile shares a segment with the column tile (segments
  // are contiguous, so the tile's last row reaches furthest).
  if (seg_last[row0 + rows - 1] < col0) return;
  const int cols = static_cast<int>(min_of<int64_t>(kBitsPerWord, n - col0));

  __shared__ acc_t tile[kBitsPerWord * 5];
  if (threadIdx.x < cols) {
    const acc_t* b = boxes + (col0 + threadIdx.x) * 4;
    tile[threadIdx.x * 5 + 0] = b[0];
    tile[threadIdx.x * 5 + 1] = b[1];
    tile[threadIdx.x * 5 + 2] = b[2];
    tile[threadIdx.x * 5 + 3] = b[3];
    tile[threadIdx.x * 5 + 4] = box_area(b[0], b[1], b[2], b[3]);
  }
  __syncthreads();
  if (threadIdx.x >= rows) return;
  const int64_t i = row0 + threadIdx.x;
  const acc_t* a = boxes + i * 4;
  const acc_t area_a = box_area(a[0], a[1], a[2], a[3]);
  const int64_t last = seg_last[i];
  unsigned long long bits = 0;
  const int start = col_block == row_block ? threadIdx.x + 1 : 0;
  for (int j = start; j < cols; ++j) {
    if (col0 + j > last) break;  // later boxes belong to other segments
    const acc_t* b = tile + j * 5;
    if (iou_exceeds(a[0], a[1], a[2], a[3], area_a, b[0], b[1], b[2], b[3], b[4], threshold))
      bits |= 1ULL << j;
  }
  mask[i * words + col_block] = bits;
}

__global__ void __launch_bounds__(kReduceThreads) nms_reduce_kernel(const unsigned long long* __restrict__ mask,
                                  const int64_t* __restrict__ seg_last, int64_t n, int64_t words,
                                  unsigned long long* removed_global, bool* __restrict__ keep_sorted) {
  extern __shared__ unsigned long long removed_shared[];
  unsigned long long* removed = removed_global != nullptr ? removed_global : removed_shared;
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) removed[w] = 0;
  __syncthreads();
  for (int64_t block = 0; block < words; ++block) {
    unsigned long long word = removed[block];  // every thread tracks its own copy
    const int64_t base = block * kBitsPerWord;
    const int bits = static_cast<int>(min_of<int64_t>(kBitsPerWord, n - base));
    for (int bit = 0; bit < bits; ++bit) {
      if (word & (1ULL << bit)) continue;
      const int64_t i = base + bit;
      if (threadIdx.x == 0) keep_sorted[i] = true;
      const unsigned long long* row = mask + i * words;
      word |= row[block];
      const int64_t last_word = seg_last[i] / kBitsPerWord;
      // Each later word is owned by one thread for this whole block, so the
      // ORs of successive kept boxes never race.
      for (int64_t w = block + 1 + threadIdx.x; w <= last_word; w += blockDim.x) removed[w] |= row[w];
    }
    __syncthreads();
  }
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
  const auto acc_dtype = boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
