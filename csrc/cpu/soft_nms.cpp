// Soft-NMS on CPU, plain and batched (per class, optionally per image).
//
// Soft-NMS is sequential within a segment: each step keeps the box of highest
// current score and decays every other box by its IoU with it
// (csrc/common/soft_nms.h), so a segment of m boxes with K kept costs
// O(m * K). The boxes in play are held as structure of arrays in index
// order, and a step is one branch-free pass over them that the compiler
// vectorizes (for SSE2 and AVX2, chosen at run time): overlap with the kept box (box_iou.h), decay (exp_nonpositive,
// the same bits as the CUDA kernel), removal of boxes that fall below the
// score threshold (their score becomes -inf) and the highest remaining score;
// then a scan for the first box with that score (the lowest index among
// equal scores). Boxes that left are dropped by a stable compaction once
// they are half of the arrays. A box leaves when its score is not >=
// score_threshold, which also drops a NaN score (and an infinite one times a
// weight of 0).
//
// Threads: segments are independent; they run in one parallel region in
// which threads take the largest remaining segment (as csrc/cpu/nms.cpp).
// A segment runs on one thread: its steps are short, and a barrier per step
// would stall whenever a core is shared with another process.
// The decay loop vectorizes only if g++ may evaluate FP operations that sit
// under a condition unconditionally (it turns selects into conditional
// products); -fno-trapping-math allows that and changes no value (round to
// nearest, no traps enabled), so this file's code is the same arithmetic.
#pragma GCC optimize("no-trapping-math")

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "../common/box_iou.h"
#include "../common/soft_nms.h"
#include "../common/soft_nms_ops.h"

namespace maskrcnn_ops {
namespace {

// The boxes of a segment still in play (and some that left, until the next
// compaction). Reused across the segments and calls a thread processes (a
// fresh large allocation costs a page fault per page, each call).
template <typename acc_t>
struct SoftNmsWorkspace {
  std::vector<acc_t> x1, y1, x2, y2, area, score;
  std::vector<int64_t> index;

  static SoftNmsWorkspace& of_this_thread() {
    thread_local SoftNmsWorkspace ws;
    return ws;
  }
  void resize(int64_t n) {
    for (auto* v : {&x1, &y1, &x2, &y2, &area, &score}) v->resize(n);
    index.resize(n);
  }
  void set(int64_t to, const acc_t* b, acc_t s, int64_t i) {
    x1[to] = b[0], y1[to] = b[1], x2[to] = b[2], y2[to] = b[3];
    area[to] = box_area(b[0], b[1], b[2], b[3]);
    score[to] = s;
    index[to] = i;
  }
  void move(int64_t from, int64_t to) {
    x1[to] = x1[from], y1[to] = y1[from], x2[to] = x2[from], y2[to] = y2[from];
    area[to] = area[from];
    score[to] = score[from];
    index[to] = index[from];
  }
  // Drops the boxes of [0, n) that left (score -inf), keeping the order.
  int64_t compact(int64_t n) {
    int64_t out = 0;
    for (int64_t j = 0; j < n; ++j)
      if (score[j] != -std::numeric_limits<acc_t>::infinity()) move(j, out++);
    return out;
  }
  // Released after a call on a segment larger than this many boxes.
  static constexpr size_t kKeepBoxes = size_t(1) << 16;
  void trim() {
    if (score.capacity() > kKeepBoxes) *this = SoftNmsWorkspace();
  }
};

// One step's decay of the boxes [0, n) by their overlap with box p (whose
// score is already -inf): a branch-free loop the compiler vectorizes (the
// method is a template argument, the exp is exp_nonpositive). A box that
// falls below the threshold, or had left (-inf times a weight, possibly
// NaN), gets -inf. Returns the highest score after the decay; `gone` counts
// the boxes at -inf.
template <SoftNmsMethod M, typename acc_t>
inline __attribute__((always_inline)) acc_t decay_step_body(
    SoftNmsWorkspace<acc_t>& ws, int64_t n, int64_t p, const SoftNmsDecay<acc_t>& decay,
    acc_t score_threshold, int64_t& gone) {
  const acc_t px1 = ws.x1[p], py1 = ws.y1[p], px2 = ws.x2[p], py2 = ws.y2[p], parea = ws.area[p];
  const acc_t *x1 = ws.x1.data(), *y1 = ws.y1.data(), *x2 = ws.x2.data(), *y2 = ws.y2.data(),
              *area = ws.area.data();
  acc_t* score = ws.score.data();
  constexpr acc_t kGone = -std::numeric_limits<acc_t>::infinity();
  acc_t best = kGone;
  int64_t count = 0;
#pragma omp simd reduction(max : best) reduction(+ : count)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t overlap = SoftNmsDecay<acc_t>::overlap(
        box_iou(x1[j], y1[j], x2[j], y2[j], area[j], px1, py1, px2, py2, parea));
    const acc_t s = score[j] * decay.template weight_of<M>(overlap);
    // Written so that g++ vectorizes it (one select, then plain max and sum).
    const bool stays = s >= score_threshold;
    const acc_t kept_score = stays ? s : kGone;
    score[j] = kept_score;
    best = kept_score > best ? kept_score : best;
    count += !stays;
  }
  gone = count;
  return best;
}

// decay_step_body compiled twice: for the baseline (SSE2) and with AVX2
// (twice the vector width), chosen at run time. Both are the same IEEE
// operations per element (no FMA: AVX2 alone does not enable it, and
// setup.py turns contraction off), so the results do not depend on the CPU.
template <SoftNmsMethod M, typename acc_t>
acc_t decay_step_baseline(SoftNmsWorkspace<acc_t>& ws, int64_t n, int64_t p,
                          const SoftNmsDecay<acc_t>& decay, acc_t score_threshold, int64_t& gone) {
  return decay_step_body<M>(ws, n, p, decay, score_threshold, gone);
}

template <SoftNmsMethod M, typename acc_t>
__attribute__((target("avx2"))) acc_t decay_step_avx2(SoftNmsWorkspace<acc_t>& ws, int64_t n,
                                                      int64_t p, const SoftNmsDecay<acc_t>& decay,
                                                      acc_t score_threshold, int64_t& gone) {
  return decay_step_body<M>(ws, n, p, decay, score_threshold, gone);
}

template <SoftNmsMethod M, typename acc_t>
acc_t decay_step(SoftNmsWorkspace<acc_t>& ws, int64_t n, int64_t p,
                 const SoftNmsDecay<acc_t>& decay, acc_t score_threshold, int64_t& gone) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2 ? decay_step_avx2<M>(ws, n, p, decay, score_threshold, gone)
              : decay_step_baseline<M>(ws, n, p, decay, score_threshold, gone);
}

// Soft-NMS of one segment: `members` (m indices into boxes [N, 4] and
// scores [N], acc_t, contiguous) in increasing order. Writes the kept
// indices and their decayed scores, in the order kept, to out_index and
// out_score (room for m each); returns how many. Each step: the first box
// with the highest score (the arrays are in index order, so the lowest
// index among equal scores) is kept and set to -inf, the others decay
// (decay_step); the arrays are compacted once half of them has left.
template <typename acc_t>
int64_t soft_nms_segment(const acc_t* boxes, const acc_t* scores, const int64_t* members,
                         int64_t m, const SoftNmsDecay<acc_t>& decay, acc_t score_threshold,
                         SoftNmsWorkspace<acc_t>& ws, int64_t* out_index, acc_t* out_score) {
  ws.resize(m);
  int64_t n = 0;
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < m; ++k) {
    const int64_t i = members[k];
    if (!(scores[i] >= score_threshold)) continue;  // below, or NaN
    ws.set(n++, boxes + 4 * i, scores[i], i);
    best = std::max(best, scores[i]);
  }
  int64_t kept = 0;
  while (n > 0 && best >= score_threshold) {
    int64_t p = 0;
    while (ws.score[p] != best) ++p;
    out_index[kept] = ws.index[p];
    out_score[kept] = best;
    ++kept;
    ws.score[p] = -std::numeric_limits<acc_t>::infinity();
    int64_t gone = 0;
    best = decay.method == SoftNmsMethod::kLinear
               ? decay_step<SoftNmsMethod::kLinear>(ws, n, p, decay, score_threshold, gone)
               : decay_step<SoftNmsMethod::kGaussian>(ws, n, p, decay, score_threshold, gone);
    if (2 * gone > n) n = ws.compact(n);
  }
  return kept;
}

// Boxes grouped by segment ((image_ids, idxs) pairs, image major), each
// segment in increasing index order: `members` and the segment bounds in it.
struct Segments {
  std::vector<int64_t> members;
  std::vector<int64_t> bounds;  // segment starts, then N
};

Segments group_segments(int64_t n, const c10::optional<at::Tensor>& idxs,
                        const c10::optional<at::Tensor>& image_ids) {
  Segments s;
  s.members.resize(n);
  std::iota(s.members.begin(), s.members.end(), int64_t(0));
  std::vector<at::Tensor> keys;  // int64, major key first
  for (const auto* key : {&image_ids, &idxs})
    if (key->has_value()) keys.push_back((*key)->to(at::kLong).contiguous());
  std::vector<const int64_t*> key_data;
  for (const auto& k : keys) key_data.push_back(k.const_data_ptr<int64_t>());
  const auto less = [&](int64_t a, int64_t b) {
    for (const int64_t* k : key_data)
      if (k[a] != k[b]) return k[a] < k[b];
    return false;
  };
  if (!key_data.empty()) std::stable_sort(s.members.begin(), s.members.end(), less);
  for (int64_t k = 0; k < n; ++k)
    if (k == 0 || less(s.members[k - 1], s.members[k])) s.bounds.push_back(k);
  s.bounds.push_back(n);
  return s;
}

// Calls with less work than this (the sum over segments of m^2, pairs of
// boxes tested at most) run on the calling thread: a parallel region costs
// more than it saves on a few milliseconds of work when a core is busy.
constexpr double kParallelMinWork = double(1 << 22);

std::tuple<at::Tensor, at::Tensor> soft_nms_cpu_impl(const at::Tensor& boxes,
                                                     const at::Tensor& scores,
                                                     const c10::optional<at::Tensor>& idxs,
                                                     const c10::optional<at::Tensor>& image_ids,
                                                     const SoftNmsParams& params) {
  const int64_t n = boxes.size(0);
  const auto long_options = boxes.options().dtype(at::kLong);
  if (n == 0) return {at::empty({0}, long_options), at::empty({0}, scores.options())};
  const Segments seg = group_segments(n, idxs, image_ids);
  const auto segments = static_cast<int64_t>(seg.bounds.size()) - 1;
  at::Tensor kept, kept_scores;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "soft_nms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Boxes and scores in acc_t, read through their strides.
    std::vector<acc_t> box(4 * n), score(n);
    const scalar_t* in_boxes = boxes.const_data_ptr<scalar_t>();
    const scalar_t* in_scores = scores.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = 0; c < 4; ++c)
        box[4 * i + c] = static_cast<acc_t>(in_boxes[i * boxes.stride(0) + c * boxes.stride(1)]);
      score[i] = static_cast<acc_t>(in_scores[i * scores.stride(0)]);
    }
    const SoftNmsDecay<acc_t> decay = params.template decay<acc_t>();
    const acc_t score_threshold = at_least_as<acc_t>(params.score_threshold);
    // Each segment's kept boxes go to the slice of its members' positions.
    std::vector<int64_t> out_index(n), counts(segments);
    std::vector<acc_t> out_score(n);
    const auto run = [&](int64_t s, SoftNmsWorkspace<acc_t>& ws) {
      const int64_t begin = seg.bounds[s];
      counts[s] = soft_nms_segment<acc_t>(box.data(), score.data(), seg.members.data() + begin,
                                          seg.bounds[s + 1] - begin, decay, score_threshold, ws,
                                          out_index.data() + begin, out_score.data() + begin);
    };
    double work = 0;
    for (int64_t s = 0; s < segments; ++s) {
      const auto m = static_cast<double>(seg.bounds[s + 1] - seg.bounds[s]);
      work += m * m;
    }
    if (segments < 2 || work < kParallelMinWork || at::get_num_threads() < 2 ||
        at::in_parallel_region()) {
      auto& ws = SoftNmsWorkspace<acc_t>::of_this_thread();
      for (int64_t s = 0; s < segments; ++s) run(s, ws);
      ws.trim();
    } else {
      std::vector<int64_t> by_size(segments);
      std::iota(by_size.begin(), by_size.end(), int64_t(0));
      std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t a, int64_t b) {
        return seg.bounds[a + 1] - seg.bounds[a] > seg.bounds[b + 1] - seg.bounds[b];
      });
      std::atomic<int64_t> next{0};
      at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
        auto& ws = SoftNmsWorkspace<acc_t>::of_this_thread();
        for (int64_t k; (k = next.fetch_add(1)) < segments;) run(by_size[k], ws);
        ws.trim();
      });
    }
    // The kept boxes of all segments, by decreasing decayed score, ties by
    // index. Each segment's are in that order already (a later pick never
    // scores higher, and an equal score would have been picked first at the
    // lower index); several segments are merged by a sort. Kept scores are
    // never NaN, so the order is strict.
    std::vector<std::pair<acc_t, int64_t>> order;
    for (int64_t s = 0; s < segments; ++s)
      for (int64_t k = seg.bounds[s]; k < seg.bounds[s] + counts[s]; ++k)
        order.emplace_back(out_score[k], out_index[k]);
    if (segments > 1) {
      std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
    }
    const auto count = static_cast<int64_t>(order.size());
    kept = at::empty({count}, long_options);
    kept_scores = at::empty({count}, scores.options());
    int64_t* kept_out = kept.mutable_data_ptr<int64_t>();
    scalar_t* score_out = kept_scores.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < count; ++k) {
      kept_out[k] = order[k].second;
      score_out[k] = static_cast<scalar_t>(order[k].first);
    }
  });
  return {kept, kept_scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  using Ops = SoftNmsOps<&soft_nms_cpu_impl>;
  m.impl("soft_nms", &Ops::soft_nms);
  m.impl("batched_soft_nms", &Ops::batched_soft_nms);
}

}  // namespace maskrcnn_ops
