// The soft-NMS CUDA kernel and its launch sequence, free of ATen so that the
// same source also compiles as host C++ under tests/cuda_emulation/, where
// each block's threads run as real threads with a barrier for __syncthreads
// (the test suite compares it with the CPU kernel). The host code that
// groups, converts and orders lives in soft_nms.cu.
//
// One block per segment, which walks the sequential algorithm: each step a
// block-wide argmax (higher score, then lower position: positions are in
// index order within a segment) in shared memory, then every thread decays
// the boxes it owns (position = thread modulo the block size) by their
// overlap with the kept box and tracks its own best for the next step's
// argmax. A box is in play while its score is >= score_threshold (>= 0), so
// -inf marks boxes that left.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../common/box_iou.h"
#include "../common/host_device.h"
#include "../common/soft_nms.h"
#include "launch.cuh"

namespace maskrcnn_ops {
namespace {

// Threads per block: a power of two (the tree reduction), the size of the
// shared arrays. A launcher may run fewer (a power of two): the kernel loops
// over a segment in strides of blockDim.x.
constexpr int kSoftNmsThreads = 256;

template <typename acc_t>
MRO_HOST_DEVICE bool soft_nms_before(acc_t score, int64_t pos, acc_t best_score, int64_t best_pos) {
  return score > best_score || (score == best_score && pos < best_pos);
}

// boxes [n, 4] and scores [n] in acc_t, grouped by segment (index order
// within), seg_last [n] the last position of each one's segment. scores is
// the working copy (overwritten). For the kept boxes, sets kept[pos] (zeroed
// by the caller) and kept_score[pos], the score at the step that kept it.
template <typename acc_t>
__global__ void __launch_bounds__(kSoftNmsThreads)
    soft_nms_kernel(const acc_t* __restrict__ boxes, acc_t* __restrict__ scores,
                    const int64_t* __restrict__ seg_last, int64_t n, SoftNmsDecay<acc_t> decay,
                    acc_t score_threshold, acc_t* __restrict__ kept_score, bool* __restrict__ kept) {
  // Two buffers, used by alternate steps: a step's writes never meet a
  // thread still reading the previous step's result.
  __shared__ acc_t best_score[2][kSoftNmsThreads];
  __shared__ int64_t best_pos[2][kSoftNmsThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  const acc_t gone = -static_cast<acc_t>(INFINITY);
  for (int64_t begin = blockIdx.x; begin < n; begin += gridDim.x) {
    if (begin > 0 && seg_last[begin - 1] == seg_last[begin]) continue;  // not a segment's start
    const int64_t end = seg_last[begin] + 1;
    acc_t my_score = gone;
    int64_t my_pos = end;
    for (int64_t k = begin + tid; k < end; k += threads) {
      const acc_t s = scores[k];
      if (!(s >= score_threshold)) {  // below the threshold, or NaN
        scores[k] = gone;
      } else if (soft_nms_before(s, k, my_score, my_pos)) {
        my_score = s;
        my_pos = k;
      }
    }
    for (int buf = 0;; buf ^= 1) {
      best_score[buf][tid] = my_score;
      best_pos[buf][tid] = my_pos;
      __syncthreads();
      for (int half = threads / 2; half > 0; half /= 2) {
        if (tid < half && soft_nms_before(best_score[buf][tid + half], best_pos[buf][tid + half],
                                          best_score[buf][tid], best_pos[buf][tid])) {
          best_score[buf][tid] = best_score[buf][tid + half];
          best_pos[buf][tid] = best_pos[buf][tid + half];
        }
        __syncthreads();
      }
      const acc_t ps = best_score[buf][0];
      const int64_t p = best_pos[buf][0];
      if (!(ps >= score_threshold)) break;  // none left (the same for every thread)
      if (tid == 0) {
        kept[p] = true;
        kept_score[p] = ps;
      }
      const acc_t* b = boxes + 4 * p;
      const acc_t bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
      const acc_t b_area = box_area(bx1, by1, bx2, by2);
      my_score = gone;
      my_pos = end;
      for (int64_t k = begin + tid; k < end; k += threads) {
        acc_t s = scores[k];
        if (!(s >= score_threshold)) continue;  // left already
        if (k == p) {
          scores[k] = gone;
          continue;
        }
        const acc_t* a = boxes + 4 * k;
        const acc_t overlap = SoftNmsDecay<acc_t>::overlap(
            box_iou(a[0], a[1], a[2], a[3], box_area(a[0], a[1], a[2], a[3]), bx1, by1, bx2, by2,
                    b_area));
        if (overlap > acc_t(0)) {  // the weight of overlap 0 is 1
          s *= decay.weight(overlap);
          if (!(s >= score_threshold)) s = gone;
          scores[k] = s;
        }
        if (soft_nms_before(s, k, my_score, my_pos)) {
          my_score = s;
          my_pos = k;
        }
      }
    }
    __syncthreads();  // every thread has read the last result before the next segment
  }
}

// The launch: a block for every position, of which those that start a
// segment work (the segment count is not known on the host without a sync).
template <typename acc_t, typename Launch>
void launch_soft_nms(const Launch& launch, const acc_t* boxes, acc_t* scores, const int64_t* seg_last,
                     int64_t n, SoftNmsDecay<acc_t> decay, acc_t score_threshold, acc_t* kept_score,
                     bool* kept) {
  if (n == 0) return;  // a zero-size grid cannot launch
  const auto blocks = static_cast<unsigned int>(std::min<int64_t>(n, kMaxBlocks));
  launch(blocks, kSoftNmsThreads, soft_nms_kernel<acc_t>, boxes, scores, seg_last, n, decay,
         score_threshold, kept_score, kept);
}

}  // namespace
}  // namespace maskrcnn_ops
