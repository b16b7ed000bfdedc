// Exact greedy NMS on CPU, plain and batched (per class and per image).
//
// Boxes are walked by segment (image, class) and, inside a segment, by
// decreasing score. A box is kept iff no box kept before it has IoU above the
// threshold: instead of testing it against every later box (torchvision's
// O(N^2) loop), it is tested only against the kept boxes that could pass the
// threshold. Two boxes with IoU > t (0 < t < 1) have an area ratio above t,
// since inter <= min(areas) and union >= max(areas); so kept boxes are binned
// by log(area) with bins log(1/t) wide and a box looks at the bins next to
// its own only (two on each side, for rounding). Inside a bin, the IoU test
// runs over structure-of-arrays coordinates, branch-free and vectorized.
//
// Threads: independent segments run in parallel; a large segment (plain NMS)
// is processed in chunks whose boxes are tested against the already kept
// boxes in parallel, then resolved among themselves in order, which is exactly
// the sequential greedy result.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/box_iou.h"
#include "../common/nms_common.h"

namespace maskrcnn_ops {
namespace {

template <typename acc_t>
struct BoxSoA {
  std::vector<acc_t> x1, y1, x2, y2, area;

  void push(const acc_t* b, acc_t a) {
    x1.push_back(b[0]);
    y1.push_back(b[1]);
    x2.push_back(b[2]);
    y2.push_back(b[3]);
    area.push_back(a);
  }
  int64_t size() const { return static_cast<int64_t>(area.size()); }

  // Whether any box here has IoU > threshold with b. Branch-free inner loop
  // over blocks of 32 (vectorizable), leaving early between blocks.
  bool any_exceeds(const acc_t* b, acc_t b_area, acc_t threshold) const {
    const int64_t n = size();
    const acc_t *px1 = x1.data(), *py1 = y1.data(), *px2 = x2.data(), *py2 = y2.data(),
                *parea = area.data();
    const acc_t bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
    for (int64_t j0 = 0; j0 < n; j0 += 64) {
      const int64_t j1 = std::min<int64_t>(n, j0 + 64);
      int hit = 0;
#pragma omp simd reduction(| : hit)
      for (int64_t j = j0; j < j1; ++j)
        hit |= static_cast<int>(iou_exceeds(px1[j], py1[j], px2[j], py2[j], parea[j], bx1,
                                            by1, bx2, by2, b_area, threshold));
      if (hit) return true;
    }
    return false;
  }
};

// Kept boxes of one segment, binned by log(area) (see the file comment).
template <typename acc_t>
class KeptBoxes {
 public:
  KeptBoxes(acc_t threshold, double log_area_min, double log_area_max)
      : threshold_(threshold), log_min_(log_area_min) {
    constexpr int64_t kMaxBins = 4096;
    const double range = std::max(0.0, log_area_max - log_area_min);
    // Any width >= log(1/t) is a valid (coarser) pruning.
    width_ = std::max(-std::log(static_cast<double>(threshold)), range / kMaxBins);
    if (!(width_ > 0) || !std::isfinite(width_)) width_ = std::numeric_limits<double>::infinity();
    const int64_t bins = std::isfinite(width_) ? static_cast<int64_t>(range / width_) + 1 : 1;
    bins_.resize(std::max<int64_t>(1, bins));
  }

  int64_t bin_of(acc_t area) const {
    if (!std::isfinite(width_)) return 0;
    const double b = std::floor((std::log(static_cast<double>(area)) - log_min_) / width_);
    return std::clamp<int64_t>(static_cast<int64_t>(b), 0, static_cast<int64_t>(bins_.size()) - 1);
  }

  bool suppresses(const acc_t* box, acc_t area) const {
    const int64_t bin = bin_of(area);
    const int64_t lo = std::max<int64_t>(0, bin - 2);
    const int64_t hi = std::min<int64_t>(static_cast<int64_t>(bins_.size()) - 1, bin + 2);
    for (int64_t b = lo; b <= hi; ++b)
      if (bins_[b].any_exceeds(box, area, threshold_)) return true;
    return false;
  }

  void insert(const acc_t* box, acc_t area) { bins_[bin_of(area)].push(box, area); }

 private:
  acc_t threshold_;
  double log_min_;
  double width_;
  std::vector<BoxSoA<acc_t>> bins_;
};

// Greedy NMS of the sorted boxes [begin, end) of one segment; writes keep
// flags for those positions.
template <typename acc_t>
void nms_segment(const acc_t* boxes, int64_t begin, int64_t end, acc_t threshold,
                 bool parallel_inside, bool* keep) {
  const auto area_of = [&](int64_t i) {
    const acc_t* b = boxes + 4 * i;
    return box_area(b[0], b[1], b[2], b[3]);
  };
  if (threshold < acc_t(0)) {
    // IoU 0 already exceeds a negative threshold, so no pruning is exact:
    // test every kept box.
    BoxSoA<acc_t> kept;
    for (int64_t i = begin; i < end; ++i) {
      const acc_t a = area_of(i);
      keep[i] = !kept.any_exceeds(boxes + 4 * i, a, threshold);
      if (keep[i]) kept.push(boxes + 4 * i, a);
    }
    return;
  }
  // Boxes that cannot overlap are kept and never suppress (box_iou.h); with
  // t >= 1 no pair can pass, since IoU <= 1 for boxes of positive area.
  double log_min = std::numeric_limits<double>::infinity(), log_max = -log_min;
  for (int64_t i = begin; i < end; ++i) {
    const acc_t a = area_of(i);
    keep[i] = true;
    if (can_overlap(a)) {
      log_min = std::min(log_min, std::log(static_cast<double>(a)));
      log_max = std::max(log_max, std::log(static_cast<double>(a)));
    }
  }
  if (threshold >= acc_t(1) || !(log_min <= log_max)) return;

  KeptBoxes<acc_t> kept(threshold, log_min, log_max);
  if (!parallel_inside) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t a = area_of(i);
      if (!can_overlap(a)) continue;
      keep[i] = !kept.suppresses(boxes + 4 * i, a);
      if (keep[i]) kept.insert(boxes + 4 * i, a);
    }
    return;
  }
  constexpr int64_t kChunk = 512;
  std::vector<char> suppressed(kChunk);
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t c1 = std::min(end, c0 + kChunk);
    // Against the boxes kept by earlier chunks, in parallel.
    at::parallel_for(c0, c1, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t a = area_of(i);
        suppressed[i - c0] = can_overlap(a) && kept.suppresses(boxes + 4 * i, a);
      }
    });
    // Among the survivors of this chunk, in order.
    BoxSoA<acc_t> chunk_kept;
    for (int64_t i = c0; i < c1; ++i) {
      const acc_t a = area_of(i);
      if (!can_overlap(a)) continue;
      keep[i] = !suppressed[i - c0] && !chunk_kept.any_exceeds(boxes + 4 * i, a, threshold);
      if (keep[i]) chunk_kept.push(boxes + 4 * i, a);
    }
    for (int64_t j = 0; j < chunk_kept.size(); ++j) {
      const acc_t b[4] = {chunk_kept.x1[j], chunk_kept.y1[j], chunk_kept.x2[j], chunk_kept.y2[j]};
      kept.insert(b, chunk_kept.area[j]);
    }
  }
}

NmsKeep batched_nms_keep_cpu_impl(const at::Tensor& boxes, const at::Tensor& scores,
                                  const c10::optional<at::Tensor>& idxs,
                                  const c10::optional<at::Tensor>& image_ids,
                                  double iou_threshold) {
  const int64_t n = boxes.size(0);
  const NmsOrder order = make_nms_order(scores, idxs, image_ids);
  at::Tensor keep = at::zeros({n}, boxes.options().dtype(at::kBool));
  if (n == 0) return {keep, order.by_score};
  const at::Tensor starts = segment_starts(order.by_segment, idxs, image_ids);
  const bool* start = starts.const_data_ptr<bool>();
  std::vector<int64_t> bounds;  // segment boundaries in sorted positions
  for (int64_t i = 0; i < n; ++i)
    if (start[i]) bounds.push_back(i);
  bounds.push_back(n);
  const int64_t segments = static_cast<int64_t>(bounds.size()) - 1;

  at::Tensor keep_sorted = at::zeros({n}, boxes.options().dtype(at::kBool));
  const auto acc_dtype = boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor sorted = boxes.index_select(0, order.by_segment).to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "batched_nms_cpu", [&] {
    const scalar_t* b = sorted.const_data_ptr<scalar_t>();
    const auto t = threshold_as<scalar_t>(iou_threshold);
    bool* flags = keep_sorted.mutable_data_ptr<bool>();
    // Large segments get the threads inside; the others share them.
    constexpr int64_t kLarge = 4096;
    std::vector<int64_t> small;
    for (int64_t s = 0; s < segments; ++s) {
      if (bounds[s + 1] - bounds[s] >= kLarge)
        nms_segment<scalar_t>(b, bounds[s], bounds[s + 1], t, true, flags);
      else
        small.push_back(s);
    }
    at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k)
        nms_segment<scalar_t>(b, bounds[small[k]], bounds[small[k] + 1], t, false, flags);
    });
  });
  keep.index_put_({order.by_segment}, keep_sorted);
  return {keep, order.by_score};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  using Ops = NmsOps<&batched_nms_keep_cpu_impl>;
  m.impl("nms", &Ops::nms);
  m.impl("batched_nms", &Ops::batched_nms);
  m.impl("batched_nms_keep", &Ops::batched_nms_keep);
}

}  // namespace maskrcnn_ops
