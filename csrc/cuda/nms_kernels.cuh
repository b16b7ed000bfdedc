// The NMS CUDA kernels (the 64x64-tile IoU bitmask and the one-block
// reduction), free of ATen so that the same source also compiles as host C++
// under tests/cuda_emulation/, where an emulator runs each block's threads as
// real threads with a barrier for __syncthreads (the test suite compares them
// with the CPU kernels). The host code that sorts, allocates and launches
// lives in nms.cu.
#pragma once

#include <cstdint>

#include "../common/box_iou.h"
#include "../common/host_device.h"

// Dynamic shared memory, declared so that the emulator can supply its own.
#ifndef MRO_DYNAMIC_SHARED_ARRAY
#define MRO_DYNAMIC_SHARED_ARRAY(type, name) extern __shared__ type name[]
#endif

namespace maskrcnn_ops {
namespace {

constexpr int kBitsPerWord = 64;
constexpr int kReduceThreads = 1024;
constexpr int64_t kSharedRemovedWords = 48 * 1024 / 8;  // default dynamic shared limit

template <typename acc_t>
__global__ void nms_mask_kernel(const acc_t* __restrict__ boxes,
                                const int64_t* __restrict__ seg_last, int64_t n, int64_t words,
                                acc_t threshold, unsigned long long* __restrict__ mask) {
  const int lane = static_cast<int>(threadIdx.x);  // 0..63
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
  if (lane < cols) {
    const acc_t* b = boxes + (col0 + lane) * 4;
    tile[lane * 5 + 0] = b[0];
    tile[lane * 5 + 1] = b[1];
    tile[lane * 5 + 2] = b[2];
    tile[lane * 5 + 3] = b[3];
    tile[lane * 5 + 4] = box_area(b[0], b[1], b[2], b[3]);
  }
  __syncthreads();
  if (lane >= rows) return;
  const int64_t i = row0 + lane;
  const acc_t* a = boxes + i * 4;
  const acc_t area_a = box_area(a[0], a[1], a[2], a[3]);
  const int64_t last = seg_last[i];
  unsigned long long bits = 0;
  const int start = col_block == row_block ? lane + 1 : 0;
  for (int j = start; j < cols; ++j) {
    if (col0 + j > last) break;  // later boxes belong to other segments
    const acc_t* b = tile + j * 5;
    if (iou_exceeds(a[0], a[1], a[2], a[3], area_a, b[0], b[1], b[2], b[3], b[4], threshold))
      bits |= 1ULL << j;
  }
  mask[i * words + col_block] = bits;
}

__global__ void __launch_bounds__(kReduceThreads)
    nms_reduce_kernel(const unsigned long long* __restrict__ mask, const int64_t* __restrict__ seg_last,
                      int64_t n, int64_t words, unsigned long long* removed_global,
                      bool* __restrict__ keep_sorted) {
  MRO_DYNAMIC_SHARED_ARRAY(unsigned long long, removed_shared);
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

}  // namespace
}  // namespace maskrcnn_ops
