// Exact greedy NMS on CPU, plain and batched (per class and per image), and
// per row of a fixed-size [S, B] layout (nms_keep_rows: each row a segment).
//
// Boxes are walked by segment (image, class) and, inside a segment, by
// decreasing score. A box is kept iff no box kept before it has IoU above the
// threshold t. torchvision tests each kept box against every later box
// (O(N^2)); here a box is tested only against the kept boxes that could pass
// t, which KeptGrid finds with two exact necessary conditions for IoU > t
// (0 < t < 1):
//
//  * the sides are within the ratio t: min(w)/max(w) > t and
//    min(h)/max(h) > t, since inter <= min(w) * min(h) and union >= the
//    larger area. So boxes are binned by log(width) and log(height), and a
//    box can only be suppressed by boxes of a few (width bin, height bin)
//    pairs around its own;
//  * the centres are close: the x intervals overlap by more than
//    t * max(w) (inter <= overlap_x * h and union >= w * h, for either box),
//    so |cx_a - cx_b| < (w_a + w_b) / 2 - t * max(w_a, w_b), and likewise in
//    y. So each pair has a grid of centres with cells of about that reach,
//    and a box visits the few cells around its own centre.
//
// A kept box is stored in the grid of every pair whose boxes it could
// suppress, so that a box looks in one grid only, its own pair's. With
// proposal-like boxes that is a few dozen candidates per box instead of
// thousands. Every candidate is tested with iou_exceeds (box_iou.h), so the
// result is the sequential greedy result exactly; the pruning only needs the
// two conditions to hold for the rounded IoU too, which they do with a
// margin (kThresholdMargin). A negative threshold (IoU 0 passes it) tests
// every kept box, and t >= 1 keeps everything (IoU <= 1).
//
// Threads: segments are independent and run in parallel, from one parallel
// region per call in which threads take the largest remaining segment. A
// segment runs on one thread: the grid makes it cheap, and a parallel scheme
// inside a segment needs a barrier per step of the greedy pass, each a stall
// when a core is shared with another process. For the same reason the call
// uses no ATen ops on N-sized tensors (a sort or masked_select of many boxes
// opens parallel regions of its own): the processing order comes from radix
// sorts here, and the outputs are written directly.
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/box_iou.h"
#include "../common/dtypes.h"
#include "../common/nms_common.h"
#include "isa.h"

namespace maskrcnn_ops {
namespace {

// Boxes as structure of arrays: the kept boxes a candidate is tested against.
// Each array has kLanes values past its size, so that any_exceeds reads
// whole blocks of kLanes.
template <typename acc_t>
struct BoxArrays {
  static constexpr int kLanes = 16;
  std::vector<acc_t> x1, y1, x2, y2, area;

  void resize(int64_t n) {
    for (auto* v : {&x1, &y1, &x2, &y2, &area}) v->resize(n + kLanes);
  }
  MASKRCNN_ALWAYS_INLINE void set(int64_t j, const acc_t* b, acc_t a) {
    x1[j] = b[0];
    y1[j] = b[1];
    x2[j] = b[2];
    y2[j] = b[3];
    area[j] = a;
  }

  // Whether any box of [begin, end) has IoU > threshold with b. In blocks
  // of kLanes boxes, the lanes past `end` masked off (their values are read
  // but not used): a fixed trip count, which compiles to whole vectors
  // (one with AVX-512) without a scalar remainder loop. A remainder cost
  // more than the vectors when most ranges are short (the grid's cells, or
  // the few boxes kept so far). Leaves at the first block with a hit.
  MASKRCNN_ALWAYS_INLINE bool any_exceeds(int64_t begin, int64_t end, const acc_t* b, acc_t b_area,
                                          acc_t threshold) const {
    const acc_t bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
    for (int64_t j0 = begin; j0 < end; j0 += kLanes) {
      const acc_t *px1 = x1.data() + j0, *py1 = y1.data() + j0, *px2 = x2.data() + j0,
                  *py2 = y2.data() + j0, *parea = area.data() + j0;
      // An int, so that the lane test is a 32-bit compare (SSE2 has no
      // 64-bit one, and the baseline copy would not be vectorized).
      const int live = static_cast<int>(std::min<int64_t>(end - j0, kLanes));
      int hit = 0;
#pragma omp simd reduction(| : hit)
      for (int j = 0; j < kLanes; ++j)
        hit |= static_cast<int>(j < live) &
               static_cast<int>(iou_exceeds(px1[j], py1[j], px2[j], py2[j], parea[j], bx1, by1,
                                            bx2, by2, b_area, threshold));
      if (hit) return true;
    }
    return false;
  }
};

// A monotone stand-in for log2 of a positive finite double (the exponent plus
// the mantissa's fraction; within 0.09 of log2). Binning only needs a
// monotone function: which bins a box visits is derived through the same
// function, so its error costs a little pruning, never a missed box.
MASKRCNN_ALWAYS_INLINE double fast_log2(double x) {
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const auto exponent = static_cast<int64_t>(bits >> 52) - 1023;
  const auto mantissa = static_cast<double>(bits & ((uint64_t(1) << 52) - 1));
  return static_cast<double>(exponent) + mantissa * 0x1p-52;
}

// The t of the pruning bounds. When the rounded IoU (box_iou.h, in acc_t
// with unit roundoff u) exceeds t, the bounds of the file comment hold for
// the exact sides and centres with t(1 - 8u): rounding is monotone, so the
// rounded intersection's sides are at most each box's rounded side and the
// rounded intersection at most the smaller rounded area; the union rounds to
// at least (1 - 3u) times the larger area; each step adds at most a relative
// u. So they hold with t(1 - kThresholdMargin), which leaves ample room for
// the rounding of the double arithmetic below too. That needs the areas in
// acc_t's normal range, which sides in SafeSides give; for other sides, and
// for t below kMinPruneThreshold (where the bounds prune little anyway), the
// pruning uses t = 0: IoU > t >= 0 still needs intersecting boxes.
constexpr double kThresholdMargin = 1e-4;
constexpr double kMinPruneThreshold = 1e-6;

template <typename acc_t>
struct SafeSides {
  static double lo() { return std::ldexp(1.0, std::numeric_limits<acc_t>::min_exponent * 2 / 5); }
  static double hi() { return std::ldexp(1.0, std::numeric_limits<acc_t>::max_exponent * 2 / 5); }
};

// Size bins are kBinScale * log2(1/t) wide (wider when the sizes span more
// than kMaxBins of them), so that the sizes within the ratio t of a box span
// about 2 bins per axis. Grid cells are kCellScale times the largest reach
// of the boxes looked up there, so that a box visits at most 3 x 3 cells
// (mostly fewer), with at most kCellsPerBox cells per box stored in the grid
// (coarser cells for sparse boxes). Chosen by measuring proposal-like boxes;
// any values give the same result.
constexpr double kBinScale = 2.0;
constexpr double kCellScale = 1.0;
constexpr int64_t kMaxBins = 64;
constexpr double kCellsPerBox = 2.0;

// The largest |centre distance| a box of side s can have with an overlapping
// box of side in [lo, hi] (one axis): max over b of (s + b) / 2 - t max(s, b),
// piecewise linear in b with its kink at s. Written without a lambda or
// std::max({...}): those stay out-of-line calls, compiled once for the
// baseline, and called from the vector copies of the greedy pass they made
// it 3x slower (isa.h).
MASKRCNN_ALWAYS_INLINE double reach_to(double s, double b, double t) {
  return 0.5 * (s + b) - t * (s < b ? b : s);
}
MASKRCNN_ALWAYS_INLINE double reach(double s, double lo, double hi, double t) {
  const double at_lo = reach_to(s, lo, t), at_hi = reach_to(s, hi, t);
  const double at_s = reach_to(s, s < lo ? lo : (hi < s ? hi : s), t);
  const double most = at_lo < at_hi ? at_hi : at_lo;
  return most < at_s ? at_s : most;
}

// The grid cell of value v on an axis starting at lo, at most top: the
// truncation of (v - lo) / cell, a monotone function of v, the same for
// stored boxes and for the ends of visited ranges, so a centre inside a
// range falls in a cell inside the range's cells. Negative values (only
// range ends) and NaN (0 * inf, in degenerate grids) give cell 0.
MASKRCNN_ALWAYS_INLINE int64_t cell_index(double v, double lo, double inv_cell, int64_t top) {
  const double c = (v - lo) * inv_cell;
  return c > 0 ? static_cast<int64_t>(std::min(c, static_cast<double>(top))) : 0;
}

// Extents of a set of boxes' sides and centres.
struct Extents {
  double w_lo = std::numeric_limits<double>::infinity(), w_hi = -w_lo;
  double h_lo = w_lo, h_hi = -w_lo, cx_lo = w_lo, cx_hi = -w_lo, cy_lo = w_lo, cy_hi = -w_lo;

  void add(double w, double h, double cx, double cy) {
    w_lo = std::min(w_lo, w), w_hi = std::max(w_hi, w);
    h_lo = std::min(h_lo, h), h_hi = std::max(h_hi, h);
    cx_lo = std::min(cx_lo, cx), cx_hi = std::max(cx_hi, cx);
    cy_lo = std::min(cy_lo, cy), cy_hi = std::max(cy_hi, cy);
  }
  void add(const Extents& o) {
    add(o.w_lo, o.h_lo, o.cx_lo, o.cy_lo);
    add(o.w_hi, o.h_hi, o.cx_hi, o.cy_hi);
  }
};

// The grid of one (width bin, height bin) pair: the kept boxes its members
// are tested against, by centre cell.
struct PairGrid {
  int64_t members = 0;  // boxes of the segment in this pair
  Extents own;          // of the members
  Extents candidates;   // of the boxes that may be stored here (a superset)
  double inv_cell_x = 0, inv_cell_y = 0;
  int64_t nx = 1, ny = 1, first_cell = 0;

  int64_t cell_of(double cx, double cy) const {
    return first_cell + cell_index(cy, candidates.cy_lo, inv_cell_y, ny - 1) * nx +
           cell_index(cx, candidates.cx_lo, inv_cell_x, nx - 1);
  }
};

// Kept boxes of one segment for a threshold in [0, 1), for the lookups of
// the greedy pass (see the file comment). Each box is tested against one
// grid, that of its own (width bin, height bin) pair, in the cells within
// its reach; a kept box is stored in the grid of every pair whose boxes its
// size could suppress (about 2 x 2 pairs). The boxes that will be looked up
// and stored are all known up front, so every cell gets a fixed slice of
// one array and kept boxes are appended to their cells' slices.
template <typename acc_t>
class KeptGrid {
 public:
  // The member boxes (positions into `boxes`, each a box that can overlap:
  // finite positive area, x2 > x1) in processing order.
  void build(const acc_t* boxes, const std::vector<int64_t>& members, acc_t threshold) {
    boxes_ = boxes;
    members_ = &members;
    threshold_ = threshold;
    const int64_t m = static_cast<int64_t>(members.size());
    for (auto* v : {&cx_, &cy_, &w_, &h_}) v->resize(m);
    area_.resize(m);
    bool safe = true;
    const double side_lo = SafeSides<acc_t>::lo(), side_hi = SafeSides<acc_t>::hi();
    for (int64_t j = 0; j < m; ++j) {
      const acc_t* b = boxes + 4 * members[j];
      const double x1 = b[0], y1 = b[1], x2 = b[2], y2 = b[3];
      w_[j] = x2 - x1;
      h_[j] = y2 - y1;
      cx_[j] = 0.5 * (x1 + x2);
      cy_[j] = 0.5 * (y1 + y2);
      area_[j] = box_area(b[0], b[1], b[2], b[3]);
      safe = safe && w_[j] >= side_lo && w_[j] <= side_hi && h_[j] >= side_lo && h_[j] <= side_hi;
    }
    const double t = static_cast<double>(threshold);
    t_ = safe && t >= kMinPruneThreshold ? t * (1 - kThresholdMargin) : 0.0;
    inv_t_ = t_ > 0 ? 1 / t_ : 0.0;

    // Size bins (one when t is 0: any sizes can overlap).
    const auto axis_bins = [&](const std::vector<double>& s, double& lo, double& inv_width) {
      if (t_ == 0.0) return int64_t(1);
      lo = std::numeric_limits<double>::infinity();
      double hi = -lo;
      for (int64_t j = 0; j < m; ++j) {
        lo = std::min(lo, fast_log2(s[j]));
        hi = std::max(hi, fast_log2(s[j]));
      }
      const double width = std::max(kBinScale * -std::log2(t_), (hi - lo) / (kMaxBins - 1));
      inv_width = 1 / width;
      return std::min<int64_t>(kMaxBins, static_cast<int64_t>((hi - lo) * inv_width) + 1);
    };
    nbw_ = axis_bins(w_, lw_lo_, inv_bw_);
    nbh_ = axis_bins(h_, lh_lo_, inv_bh_);

    // Members by pair, and how far (in bins) a box's reach of sizes goes.
    grids_.assign(nbw_ * nbh_, PairGrid{});
    pair_.resize(m);
    range_.resize(m);
    int64_t dw = 0, dh = 0;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t kw = bin_w(w_[j]), kh = bin_h(h_[j]);
      const SizeRange r = range_[j] = size_range(j);
      dw = std::max({dw, kw - r.kw0, r.kw1 - kw});
      dh = std::max({dh, kh - r.kh0, r.kh1 - kh});
      pair_[j] = kh * nbw_ + kw;
      PairGrid& g = grids_[pair_[j]];
      ++g.members;
      g.own.add(w_[j], h_[j], cx_[j], cy_[j]);
    }

    // Each pair's grid: the boxes stored there come from pairs at most
    // (dw, dh) bins away, whose extents bound the candidates'. Cells of
    // kCellScale times the largest reach (1 - t) max(w) of a member, coarser
    // where that would make more than kCellsPerBox cells per stored box.
    int64_t cells = 0;
    for (int64_t kh = 0; kh < nbh_; ++kh) {
      for (int64_t kw = 0; kw < nbw_; ++kw) {
        PairGrid& g = grids_[kh * nbw_ + kw];
        if (g.members == 0) continue;
        int64_t stored = 0;
        for (int64_t h = std::max<int64_t>(0, kh - dh); h <= std::min(nbh_ - 1, kh + dh); ++h)
          for (int64_t w = std::max<int64_t>(0, kw - dw); w <= std::min(nbw_ - 1, kw + dw); ++w)
            if (const PairGrid& o = grids_[h * nbw_ + w]; o.members > 0) {
              g.candidates.add(o.own);
              stored += o.members;
            }
        const Extents& c = g.candidates;
        double cell_x = kCellScale * (1 - t_) * c.w_hi, cell_y = kCellScale * (1 - t_) * c.h_hi;
        const double span_x = c.cx_hi - c.cx_lo, span_y = c.cy_hi - c.cy_lo;
        const double max_cells = kCellsPerBox * static_cast<double>(stored) + 1;
        for (int grow_steps = 0;; ++grow_steps) {
          const double cells_xy =
              (std::floor(span_x / cell_x) + 1) * (std::floor(span_y / cell_y) + 1);
          if (cells_xy <= max_cells) break;
          if (grow_steps == 64) {
            cell_x = cell_y = std::numeric_limits<double>::infinity();
            break;
          }
          const double grow = std::sqrt(cells_xy / max_cells);
          cell_x *= std::max(1.25, grow);
          cell_y *= std::max(1.25, grow);
        }
        // The cell counts again with cell_index's arithmetic, so that no
        // stored centre is past the last cell. A cell size that does not
        // invert (0 or infinite, for extreme sides): one cell on that axis.
        g.inv_cell_x = 1 / cell_x;
        g.inv_cell_y = 1 / cell_y;
        if (!(std::isfinite(g.inv_cell_x) && g.inv_cell_x > 0)) g.inv_cell_x = 0;
        if (!(std::isfinite(g.inv_cell_y) && g.inv_cell_y > 0)) g.inv_cell_y = 0;
        constexpr int64_t kNoTop = int64_t(1) << 52;
        g.nx = cell_index(c.cx_hi, c.cx_lo, g.inv_cell_x, kNoTop) + 1;
        g.ny = cell_index(c.cy_hi, c.cy_lo, g.inv_cell_y, kNoTop) + 1;
        g.first_cell = cells;
        cells += g.nx * g.ny;
      }
    }

    // The cells where each member is stored if kept: in the grid of each
    // pair (with members) whose sizes are within the ratio t of its own.
    // Each cell's slice of the kept arrays: a counting sort of them.
    cell_start_.assign(cells + 1, 0);
    store_begin_.resize(m + 1);
    store_cells_.clear();
    for (int64_t j = 0; j < m; ++j) {
      store_begin_[j] = static_cast<int64_t>(store_cells_.size());
      const SizeRange& r = range_[j];
      for (int64_t kh = r.kh0; kh <= r.kh1; ++kh)
        for (int64_t kw = r.kw0; kw <= r.kw1; ++kw)
          if (const PairGrid& g = grids_[kh * nbw_ + kw]; g.members > 0) {
            const int64_t cell = g.cell_of(cx_[j], cy_[j]);
            store_cells_.push_back(cell);
            ++cell_start_[cell + 1];
          }
    }
    store_begin_[m] = static_cast<int64_t>(store_cells_.size());
    std::partial_sum(cell_start_.begin(), cell_start_.end(), cell_start_.begin());
    cell_kept_.assign(cells, 0);
    kept_.resize(cell_start_[cells]);
  }

  // Greedy step for member j: false if a kept box suppresses it, else it is
  // kept (and stored) and true.
  MASKRCNN_ALWAYS_INLINE bool keep(int64_t j) {
    const acc_t* b = boxes_ + 4 * (*members_)[j];
    if (suppressed(j, b)) return false;
    for (int64_t k = store_begin_[j]; k < store_begin_[j + 1]; ++k) {
      const int64_t cell = store_cells_[k];
      kept_.set(cell_start_[cell] + cell_kept_[cell]++, b, area_[j]);
    }
    return true;
  }

 private:
  int64_t bin_w(double w) const { return bin(w, lw_lo_, inv_bw_, nbw_); }
  int64_t bin_h(double h) const { return bin(h, lh_lo_, inv_bh_, nbh_); }
  static int64_t bin(double s, double lo, double inv_width, int64_t bins) {
    if (bins == 1) return 0;
    const double b = (fast_log2(s) - lo) * inv_width;
    return b > 0 ? static_cast<int64_t>(std::min(b, static_cast<double>(bins - 1))) : 0;
  }

  // The bins of the sizes within the ratio t of member j's: the same
  // monotone binning applied to the interval's ends.
  struct SizeRange {
    int32_t kw0, kw1, kh0, kh1;
  };
  SizeRange size_range(int64_t j) const {
    if (t_ == 0.0) return {0, 0, 0, 0};
    return {static_cast<int32_t>(bin_w(w_[j] * t_)), static_cast<int32_t>(bin_w(w_[j] * inv_t_)),
            static_cast<int32_t>(bin_h(h_[j] * t_)), static_cast<int32_t>(bin_h(h_[j] * inv_t_))};
  }

  // The cells [first, last] of an axis of n cells that a centre c with
  // reach r visits; false when there are none. (A NaN end visits every cell.)
  static MASKRCNN_ALWAYS_INLINE bool cell_range(double c, double r, double lo, double inv_cell,
                                                int64_t n, int64_t& first, int64_t& last) {
    const double z = (c + r - lo) * inv_cell;
    if (z < 0) return false;  // every stored centre is >= lo
    first = cell_index(c - r, lo, inv_cell, n);
    last = z < static_cast<double>(n - 1) ? static_cast<int64_t>(z) : n - 1;
    return first <= last;
  }

  MASKRCNN_ALWAYS_INLINE bool suppressed(int64_t j, const acc_t* b) const {
    const double w = w_[j], h = h_[j], cx = cx_[j], cy = cy_[j];
    const PairGrid& g = grids_[pair_[j]];
    const Extents& c = g.candidates;
    // Reach with slack for the rounding of centres and sides in double
    // (relative to the coordinates' magnitude).
    const double rx =
        reach(w, c.w_lo, c.w_hi, t_) * (1 + 1e-6) + 0x1p-40 * (std::abs(cx) + w + c.w_hi);
    const double ry =
        reach(h, c.h_lo, c.h_hi, t_) * (1 + 1e-6) + 0x1p-40 * (std::abs(cy) + h + c.h_hi);
    int64_t x0, x1, y0, y1;
    if (!cell_range(cx, rx, c.cx_lo, g.inv_cell_x, g.nx, x0, x1) ||
        !cell_range(cy, ry, c.cy_lo, g.inv_cell_y, g.ny, y0, y1))
      return false;
    const acc_t area = area_[j];
    for (int64_t gy = y0; gy <= y1; ++gy) {
      const int64_t row = g.first_cell + gy * g.nx;
      for (int64_t cell = row + x0; cell <= row + x1; ++cell) {
        if (cell_kept_[cell] != 0 &&
            kept_.any_exceeds(cell_start_[cell], cell_start_[cell] + cell_kept_[cell], b, area,
                              threshold_))
          return true;
      }
    }
    return false;
  }

  const acc_t* boxes_ = nullptr;
  const std::vector<int64_t>* members_ = nullptr;
  acc_t threshold_ = 0;
  double t_ = 0, inv_t_ = 0;  // the t of the pruning bounds (see kThresholdMargin)
  // Per member: centre and sides (double), area (acc_t), bin pair.
  std::vector<double> cx_, cy_, w_, h_;
  std::vector<acc_t> area_;
  std::vector<int64_t> pair_;
  std::vector<SizeRange> range_;
  std::vector<int64_t> store_begin_, store_cells_;  // per member: cells it is stored in if kept
  double lw_lo_ = 0, inv_bw_ = 0, lh_lo_ = 0, inv_bh_ = 0;
  int64_t nbw_ = 1, nbh_ = 1;
  std::vector<PairGrid> grids_;
  std::vector<int64_t> cell_start_, cell_kept_;
  BoxArrays<acc_t> kept_;
};

// Below this many boxes that can overlap, a segment tests each box against
// all kept boxes: cheaper than building a grid, with any instruction set
// (measured: benchmarks/results/cpu-2026-12-01-nms/notes.md).
constexpr int64_t kGridMinBoxes = 512;

// Buffers reused across the segments and the calls a thread processes
// (fresh large allocations cost a page fault per page, each call), released
// after a call on segments larger than kWorkspaceKeepBoxes.
template <typename acc_t>
struct Workspace {
  std::vector<int64_t> members;
  BoxArrays<acc_t> kept;
  KeptGrid<acc_t> grid;

  static constexpr size_t kWorkspaceKeepBoxes = size_t(1) << 16;

  static Workspace& of_this_thread() {
    thread_local Workspace ws;
    return ws;
  }
  void trim() {
    if (members.capacity() > kWorkspaceKeepBoxes || kept.area.capacity() > kWorkspaceKeepBoxes)
      *this = Workspace();
  }
};

// Greedy NMS of the sorted boxes [begin, end) of one segment; writes keep
// flags for those positions. A Body of run_for_isa (isa.h), so that the IoU
// tests of any_exceeds, the hot loop, fill the CPU's widest vectors.
template <typename acc_t>
struct NmsSegment {
  static MASKRCNN_ALWAYS_INLINE void run(const acc_t* boxes, int64_t begin, int64_t end,
                                         acc_t threshold, Workspace<acc_t>& ws, bool* keep) {
    const auto area_of = [&](int64_t i) {
      const acc_t* b = boxes + 4 * i;
      return box_area(b[0], b[1], b[2], b[3]);
    };
    if (threshold < acc_t(0)) {
      // IoU 0 already exceeds a negative threshold, so no pruning is exact:
      // test every kept box.
      ws.kept.resize(end - begin);
      int64_t kept = 0;
      for (int64_t i = begin; i < end; ++i) {
        const acc_t a = area_of(i);
        keep[i] = !ws.kept.any_exceeds(0, kept, boxes + 4 * i, a, threshold);
        if (keep[i]) ws.kept.set(kept++, boxes + 4 * i, a);
      }
      return;
    }
    // For t >= 0 only boxes of finite positive area overlap anything
    // (box_iou.h), and of those only boxes with x2 > x1 (hence y2 > y1): an
    // inverted box has an empty intersection with every box. The others are
    // kept and never suppress. With t >= 1 no pair passes (IoU <= 1).
    ws.members.clear();
    for (int64_t i = begin; i < end; ++i) {
      keep[i] = true;
      if (can_overlap(area_of(i)) && boxes[4 * i + 2] > boxes[4 * i]) ws.members.push_back(i);
    }
    const auto m = static_cast<int64_t>(ws.members.size());
    if (threshold >= acc_t(1) || m < 2) return;
    if (m < kGridMinBoxes) {
      ws.kept.resize(m);
      int64_t kept = 0;
      for (const int64_t i : ws.members) {
        const acc_t a = area_of(i);
        keep[i] = !ws.kept.any_exceeds(0, kept, boxes + 4 * i, a, threshold);
        if (keep[i]) ws.kept.set(kept++, boxes + 4 * i, a);
      }
      return;
    }
    ws.grid.build(boxes, ws.members, threshold);
    for (int64_t j = 0; j < m; ++j) keep[ws.members[j]] = ws.grid.keep(j);
  }
};

// ------------------------------------------------------------------ order --
//
// make_nms_order's processing order (nms_common.h), without ATen ops (a sort
// of many boxes opens parallel regions of its own): stable LSD radix sorts,
// first by score, then by idx, then by image_id.

// Sorts (key, value) pairs by key, ascending and stably: 11-bit digits,
// skipping the digits that all keys share.
template <typename key_t>
void radix_sort(std::vector<key_t>& keys, std::vector<int64_t>& values) {
  constexpr int kBits = 11;
  constexpr key_t kMask = (key_t(1) << kBits) - 1;
  constexpr int kDigits = (8 * static_cast<int>(sizeof(key_t)) + kBits - 1) / kBits;
  const auto n = static_cast<int64_t>(keys.size());
  if (n < 2) return;
  std::vector<int64_t> counts(kDigits << kBits, 0);
  for (const key_t k : keys)
    for (int d = 0; d < kDigits; ++d) ++counts[(d << kBits) + ((k >> (d * kBits)) & kMask)];
  std::vector<key_t> keys_out(n);
  std::vector<int64_t> values_out(n);
  for (int d = 0; d < kDigits; ++d) {
    int64_t* count = counts.data() + (d << kBits);
    if (count[(keys[0] >> (d * kBits)) & kMask] == n) continue;
    int64_t sum = 0;
    for (int b = 0; b <= static_cast<int>(kMask); ++b) sum += std::exchange(count[b], sum);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t to = count[(keys[i] >> (d * kBits)) & kMask]++;
      keys_out[to] = keys[i];
      values_out[to] = values[i];
    }
    keys.swap(keys_out);
    values.swap(values_out);
  }
}

// Keys whose ascending order is torch.sort(descending=True)'s order of the
// scores: NaN first (all NaNs equal), then +inf down to -inf, with -0.0
// equal to +0.0 (ties keep the index order).
template <typename float_t, typename key_t>
key_t descending_key(float_t x) {
  static_assert(sizeof(float_t) == sizeof(key_t));
  if (std::isnan(x)) return 0;
  if (x == float_t(0)) x = float_t(0);
  key_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  constexpr key_t kSign = key_t(1) << (8 * sizeof(key_t) - 1);
  const key_t ascending = (bits & kSign) ? ~bits : (bits | kSign);
  return ~ascending;  // never 0: that would be the bits of a NaN
}

struct CpuNmsOrder {
  std::vector<int64_t> by_score;    // indices by decreasing score, ties by index
  std::vector<int64_t> by_segment;  // the same, grouped stably by segment
  std::vector<int64_t> bounds;      // segment starts in by_segment, then N
};

// Where the box or score of flat index i lives in a tensor whose leading
// dims are [N] (one row) or [S, B] (rows of B, i = row * B + column), read
// with its strides: the op's inputs are never copied to a contiguous layout.
class FlatIndex {
 public:
  FlatIndex(const at::Tensor& t, int64_t leading_dims) {
    if (leading_dims == 1) {
      stride_ = t.stride(0);
      return;
    }
    row_length_ = std::max<int64_t>(1, t.size(1));
    row_stride_ = t.stride(0);
    stride_ = t.stride(1);
    flat_ = t.size(0) <= 1 || t.stride(0) == t.size(1) * t.stride(1);
  }
  int64_t operator()(int64_t i) const {
    return flat_ ? i * stride_ : (i / row_length_) * row_stride_ + (i % row_length_) * stride_;
  }

 private:
  bool flat_ = true;  // offset i * stride_
  int64_t row_length_ = 1, row_stride_ = 0, stride_ = 0;
};

// Keys of a 1-d integer tensor's labels (read with its stride) whose
// unsigned order is the labels' order.
std::vector<uint64_t> label_keys(const at::Tensor& t) {
  std::vector<uint64_t> keys(t.size(0));
  AT_DISPATCH_V2(t.scalar_type(), "nms_labels", AT_WRAP([&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    constexpr uint64_t kFlip = std::is_signed_v<scalar_t> ? uint64_t(1) << 63 : 0;
    for (int64_t i = 0; i < t.size(0); ++i)
      keys[i] = static_cast<uint64_t>(static_cast<int64_t>(p[i * t.stride(0)])) ^ kFlip;
  }), AT_EXPAND(AT_INTEGRAL_TYPES_V2));
  return keys;
}

// The order of the scores (flat indices, read through `offset`), grouped by the
// segment keys `labels` (one key per box in each, the major key last).
CpuNmsOrder cpu_nms_order(const at::Tensor& scores, const FlatIndex& offset,
                          const std::vector<std::vector<uint64_t>>& labels) {
  const int64_t n = scores.numel();
  CpuNmsOrder order;
  order.by_score.resize(n);
  std::iota(order.by_score.begin(), order.by_score.end(), 0);
  const auto sort_by_score = [&](auto key_type, auto read) {
    using key_t = decltype(key_type);
    std::vector<key_t> keys(n);
    for (int64_t i = 0; i < n; ++i) keys[i] = read(i);
    radix_sort(keys, order.by_score);
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "nms_order", [&] {
    const scalar_t* p = scores.const_data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, double>) {
      sort_by_score(uint64_t(),
                    [&](int64_t i) { return descending_key<double, uint64_t>(p[offset(i)]); });
    } else {
      // float, and half types (exactly representable as float).
      sort_by_score(uint32_t(), [&](int64_t i) {
        return descending_key<float, uint32_t>(static_cast<float>(p[offset(i)]));
      });
    }
  });
  order.by_segment = order.by_score;
  for (const auto& label : labels) {
    std::vector<uint64_t> keys(n);
    for (int64_t k = 0; k < n; ++k) keys[k] = label[order.by_segment[k]];
    radix_sort(keys, order.by_segment);
  }
  for (int64_t k = 0; k < n; ++k) {
    const bool starts = k == 0 || std::any_of(labels.begin(), labels.end(), [&](const auto& label) {
      return label[order.by_segment[k]] != label[order.by_segment[k - 1]];
    });
    if (starts) order.bounds.push_back(k);
  }
  order.bounds.push_back(n);
  return order;
}

// Calls with fewer boxes than this run on the calling thread. When one of
// its threads shares a core with another process, a parallel region ends
// only once the scheduler has given that thread its turn, which can take a
// time slice or two: more than the threads save on fewer boxes
// (benchmarks/nms_under_load.py --classes 80 --boxes 20000 shows it).
constexpr int64_t kParallelMinBoxes = 32768;

// The greedy pass over every segment of `order`: keep flags in processing
// order. boxes [N, 4] or [S, B, 4] (box i at `offset(i)`).
std::vector<char> keep_in_order(const at::Tensor& boxes, const FlatIndex& offset,
                                const CpuNmsOrder& order, double iou_threshold) {
  const auto n = static_cast<int64_t>(order.by_segment.size());
  const std::vector<int64_t>& bounds = order.bounds;
  const auto segments = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t* position = order.by_segment.data();
  std::vector<char> keep_sorted(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_cpu", [&] {
    // The IoU's precision: accumulate_dtype (common/dtypes.h), as on CUDA.
    using acc_t = at::opmath_type<scalar_t>;
    // The boxes in processing order, in that precision.
    std::vector<acc_t> sorted(4 * n);
    const scalar_t* in = boxes.const_data_ptr<scalar_t>();
    const int64_t coordinate_stride = boxes.stride(-1);
    for (int64_t k = 0; k < n; ++k) {
      const scalar_t* box = in + offset(position[k]);
      for (int64_t c = 0; c < 4; ++c)
        sorted[4 * k + c] = static_cast<acc_t>(box[c * coordinate_stride]);
    }
    const auto t = threshold_as<acc_t>(iou_threshold);
    bool* flags = reinterpret_cast<bool*>(keep_sorted.data());
    const auto run = [&](int64_t s, Workspace<acc_t>& ws) {
      run_for_isa<NmsSegment<acc_t>>(sorted.data(), bounds[s], bounds[s + 1], t, ws, flags);
    };
    if (segments < 2 || n < kParallelMinBoxes || at::get_num_threads() < 2 ||
        at::in_parallel_region()) {
      auto& ws = Workspace<acc_t>::of_this_thread();
      for (int64_t s = 0; s < segments; ++s) run(s, ws);
      ws.trim();
      return;
    }
    // One region, in which each thread takes the largest segment left until
    // none is: a thread that gets less CPU (a busy core) takes fewer, and
    // the threads finish together.
    std::vector<int64_t> by_size(segments);
    std::iota(by_size.begin(), by_size.end(), 0);
    std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t a, int64_t b) {
      return bounds[a + 1] - bounds[a] > bounds[b + 1] - bounds[b];
    });
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      auto& ws = Workspace<acc_t>::of_this_thread();
      for (int64_t k; (k = next.fetch_add(1)) < segments;) run(by_size[k], ws);
      ws.trim();
    });
  });
  return keep_sorted;
}

// Keep flags at the boxes' flat positions: `keep` (bool, contiguous) from
// the flags in processing order.
void scatter_keep(const CpuNmsOrder& order, const std::vector<char>& keep_sorted,
                  const at::Tensor& keep) {
  bool* out = keep.mutable_data_ptr<bool>();
  const auto n = static_cast<int64_t>(keep_sorted.size());
  for (int64_t k = 0; k < n; ++k) out[order.by_segment[k]] = keep_sorted[k] != 0;
}

NmsKeep batched_nms_keep_cpu_impl(const at::Tensor& boxes, const at::Tensor& scores,
                                  const c10::optional<at::Tensor>& idxs,
                                  const c10::optional<at::Tensor>& image_ids,
                                  double iou_threshold) {
  const int64_t n = boxes.size(0);
  std::vector<std::vector<uint64_t>> labels;  // the segment keys, major last
  for (const auto* key : {&idxs, &image_ids})
    if (key->has_value()) labels.push_back(label_keys(**key));
  const CpuNmsOrder order = cpu_nms_order(scores, FlatIndex(scores, 1), labels);
  // The keep flags at the boxes' positions, and the kept indices by score.
  at::Tensor keep = at::empty({n}, boxes.options().dtype(at::kBool));
  scatter_keep(order, keep_in_order(boxes, FlatIndex(boxes, 1), order, iou_threshold), keep);
  const bool* out = keep.const_data_ptr<bool>();
  int64_t count = 0;
  for (int64_t k = 0; k < n; ++k) count += out[k];
  at::Tensor by_score = at::empty({n}, boxes.options().dtype(at::kLong));
  at::Tensor kept = at::empty({count}, boxes.options().dtype(at::kLong));
  int64_t* by_score_out = by_score.mutable_data_ptr<int64_t>();
  int64_t* kept_out = kept.mutable_data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = by_score_out[k] = order.by_score[k];
    if (out[i]) *kept_out++ = i;
  }
  return {keep, by_score, kept};
}

// nms_keep_rows: each row of boxes [S, B, 4] a segment, the rows' boxes
// labelled by their row, through the same order and greedy pass.
at::Tensor nms_keep_rows_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                             double iou_threshold) {
  check_nms_rows_args("maskrcnn_ops::nms_keep_rows", boxes, scores, iou_threshold);
  const int64_t rows = boxes.size(0), row_length = boxes.size(1);
  std::vector<uint64_t> row_of(rows * row_length);
  for (int64_t r = 0; r < rows; ++r)
    std::fill_n(row_of.begin() + r * row_length, row_length, static_cast<uint64_t>(r));
  const CpuNmsOrder order = cpu_nms_order(scores, FlatIndex(scores, 2), {row_of});
  at::Tensor keep = at::empty({rows, row_length}, boxes.options().dtype(at::kBool));
  scatter_keep(order, keep_in_order(boxes, FlatIndex(boxes, 2), order, iou_threshold), keep);
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  using Ops = NmsOps<&batched_nms_keep_cpu_impl>;
  m.impl("nms", &Ops::nms);
  m.impl("batched_nms", &Ops::batched_nms);
  m.impl("batched_nms_keep", &Ops::batched_nms_keep);
  m.impl("nms_keep_rows", &nms_keep_rows_cpu);
}

}  // namespace maskrcnn_ops
