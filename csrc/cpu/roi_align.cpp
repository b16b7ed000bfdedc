// RoIAlign forward and backward on CPU, for one feature map (roi_align) and
// for a feature pyramid (multi_level_roi_align: every RoI pools from the FPN
// level its size maps to). One code path serves both: a single feature map is
// a pyramid of one level.
//
// Both directions first build a tap table: per RoI, the geometry and the
// per-axis bilinear taps of every sample row and column (csrc/common). The
// tables are tiny (a few hundred taps per RoI) and are reused across all
// channels, so the inner loops only load, multiply and add.
//
// Forward: NCHW in units of (16-channel block, run of RoIs), the block's
// planes interleaved into a [H][W][16] tile where the RoIs read enough of a
// map, each distinct sample row contracted along x first; NHWC parallel over
// RoIs, whole channel vectors per tap (contiguous, vectorized).
// Backward: parallel over (map, channel block) units, each visiting the RoIs
// of its map in index order, so no two threads write the same element and
// the summation order is fixed: the result is bitwise reproducible regardless
// of thread count, which makes it deterministic without a slower variant.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <tuple>
#include <vector>

#include "../common/roi_align_checks.h"
#include "../common/roi_align_math.h"
#include "../common/roi_align_pyramid.h"
#include "isa.h"

#if MASKRCNN_MULTI_ISA
#include <immintrin.h>
#endif

namespace maskrcnn_ops {
namespace {

template <typename acc_t>
struct TapTable {
  std::vector<RoIAlignGeometry<acc_t>> geometry;  // [K]
  std::vector<int64_t> level;                     // [K] index into the pyramid
  std::vector<int64_t> y_begin;                   // [K + 1] into y_taps
  std::vector<int64_t> x_begin;                   // [K + 1] into x_taps
  std::vector<AxisTap<acc_t>> y_taps;  // per RoI: [pooled_h][grid_h]
  std::vector<AxisTap<acc_t>> x_taps;  // per RoI: [pooled_w][grid_w]

  const AxisTap<acc_t>* ys(int64_t k) const { return y_taps.data() + y_begin[k]; }
  const AxisTap<acc_t>* xs(int64_t k) const { return x_taps.data() + x_begin[k]; }
};

template <typename acc_t>
TapTable<acc_t> build_tap_table(const char* op, const at::Tensor& rois_acc,
                                int64_t batch_size, const Pyramid<acc_t>& pyramid,
                                int64_t pooled_h, int64_t pooled_w,
                                int64_t sampling_ratio, bool aligned) {
  const int64_t num_rois = rois_acc.size(0);
  const acc_t* rois = rois_acc.const_data_ptr<acc_t>();
  TapTable<acc_t> table;
  table.geometry.resize(num_rois);
  table.level.resize(num_rois);
  at::parallel_for(0, num_rois, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t l = pyramid.level_of(rois + k * 5);
      table.level[k] = l;
      table.geometry[k] = pyramid.geometry(rois + k * 5, l, batch_size, pooled_h,
                                           pooled_w, sampling_ratio, aligned);
    }
  });

  table.y_begin.resize(num_rois + 1);
  table.x_begin.resize(num_rois + 1);
  table.y_begin[0] = table.x_begin[0] = 0;
  for (int64_t k = 0; k < num_rois; ++k) {
    const auto& g = table.geometry[k];
    TORCH_CHECK(g.batch_index >= 0, op, ": rois[", k,
                ", 0] is a batch index of ", static_cast<double>(rois[k * 5]),
                ", outside the valid range [0, ", batch_size, ")");
    table.y_begin[k + 1] = table.y_begin[k] + pooled_h * g.grid_h;
    table.x_begin[k + 1] = table.x_begin[k] + pooled_w * g.grid_w;
  }
  table.y_taps.resize(table.y_begin[num_rois]);
  table.x_taps.resize(table.x_begin[num_rois]);
  at::parallel_for(0, num_rois, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto& g = table.geometry[k];
      const int64_t height = pyramid.height[table.level[k]];
      const int64_t width = pyramid.width[table.level[k]];
      AxisTap<acc_t>* y = table.y_taps.data() + table.y_begin[k];
      for (int64_t ph = 0; ph < pooled_h; ++ph)
        for (int iy = 0; iy < g.grid_h; ++iy)
          *y++ = bin_sample_tap(g.start_h, g.bin_h, ph, iy, g.grid_h, height);
      AxisTap<acc_t>* x = table.x_taps.data() + table.x_begin[k];
      for (int64_t pw = 0; pw < pooled_w; ++pw)
        for (int ix = 0; ix < g.grid_w; ++ix)
          *x++ = bin_sample_tap(g.start_w, g.bin_w, pw, ix, g.grid_w, width);
    }
  });
  return table;
}

// RoIs grouped by feature map (level, image), group index level * batch +
// image, each group in increasing RoI index.
struct RoIGroups {
  std::vector<int64_t> order;  // RoI indices sorted by (level, image, index)
  std::vector<int64_t> begin;  // [levels * batch + 1] into order
};

template <typename acc_t>
RoIGroups group_rois(const TapTable<acc_t>& table, int64_t batch,
                     int64_t levels) {
  const int64_t num_rois = static_cast<int64_t>(table.geometry.size());
  auto group_of = [&](int64_t k) {
    return table.level[k] * batch + table.geometry[k].batch_index;
  };
  RoIGroups groups;
  groups.begin.assign(levels * batch + 1, 0);
  for (int64_t k = 0; k < num_rois; ++k) groups.begin[group_of(k) + 1]++;
  for (int64_t i = 0; i < levels * batch; ++i)
    groups.begin[i + 1] += groups.begin[i];
  groups.order.resize(num_rois);
  std::vector<int64_t> next(groups.begin.begin(), groups.begin.end() - 1);
  for (int64_t k = 0; k < num_rois; ++k) groups.order[next[group_of(k)]++] = k;
  return groups;
}

// ---------------------------------------------------------------- forward --

// Requests the cache lines of the rows an upcoming channel block will read,
// so the DRAM latency of one block overlaps the arithmetic of the previous
// one. NCHW RoIAlign is otherwise latency-bound: each channel plane is a
// separate region of memory and the hardware prefetchers do not follow the
// short, scattered row segments.
template <typename scalar_t>
MASKRCNN_ALWAYS_INLINE void prefetch_rows(const scalar_t* plane0, int64_t plane, int channels,
                                          const std::vector<int64_t>& rows, int64_t width,
                                          int64_t x_first, int64_t x_last) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int j = 0; j < channels; ++j) {
    for (const int64_t row : rows) {
      const scalar_t* p = plane0 + j * plane + row * width;
      for (int64_t x = x_first; x <= x_last + kLine - 1; x += kLine)
        __builtin_prefetch(p + std::min(x, x_last), 0, 3);
    }
  }
}

// Rows of the feature map read by one RoI: each distinct row once (sample
// rows of neighbouring samples often coincide), and for every y tap the slots
// of its two rows in that list.
struct RoIRows {
  std::vector<int64_t> rows;
  std::vector<int32_t> slot_low, slot_high;  // per y tap
};

template <typename acc_t>
void collect_rows(const AxisTap<acc_t>* ys, int64_t num_y, RoIRows& r) {
  r.rows.clear();
  r.slot_low.resize(num_y);
  r.slot_high.resize(num_y);
  // Taps are sorted by coordinate, so equal rows are adjacent.
  auto slot = [&](int64_t row) {
    if (r.rows.empty() || r.rows.back() != row) r.rows.push_back(row);
    return static_cast<int32_t>(r.rows.size() - 1);
  };
  for (int64_t i = 0; i < num_y; ++i) {
    r.slot_low[i] = slot(ys[i].low);
    r.slot_high[i] = slot(ys[i].high);
  }
}

// Where a channel block's value (channel j, row y, column x) is: in the
// feature map itself (NCHW planes: channel stride = the plane) or in a tile
// that interleaves the block's planes ([H][W][CB]: channel stride 1, so the
// CB channels of a position are one vector load).
template <int CB, bool kTiled>
struct BlockLayout {
  int64_t plane, width;
  int64_t channel_stride() const { return kTiled ? 1 : plane; }
  int64_t x_stride() const { return kTiled ? CB : 1; }
  int64_t row_offset(int64_t y) const { return y * width * x_stride(); }
};

// 16 x 16 float32 transposed in registers: four stages, each swapping one
// bit between the row and the column index of the elements whose two bits
// differ (a 2 x 2 block transpose at that scale), as two-source shuffles
// (one VPERMT2PS each with AVX-512).
typedef float Float16 __attribute__((vector_size(64)));
typedef int32_t Int16 __attribute__((vector_size(64)));

// Shuffle indices of stage kBit (0-15: the first source, 16-31: the
// second) for row i (bit kBit clear) and for row i | kBit.
constexpr int32_t keep_low_index(int bit, int j) { return (j & bit) == 0 ? j : 16 + (j ^ bit); }
constexpr int32_t keep_high_index(int bit, int j) { return (j & bit) == 0 ? (j ^ bit) : 16 + j; }
template <int kBit>
constexpr Int16 kKeepLow = {keep_low_index(kBit, 0), keep_low_index(kBit, 1), keep_low_index(kBit, 2), keep_low_index(kBit, 3), keep_low_index(kBit, 4), keep_low_index(kBit, 5), keep_low_index(kBit, 6), keep_low_index(kBit, 7), keep_low_index(kBit, 8), keep_low_index(kBit, 9), keep_low_index(kBit, 10), keep_low_index(kBit, 11), keep_low_index(kBit, 12), keep_low_index(kBit, 13), keep_low_index(kBit, 14), keep_low_index(kBit, 15)};
template <int kBit>
constexpr Int16 kKeepHigh = {keep_high_index(kBit, 0), keep_high_index(kBit, 1), keep_high_index(kBit, 2), keep_high_index(kBit, 3), keep_high_index(kBit, 4), keep_high_index(kBit, 5), keep_high_index(kBit, 6), keep_high_index(kBit, 7), keep_high_index(kBit, 8), keep_high_index(kBit, 9), keep_high_index(kBit, 10), keep_high_index(kBit, 11), keep_high_index(kBit, 12), keep_high_index(kBit, 13), keep_high_index(kBit, 14), keep_high_index(kBit, 15)};

template <int kBit>
MASKRCNN_ALWAYS_INLINE void transpose_stage(Float16* rows) {
  for (int i = 0; i < 16; ++i) {
    if (i & kBit) continue;
    const Float16 a = rows[i], b = rows[i | kBit];
    rows[i] = __builtin_shuffle(a, b, kKeepLow<kBit>);
    rows[i | kBit] = __builtin_shuffle(a, b, kKeepHigh<kBit>);
  }
}

MASKRCNN_ALWAYS_INLINE void transpose16(Float16* rows) {
  transpose_stage<8>(rows);
  transpose_stage<4>(rows);
  transpose_stage<2>(rows);
  transpose_stage<1>(rows);
}

// Copies the nc planes of a channel block (nc <= CB, `block` at the first)
// into tile [H][W][CB], channels past nc zero, 16 positions at a time: 16
// channels x 16 positions loaded along the planes, transposed in registers
// (where the tile is float32 and CB 16) and stored as 16 positions'
// channel vectors; the rest one value at a time.
template <int CB, typename scalar_t, typename tile_t>
MASKRCNN_ALWAYS_INLINE void interleave_planes(const scalar_t* block, int64_t plane,
                                              int64_t nc, tile_t* tile) {
  int64_t p0 = 0;
  if constexpr (CB == 16 && std::is_same_v<tile_t, float>) {
    for (; p0 + 16 <= plane; p0 += 16) {
      Float16 rows[16];
      for (int j = 0; j < 16; ++j) {
        const scalar_t* src = block + j * plane + p0;
        for (int e = 0; e < 16; ++e) rows[j][e] = j < nc ? static_cast<float>(src[e]) : 0.0f;
      }
      transpose16(rows);
      std::memcpy(tile + p0 * CB, rows, sizeof(rows));
    }
  }
  for (; p0 < plane; ++p0)
    for (int64_t j = 0; j < CB; ++j)
      tile[p0 * CB + j] = j < nc ? static_cast<tile_t>(block[j * plane + p0]) : tile_t(0);
}

// contract_rows for a float32 tile of 16 channels, kRowBlock rows at a
// time: each tap's weights are broadcast once for the rows of a block
// instead of once per row, and the rows' sums stay in registers instead of
// being added to and stored back to memory at every tap. Each sum takes the
// same operations in the same order as contract_rows' generic loop, so the
// bits are the same. A partial last block repeats its last row in the unused
// lanes of the block and does not store them.
MASKRCNN_ALWAYS_INLINE void contract_tile_rows(const RoIAlignGeometry<float>& g,
                                               const AxisTap<float>* xs, const RoIRows& r,
                                               const float* tile, int64_t row_stride,
                                               int64_t pooled_w, float* row_sums) {
  constexpr int kRowBlock = 4;
  const int64_t num_rows = static_cast<int64_t>(r.rows.size());
  for (int64_t first = 0; first < num_rows; first += kRowBlock) {
    const int64_t count = std::min<int64_t>(kRowBlock, num_rows - first);
    const float* row[kRowBlock];
    for (int i = 0; i < kRowBlock; ++i)
      row[i] = tile + r.rows[first + std::min<int64_t>(i, count - 1)] * row_stride;
    for (int64_t pw = 0; pw < pooled_w; ++pw) {
      Float16 sum[kRowBlock] = {};
      const AxisTap<float>* tx = xs + pw * g.grid_w;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        if (tx[ix].outside()) continue;
        const int64_t low = tx[ix].low * 16, high = tx[ix].high * 16;
        const float wl = tx[ix].w_low, wh = tx[ix].w_high;
        for (int i = 0; i < kRowBlock; ++i) {
          Float16 at_low, at_high;
          std::memcpy(&at_low, row[i] + low, sizeof(Float16));
          std::memcpy(&at_high, row[i] + high, sizeof(Float16));
          sum[i] += wl * at_low + wh * at_high;
        }
      }
      for (int64_t i = 0; i < count; ++i)
        std::memcpy(row_sums + ((first + i) * pooled_w + pw) * 16, &sum[i], sizeof(Float16));
    }
  }
}

// One RoI, CB channels at once, in two steps: (1) contract_rows: every
// distinct row along x into one value per output column (the x taps are
// loaded once for CB channels); (2) blend_rows: the contracted rows with the
// y weights. Rows shared by several samples are contracted once. The same
// operations in the same order for either layout of the block, so a tiled
// and an untiled block give the same bits.
template <int CB, bool kTiled, typename in_t, typename acc_t>
MASKRCNN_ALWAYS_INLINE void contract_rows(const RoIAlignGeometry<acc_t>& g, const AxisTap<acc_t>* xs,
                                          const RoIRows& r, const in_t* in_c,
                                          BlockLayout<CB, kTiled> layout, int64_t pooled_w,
                                          acc_t* row_sums) {
  const int64_t num_rows = static_cast<int64_t>(r.rows.size());
  if constexpr (kTiled && CB == 16 && std::is_same_v<in_t, float> && std::is_same_v<acc_t, float>) {
    contract_tile_rows(g, xs, r, in_c, layout.row_offset(1), pooled_w, row_sums);
    return;
  }
  const int64_t cs = layout.channel_stride(), xstride = layout.x_stride();
  // row_sums: [num_rows][pooled_w][CB]
  for (int64_t slot = 0; slot < num_rows; ++slot) {
    const in_t* row = in_c + layout.row_offset(r.rows[slot]);
    for (int64_t pw = 0; pw < pooled_w; ++pw) {
      // Accumulated in place: a local array copied out at the end was
      // compiled into a lane-by-lane reassembly that cost a quarter of the
      // kernel.
      acc_t* __restrict__ sum = row_sums + (slot * pooled_w + pw) * CB;
      for (int j = 0; j < CB; ++j) sum[j] = acc_t(0);
      const AxisTap<acc_t>* tx = xs + pw * g.grid_w;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        if (tx[ix].outside()) continue;
        const in_t* low = row + tx[ix].low * xstride;
        const in_t* high = row + tx[ix].high * xstride;
        const acc_t wl = tx[ix].w_low, wh = tx[ix].w_high;
        if constexpr (kTiled) {
#pragma omp simd
          for (int j = 0; j < CB; ++j)
            sum[j] += wl * static_cast<acc_t>(low[j]) + wh * static_cast<acc_t>(high[j]);
        } else {
          for (int j = 0; j < CB; ++j)
            sum[j] += wl * static_cast<acc_t>(low[j * cs]) + wh * static_cast<acc_t>(high[j * cs]);
        }
      }
    }
  }
}

// For each output row, an AXPY of whole contracted rows (all columns and
// channels at once, contiguous, vectorized), then the averages over the
// samples into staged [pooled_h * pooled_w][CB]. Uses pooled_w * CB values
// of scratch after the num_rows rows of row_sums.
template <int CB, typename acc_t>
MASKRCNN_ALWAYS_INLINE void blend_rows(const RoIAlignGeometry<acc_t>& g, const AxisTap<acc_t>* ys,
                                       const RoIRows& r, int64_t pooled_h, int64_t pooled_w,
                                       acc_t* row_sums, acc_t* staged) {
  const int64_t num_rows = static_cast<int64_t>(r.rows.size());
  const int64_t span = pooled_w * CB;
  acc_t* bins = row_sums + num_rows * span;  // scratch of `span` values
  const acc_t inv_count = acc_t(1) / g.count;
  for (int64_t ph = 0; ph < pooled_h; ++ph) {
    std::fill(bins, bins + span, acc_t(0));
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const int64_t t = ph * g.grid_h + iy;
      if (ys[t].outside()) continue;
      const acc_t* lo = row_sums + r.slot_low[t] * span;
      const acc_t* hi = row_sums + r.slot_high[t] * span;
      const acc_t wl = ys[t].w_low, wh = ys[t].w_high;
      for (int64_t i = 0; i < span; ++i) bins[i] += wl * lo[i] + wh * hi[i];
    }
    acc_t* averages = staged + ph * span;
    for (int64_t i = 0; i < span; ++i) averages[i] = bins[i] * inv_count;
  }
}

// out[j * count + i] = staged[i * CB + j] for channels j < nc and positions
// i < count, rounded to T: the CB-channel vectors of the pooled bins become
// the channels' output planes. Positions go 16 at a time through a register
// transpose (contiguous stores) where CB is 16 float32 channels; scattered
// stores (16 lane extractions per position) were a fifth of the kernel.
template <int CB, typename acc_t, typename T>
MASKRCNN_ALWAYS_INLINE void store_planes(const acc_t* staged, int64_t count, int64_t nc, T* out) {
  int64_t i0 = 0;
  if constexpr (CB == 16 && std::is_same_v<acc_t, float>) {
    for (; i0 + 16 <= count; i0 += 16) {
      Float16 rows[16];
      std::memcpy(rows, staged + i0 * CB, sizeof(rows));
      transpose16(rows);
      const auto write = [&](int64_t j) __attribute__((always_inline)) {
        T* dst = out + j * count + i0;
        if constexpr (std::is_same_v<T, float>) {
          std::memcpy(dst, &rows[j], sizeof(Float16));
        } else {
          for (int e = 0; e < 16; ++e) dst[e] = static_cast<T>(rows[j][e]);
        }
      };
      // A fixed trip count for a full block: no test per channel.
      if (nc == CB) {
        for (int j = 0; j < CB; ++j) write(j);
      } else {
        for (int64_t j = 0; j < nc; ++j) write(j);
      }
    }
  }
  for (; i0 < count; ++i0)
    for (int64_t j = 0; j < nc; ++j) out[j * count + i0] = static_cast<T>(staged[i0 * CB + j]);
}

// The output of an NCHW forward is far larger than the caches and written
// once: the planes of one (RoI, channel block) are one contiguous run, which
// non-temporal stores write to memory without first reading each line in (a
// plain store's read-for-ownership doubles the traffic, and the stores of
// store_planes were a fifth of the kernel). SSE stores, so every
// instruction-set copy has them; the write-combining buffers merge the four
// of a line. The run is copied from a staging buffer in the cache;
// stream_fence orders the stores before the results are read.
MASKRCNN_ALWAYS_INLINE void stream_copy(const void* src, int64_t bytes, void* dst) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
#if MASKRCNN_MULTI_ISA
  const int64_t head =
      std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 16; bytes -= 16, d += 16, s += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
#endif
  std::memcpy(d, s, bytes);
}

MASKRCNN_ALWAYS_INLINE void stream_fence() {
#if MASKRCNN_MULTI_ISA
  _mm_sfence();
#endif
}

// pool_nchw_block's scratch after the num_rows contracted rows: a blend
// row and the staged averages.
inline int64_t block_scratch(int64_t num_rows, int64_t pooled_h, int64_t pooled_w, int64_t cb) {
  return (num_rows + 1) * pooled_w * cb + pooled_h * pooled_w * cb;
}

template <int CB, bool kTiled, typename in_t, typename scalar_t, typename acc_t>
MASKRCNN_ALWAYS_INLINE void pool_nchw_block(const RoIAlignGeometry<acc_t>& g,
                                            const AxisTap<acc_t>* ys, const AxisTap<acc_t>* xs,
                                            const RoIRows& r, const in_t* in_c,
                                            BlockLayout<CB, kTiled> layout, int64_t nc,
                                            int64_t pooled_h, int64_t pooled_w,
                                            acc_t* row_sums, scalar_t* out_c) {
  contract_rows<CB, kTiled>(g, xs, r, in_c, layout, pooled_w, row_sums);
  acc_t* staged = row_sums + (r.rows.size() + 1) * pooled_w * CB;
  blend_rows<CB>(g, ys, r, pooled_h, pooled_w, row_sums, staged);
  const int64_t count = pooled_h * pooled_w;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    // The scratch after block_scratch holds the planes until they are
    // streamed out.
    float* planes = row_sums + block_scratch(r.rows.size(), pooled_h, pooled_w, CB);
    store_planes<CB>(staged, count, nc, planes);
    stream_copy(planes, nc * count * sizeof(float), out_c);
  } else {
    store_planes<CB>(staged, count, nc, out_c);
  }
}

// How a tiled channel block is stored and pooled. FloatTile: the block's
// planes interleaved into [H][W][CB] in the accumulation type (half types
// widened once here, exactly, instead of at every tap), pooled by
// pool_nchw_block like an untiled block, so tiling changes no bit.
struct FloatTile {
  template <typename scalar_t, typename acc_t>
  using element = acc_t;

  template <int CB, typename scalar_t, typename acc_t>
  static MASKRCNN_ALWAYS_INLINE bool build(const scalar_t* block, int64_t plane, int64_t /*width*/,
                                           int64_t nc, acc_t* tile) {
    interleave_planes<CB>(block, plane, nc, tile);
    return true;
  }

  template <int CB, typename scalar_t, typename acc_t>
  static MASKRCNN_ALWAYS_INLINE void pool(const RoIAlignGeometry<acc_t>& g, const AxisTap<acc_t>* ys,
                                          const AxisTap<acc_t>* xs, const RoIRows& r,
                                          const acc_t* tile, int64_t plane, int64_t width,
                                          int64_t nc, int64_t pooled_h, int64_t pooled_w,
                                          acc_t* row_sums, uint32_t* /*weights*/, scalar_t* out) {
    pool_nchw_block<CB, true>(g, ys, xs, r, tile, BlockLayout<CB, true>{plane, width}, nc,
                              pooled_h, pooled_w, row_sums, out);
  }
};

#if MASKRCNN_MULTI_ISA
// bfloat16 with the AVX-512 BF16 instructions. The tile holds, per position
// and channel, the pair (value, right neighbour) as two bfloat16 in 32 bits
// ([H][W][CB] pairs, the last column paired with 0), so one VDPBF16PS
// computes w_low * v[x] + w_high * v[x + 1] for 16 channels. The weights are
// split into a bfloat16 high part and the bfloat16 rounding of the rest, two
// dot products per tap, which keeps 16 significant bits of each weight (the
// products themselves are exact in float32). Rows are then blended in
// float32 as in the other copies, and the averages rounded to bfloat16 by
// VCVTNEPS2BF16 (to nearest even, like a float-to-bfloat16 cast, except
// that denormals become zero).
//
// Its functions are compiled for AVX-512 BF16 and called (not inlined: an
// inlined caller would need the same target), once per map or RoI.
struct Bf16PairTile {
  template <typename scalar_t, typename acc_t>
  using element = uint32_t;

  // Builds the tile; false if the block holds an Inf or NaN, which the
  // caller then pools with FloatTile: a weight's low part is often zero, and
  // 0 * Inf would turn an Inf that the float32 path propagates into NaN.
  template <int CB>
  static MASKRCNN_TARGET_AVX512_BF16 bool build(
      const c10::BFloat16* block, int64_t plane, int64_t width, int64_t nc, uint32_t* tile) {
    static_assert(CB == 16, "one VDPBF16PS covers 16 channels");
    constexpr uint16_t kExponent = 0x7F80;  // all ones: Inf or NaN
    uint16_t non_finite = 0;
    // In runs of 16 columns of one row, so that the writes stay in L1.
    const int64_t height = plane / width;
    for (int64_t y = 0; y < height; ++y) {
      for (int64_t x0 = 0; x0 < width; x0 += 16) {
        const int64_t x1 = std::min(width, x0 + 16);
        uint32_t* dst = tile + (y * width) * CB;
        for (int64_t j = 0; j < CB; ++j) {
          if (j >= nc) {
            for (int64_t x = x0; x < x1; ++x) dst[x * CB + j] = 0;
            continue;
          }
          const uint16_t* src = reinterpret_cast<const uint16_t*>(block + j * plane + y * width);
          for (int64_t x = x0; x < x1; ++x) {
            const uint32_t right = x + 1 < width ? src[x + 1] : 0;
            dst[x * CB + j] = uint32_t(src[x]) | (right << 16);
            non_finite |= (src[x] & kExponent) == kExponent;
          }
        }
      }
    }
    return !non_finite;
  }

  // The high and low bfloat16 parts of a tap's two weights, as the 32-bit
  // pairs VDPBF16PS multiplies the tile's pairs with.
  static MASKRCNN_ALWAYS_INLINE void weight_pairs(float w_low, float w_high, uint32_t& hi,
                                                  uint32_t& lo) {
    const c10::BFloat16 low_hi(w_low), high_hi(w_high);
    const c10::BFloat16 low_lo(w_low - static_cast<float>(low_hi));
    const c10::BFloat16 high_lo(w_high - static_cast<float>(high_hi));
    hi = uint32_t(low_hi.x) | (uint32_t(high_hi.x) << 16);
    lo = uint32_t(low_lo.x) | (uint32_t(high_lo.x) << 16);
  }

  // The first nc planes of averages ([nc][count] float32, contiguous) rounded
  // in place (the bfloat16 planes fill the first half of the buffer: each
  // vector is read before its rounding is written, at or below it), then
  // streamed into out's planes.
  static MASKRCNN_TARGET_AVX512_BF16 void round_planes(
      float* averages, int64_t nc, int64_t count, c10::BFloat16* out) {
    const int64_t n = nc * count;
    auto* rounded = reinterpret_cast<char*>(averages);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 lanes = _cvtu32_mask16(n - i >= 16 ? 0xFFFFu : (1u << (n - i)) - 1u);
      const __m512 v = _mm512_maskz_loadu_ps(lanes, averages + i);
      _mm256_mask_storeu_epi16(rounded + 2 * i, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    }
    stream_copy(rounded, n * sizeof(c10::BFloat16), out);
  }

  template <int CB>
  static MASKRCNN_TARGET_AVX512_BF16 void pool(
      const RoIAlignGeometry<float>& g, const AxisTap<float>* ys, const AxisTap<float>* xs,
      const RoIRows& r, const uint32_t* tile, int64_t /*plane*/, int64_t width, int64_t nc,
      int64_t pooled_h, int64_t pooled_w, float* row_sums, uint32_t* weights, c10::BFloat16* out) {
    // weights: 2 * pooled_w * grid_w pairs of scratch.
    const int64_t num_x = pooled_w * g.grid_w;
    uint32_t* hi = weights;
    uint32_t* lo = weights + num_x;
    for (int64_t t = 0; t < num_x; ++t) weight_pairs(xs[t].w_low, xs[t].w_high, hi[t], lo[t]);
    const int64_t num_rows = static_cast<int64_t>(r.rows.size());
    for (int64_t slot = 0; slot < num_rows; ++slot) {
      const uint32_t* row = tile + r.rows[slot] * width * CB;
      for (int64_t pw = 0; pw < pooled_w; ++pw) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = pw * g.grid_w; t < (pw + 1) * g.grid_w; ++t) {
          if (xs[t].outside()) continue;
          const __m512bh pairs = reinterpret_cast<__m512bh>(_mm512_loadu_si512(row + xs[t].low * CB));
          sum = _mm512_dpbf16_ps(sum, pairs, reinterpret_cast<__m512bh>(_mm512_set1_epi32(hi[t])));
          sum = _mm512_dpbf16_ps(sum, pairs, reinterpret_cast<__m512bh>(_mm512_set1_epi32(lo[t])));
        }
        _mm512_storeu_ps(row_sums + (slot * pooled_w + pw) * CB, sum);
      }
    }
    // The averages in float32 as [nc][pooled_h * pooled_w] after the
    // block's scratch, then rounded plane by plane (contiguous stores).
    float* staged = row_sums + (num_rows + 1) * pooled_w * CB;
    float* averages = row_sums + block_scratch(num_rows, pooled_h, pooled_w, CB);
    blend_rows<CB>(g, ys, r, pooled_h, pooled_w, row_sums, staged);
    store_planes<CB>(staged, pooled_h * pooled_w, nc, averages);
    round_planes(averages, nc, pooled_h * pooled_w, out);
  }
};
#endif

// NCHW forward, channel-block-major: each unit of work is a block of kBlock
// channels and a run of RoIs, ordered by feature map (level, image). For the
// RoIs of one map the block's planes are first interleaved into a tile
// [H][W][kBlock] when the RoIs read enough of it to repay the copy: then
// every tap is one contiguous vector of kBlock channels (one cache line in
// float32) instead of kBlock scattered loads, one per plane. RoIs that read
// little of a map use the planes directly, with prefetching.
template <typename scalar_t, typename acc_t, typename Tile = FloatTile>
struct NchwForward {
  static constexpr int kBlock = 16;
  using tile_t = typename Tile::template element<scalar_t, acc_t>;
  const TapTable<acc_t>& table;
  const RoIGroups& groups;
  const Pyramid<acc_t>& pyramid;
  const std::vector<const scalar_t*>& inputs;
  scalar_t* output;
  int64_t channels, pooled_h, pooled_w, chunks;
  std::vector<RoIRows> rows;         // [K]
  std::vector<int64_t> taps_before;  // [K + 1] over groups.order: row x column taps

  // Scratch of one thread.
  struct Scratch {
    std::vector<acc_t> row_sums;
    std::vector<tile_t> tile;
    std::vector<uint32_t> weights;  // Bf16PairTile's weight pairs
    std::vector<acc_t> float_tile;  // when Tile::build declines
  };

  const scalar_t* block_origin(int64_t k, int64_t c0) const {
    const int64_t plane = pyramid.plane(table.level[k]);
    return inputs[table.level[k]] + (table.geometry[k].batch_index * channels + c0) * plane;
  }

  // Whether the RoIs at [s, e) of groups.order, all on one map of `plane`
  // positions, read enough to repay interleaving: each untiled tap reads
  // kBlock cache lines, the copy reads and writes about plane * kBlock
  // values (plane * kBlock / 8 float32 lines).
  bool worth_tiling(int64_t s, int64_t e, int64_t plane) const {
    return (taps_before[e] - taps_before[s]) * 8 > plane;
  }

  // Pools the RoIs at [s, e) of groups.order, from `tile` (built by
  // TileOf) or, untiled, from the planes.
  template <bool kTiled, typename TileOf = Tile>
  MASKRCNN_ALWAYS_INLINE void pool_run(int64_t s, int64_t e, int64_t c0, int64_t nc,
                                       const typename TileOf::template element<scalar_t, acc_t>* tile,
                                       Scratch& scratch) const {
    for (int64_t i = s; i < e; ++i) {
      const int64_t k = groups.order[i];
      if (!kTiled && i + 1 < e) prefetch(groups.order[i + 1], c0, nc);
      const auto& g = table.geometry[k];
      scalar_t* out = output + (k * channels + c0) * pooled_h * pooled_w;
      if (g.grid_h == 0 || g.grid_w == 0) {
        for (int64_t j = 0; j < nc; ++j)
          std::fill_n(out + j * pooled_h * pooled_w, pooled_h * pooled_w, scalar_t(0));
        continue;
      }
      const int64_t level = table.level[k];
      const int64_t plane = pyramid.plane(level), width = pyramid.width[level];
      // pool_nchw_block's scratch, then the block's planes ([CB][pooled_h *
      // pooled_w]: the float32 averages that Bf16PairTile rounds, or the
      // planes pool_nchw_block streams out).
      scratch.row_sums.resize(block_scratch(rows[k].rows.size(), pooled_h, pooled_w, kBlock) +
                              kBlock * pooled_h * pooled_w);
      if (!kTiled && nc < kBlock) {
        // The last block of the planes, partial: channel by channel, so
        // that no read goes past channel c0 + nc (a tile is zero-padded).
        for (int64_t j = 0; j < nc; ++j)
          pool_nchw_block<1, false>(g, table.ys(k), table.xs(k), rows[k],
                                    block_origin(k, c0 + j), BlockLayout<1, false>{plane, width},
                                    1, pooled_h, pooled_w, scratch.row_sums.data(),
                                    out + j * pooled_h * pooled_w);
        continue;
      }
      if constexpr (kTiled) {
        scratch.weights.resize(2 * pooled_w * g.grid_w);
        TileOf::template pool<kBlock>(g, table.ys(k), table.xs(k), rows[k], tile, plane, width, nc,
                                    pooled_h, pooled_w, scratch.row_sums.data(),
                                    scratch.weights.data(), out);
      } else
        pool_nchw_block<kBlock, false>(g, table.ys(k), table.xs(k), rows[k], block_origin(k, c0),
                                       BlockLayout<kBlock, false>{plane, width}, nc, pooled_h, pooled_w, scratch.row_sums.data(), out);
    }
  }

  void prefetch(int64_t k, int64_t c0, int64_t nc) const {
    const auto& g = table.geometry[k];
    if (g.grid_h == 0 || g.grid_w == 0) return;
    const AxisTap<acc_t>* xs = table.xs(k);
    const int64_t num_x = table.x_begin[k + 1] - table.x_begin[k];
    prefetch_rows(block_origin(k, c0), pyramid.plane(table.level[k]), static_cast<int>(nc),
                  rows[k].rows, pyramid.width[table.level[k]], xs[0].low, xs[num_x - 1].high);
  }

  // Units [begin, end): unit = block * chunks + chunk.
  static MASKRCNN_ALWAYS_INLINE void run(const NchwForward& f, int64_t begin, int64_t end) {
    Scratch scratch;
    const int64_t num_rois = static_cast<int64_t>(f.table.geometry.size());
    const int64_t maps = static_cast<int64_t>(f.groups.begin.size()) - 1;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t block = unit / f.chunks, chunk = unit % f.chunks;
      const int64_t first = chunk * num_rois / f.chunks;
      const int64_t last = (chunk + 1) * num_rois / f.chunks;
      const int64_t c0 = block * kBlock;
      const int64_t nc = std::min<int64_t>(kBlock, f.channels - c0);
      for (int64_t map = 0; map < maps; ++map) {
        const int64_t s = std::max(first, f.groups.begin[map]);
        const int64_t e = std::min(last, f.groups.begin[map + 1]);
        if (s >= e) continue;
        const int64_t plane = f.pyramid.plane(f.table.level[f.groups.order[s]]);
        if (f.worth_tiling(s, e, plane)) {
          scratch.tile.resize(plane * kBlock);
          const int64_t width = f.pyramid.width[f.table.level[f.groups.order[s]]];
          const scalar_t* block = f.block_origin(f.groups.order[s], c0);
          if (Tile::template build<kBlock>(block, plane, width, nc, scratch.tile.data())) {
            f.template pool_run<true>(s, e, c0, nc, scratch.tile.data(), scratch);
          } else {
            scratch.float_tile.resize(plane * kBlock);
            FloatTile::build<kBlock>(block, plane, width, nc, scratch.float_tile.data());
            f.template pool_run<true, FloatTile>(s, e, c0, nc, scratch.float_tile.data(), scratch);
          }
        } else {
          f.prefetch(f.groups.order[s], c0, nc);
          f.template pool_run<false>(s, e, c0, nc, nullptr, scratch);
        }
      }
    }
    stream_fence();
  }
};

template <typename scalar_t, typename acc_t>
void forward_nchw(const TapTable<acc_t>& table, const RoIGroups& groups,
                  const Pyramid<acc_t>& pyramid,
                  const std::vector<const scalar_t*>& inputs, scalar_t* output,
                  int64_t channels, int64_t pooled_h, int64_t pooled_w) {
  const int64_t num_rois = static_cast<int64_t>(table.geometry.size());
  constexpr int64_t kBlock = NchwForward<scalar_t, acc_t>::kBlock;
  const int64_t blocks = (channels + kBlock - 1) / kBlock;
  // With few channel blocks, also split the RoIs so every thread has work.
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(num_rois, (2 * at::get_num_threads() + blocks - 1) / blocks));
  std::vector<RoIRows> rows(num_rois);
  at::parallel_for(0, num_rois, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      collect_rows(table.ys(k), table.y_begin[k + 1] - table.y_begin[k], rows[k]);
  });
  // Each map's RoIs by their first row, so that consecutive RoIs read
  // nearby rows, which are then still in cache (a tile of kBlock planes is
  // larger than a core's L2 cache). Each output is written once, whatever
  // the order.
  RoIGroups by_row = groups;
  const auto first_row = [&](int64_t k) { return rows[k].rows.empty() ? 0 : rows[k].rows.front(); };
  for (size_t map = 0; map + 1 < by_row.begin.size(); ++map)
    std::stable_sort(by_row.order.begin() + by_row.begin[map], by_row.order.begin() + by_row.begin[map + 1],
                     [&](int64_t a, int64_t b) { return first_row(a) < first_row(b); });
  std::vector<int64_t> taps_before(num_rois + 1, 0);
  for (int64_t i = 0; i < num_rois; ++i) {
    const int64_t k = by_row.order[i];
    const int64_t num_x = table.x_begin[k + 1] - table.x_begin[k];
    taps_before[i + 1] = taps_before[i] + static_cast<int64_t>(rows[k].rows.size()) * num_x;
  }
#if MASKRCNN_MULTI_ISA
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (use_avx512_bf16()) {
      using Body = NchwForward<scalar_t, acc_t, Bf16PairTile>;
      const Body body{table, by_row, pyramid, inputs, output, channels, pooled_h, pooled_w,
                      chunks, std::move(rows), std::move(taps_before)};
      at::parallel_for(0, blocks * chunks, 1, [&](int64_t begin, int64_t end) {
        run_avx512_bf16<Body>(body, begin, end);
      });
      return;
    }
  }
#endif
  using Body = NchwForward<scalar_t, acc_t>;
  const Body body{table, by_row, pyramid, inputs, output, channels, pooled_h, pooled_w, chunks,
                  std::move(rows), std::move(taps_before)};
  at::parallel_for(0, blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    run_for_isa<Body>(body, begin, end);
  });
}

// Calls visit(w, pos) for every sample of one bin that lies inside the map:
// the bilinear weights of its four corners (low/high row x low/high column)
// and their positions y * width + x. Corners may coincide at the border.
template <typename acc_t, typename Visit>
MASKRCNN_ALWAYS_INLINE void for_each_bin_sample(const RoIAlignGeometry<acc_t>& g,
                                                const AxisTap<acc_t>* ys, const AxisTap<acc_t>* xs,
                                                int64_t width, Visit&& visit) {
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const AxisTap<acc_t> ty = ys[iy];
    if (ty.outside()) continue;
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const AxisTap<acc_t> tx = xs[ix];
      if (tx.outside()) continue;
      const acc_t w[4] = {ty.w_low * tx.w_low, ty.w_low * tx.w_high, ty.w_high * tx.w_low,
                          ty.w_high * tx.w_high};
      const int64_t pos[4] = {ty.low * width + tx.low, ty.low * width + tx.high,
                              ty.high * width + tx.low, ty.high * width + tx.high};
      visit(w, pos);
    }
  }
}

// NHWC forward: parallel over RoIs; every tap adds a whole channel vector
// (contiguous, vectorized). bfloat16 uses this copy too, with or without the
// AVX-512 BF16 instructions: a VDPBF16PS variant (the corners of a row
// interleaved into pairs per 16 channels) was slower than widening each
// corner to float32, the interleaving costing more than the dot products
// save.
template <typename scalar_t, typename acc_t>
struct NhwcForward {
  const TapTable<acc_t>& table;
  const Pyramid<acc_t>& pyramid;
  const std::vector<const scalar_t*>& inputs;
  scalar_t* output;
  int64_t channels, pooled_h, pooled_w;

  static MASKRCNN_ALWAYS_INLINE void bin(const NhwcForward& f, const RoIAlignGeometry<acc_t>& g,
                                         const AxisTap<acc_t>* ys, const AxisTap<acc_t>* xs,
                                         const scalar_t* in_b, int64_t width, acc_t* a) {
    std::fill(a, a + f.channels, acc_t(0));
    for_each_bin_sample(g, ys, xs, width, [&](const acc_t* w, const int64_t* pos)
                                              __attribute__((always_inline)) {
      const scalar_t* p1 = in_b + pos[0] * f.channels;
      const scalar_t* p2 = in_b + pos[1] * f.channels;
      const scalar_t* p3 = in_b + pos[2] * f.channels;
      const scalar_t* p4 = in_b + pos[3] * f.channels;
      for (int64_t c = 0; c < f.channels; ++c) {
        a[c] += w[0] * static_cast<acc_t>(p1[c]) + w[1] * static_cast<acc_t>(p2[c]) +
                w[2] * static_cast<acc_t>(p3[c]) + w[3] * static_cast<acc_t>(p4[c]);
      }
    });
  }

  // RoIs [begin, end).
  static MASKRCNN_ALWAYS_INLINE void run(const NhwcForward& f, int64_t begin, int64_t end) {
    std::vector<acc_t> acc(f.channels);
    for (int64_t k = begin; k < end; ++k) {
      const auto& g = f.table.geometry[k];
      const auto *ys = f.table.ys(k), *xs = f.table.xs(k);
      const int64_t width = f.pyramid.width[f.table.level[k]];
      const scalar_t* in_b =
          f.inputs[f.table.level[k]] + g.batch_index * f.pyramid.plane(f.table.level[k]) * f.channels;
      for (int64_t ph = 0; ph < f.pooled_h; ++ph) {
        for (int64_t pw = 0; pw < f.pooled_w; ++pw) {
          bin(f, g, ys + ph * g.grid_h, xs + pw * g.grid_w, in_b, width, acc.data());
          scalar_t* out = f.output + ((k * f.pooled_h + ph) * f.pooled_w + pw) * f.channels;
          for (int64_t c = 0; c < f.channels; ++c) out[c] = static_cast<scalar_t>(acc[c] / g.count);
        }
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
void forward_nhwc(const TapTable<acc_t>& table, const Pyramid<acc_t>& pyramid,
                  const std::vector<const scalar_t*>& inputs, scalar_t* output,
                  int64_t channels, int64_t pooled_h, int64_t pooled_w) {
  using Body = NhwcForward<scalar_t, acc_t>;
  const Body body{table, pyramid, inputs, output, channels, pooled_h, pooled_w};
  const int64_t num_rois = static_cast<int64_t>(table.geometry.size());
  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    run_for_isa<Body>(body, begin, end);
  });
}

// Forward over a pyramid of same-layout feature maps [N, C, H_l, W_l] (spec
// describes them).
at::Tensor pool_forward(const char* op, const std::vector<at::Tensor>& features,
                        const at::Tensor& rois, const Pyramid<double>& spec,
                        int64_t pooled_h, int64_t pooled_w,
                        int64_t sampling_ratio, bool aligned) {
  const at::Tensor& first = features.front();
  const auto memory_format = memory_format_of(spec);
  const int64_t num_rois = rois.size(0);
  const int64_t batch = first.size(0), channels = spec.channels;
  // Plain at::empty: a fresh output costs a page fault per 4 KiB on first
  // touch (a third of the box-head forward), and transparent huge pages
  // (madvise) would save most of that, but on a VM that hands freed huge
  // pages back to its host they made a call after a pause 10x slower
  // (benchmarks/results/cpu-2026-12-01-b/huge_pages.md).
  at::Tensor output =
      at::empty({num_rois, channels, pooled_h, pooled_w},
                first.options().memory_format(memory_format));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, first.scalar_type(), "roi_align_forward_cpu",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto pyramid = spec.as<acc_t>();
        const at::Tensor rois_acc =
            rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
        const auto table =
            build_tap_table<acc_t>(op, rois_acc, batch, pyramid, pooled_h,
                                   pooled_w, sampling_ratio, aligned);
        // Built even for empty outputs, so invalid batch indices are always
        // reported.
        if (output.numel() == 0) return;
        std::vector<at::Tensor> contiguous;
        std::vector<const scalar_t*> inputs;
        for (const auto& f : features) {
          contiguous.push_back(f.contiguous(memory_format));
          inputs.push_back(contiguous.back().const_data_ptr<scalar_t>());
        }
        scalar_t* out = output.mutable_data_ptr<scalar_t>();
        if (spec.channels_last) {
          forward_nhwc<scalar_t, acc_t>(table, pyramid, inputs, out, channels,
                                        pooled_h, pooled_w);
        } else {
          forward_nchw<scalar_t, acc_t>(
              table, group_rois(table, batch, pyramid.levels), pyramid,
              inputs, out, channels, pooled_h, pooled_w);
        }
      });
  return output;
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                 double spatial_scale, int64_t pooled_h,
                                 int64_t pooled_w, int64_t sampling_ratio,
                                 bool aligned) {
  const char* op = "maskrcnn_ops::roi_align";
  check_roi_align_forward(op, input, rois, spatial_scale, pooled_h, pooled_w,
                          sampling_ratio);
  return pool_forward(op, {input}, rois,
                      single_level_pyramid(input.size(1), input.size(2),
                                           input.size(3), spatial_scale,
                                           use_channels_last(input)),
                      pooled_h, pooled_w, sampling_ratio, aligned);
}

at::Tensor multi_level_roi_align_forward_cpu(
    at::TensorList features, const at::Tensor& rois,
    c10::ArrayRef<double> spatial_scales, int64_t pooled_h, int64_t pooled_w,
    int64_t sampling_ratio, bool aligned, double canonical_scale,
    int64_t canonical_level) {
  check_multi_level_roi_align_forward(features, rois, spatial_scales, pooled_h,
                                      pooled_w, sampling_ratio, canonical_scale);
  return pool_forward("maskrcnn_ops::multi_level_roi_align", features.vec(), rois,
                      feature_pyramid(features, spatial_scales, canonical_scale,
                                      canonical_level),
                      pooled_h, pooled_w, sampling_ratio, aligned);
}

// --------------------------------------------------------------- backward --

// Both backward kernels write grad_inputs[level] (accumulation dtype, the
// layout of grad) and run in parallel over units that own disjoint parts of
// it, each visiting its RoIs in index order. Units are numbered channel
// (block) major: parallel_for hands each thread a contiguous range, and RoIs
// are often all on one level or image (small boxes all map to P2), so
// map-major numbering would give one thread all the work.

// NCHW backward: units of (channel block, map). A map whose RoIs take
// enough samples accumulates a block of kBlock channels at once in a tile
// [H][W][kBlock] (every tap one vector update instead of kBlock scattered
// ones, each RoI's bin gradients first interleaved the same way), copied
// out to the channel planes at the end; a map with few samples is
// accumulated channel by channel into its planes directly. Either way every
// element receives the same products in the same order (RoI, bin, sample,
// corner), starting from zero: the same bits.
template <typename scalar_t, typename acc_t>
struct NchwBackward {
  static constexpr int kBlock = 16;
  const TapTable<acc_t>& table;
  const RoIGroups& groups;
  const Pyramid<acc_t>& pyramid;
  const scalar_t* grad;
  const std::vector<acc_t*>& grad_inputs;
  int64_t batch, channels, pooled_h, pooled_w;
  std::vector<int64_t> samples;  // [maps] bin samples of the map's RoIs

  // dst[j] += values[j] * w for the CB channels of one position.
  template <int CB>
  static MASKRCNN_ALWAYS_INLINE void add_scaled(acc_t* dst, const acc_t* values, acc_t w) {
#pragma omp simd
    for (int j = 0; j < CB; ++j) dst[j] += values[j] * w;
  }

  // RoI k's gradient to the CB channels at `out` (channel stride cs,
  // position stride ps); gbins: its bin gradients divided by the sample
  // count, [pooled_h * pooled_w][CB].
  template <int CB>
  static MASKRCNN_ALWAYS_INLINE void add_roi(const RoIAlignGeometry<acc_t>& g, const AxisTap<acc_t>* ys,
                                             const AxisTap<acc_t>* xs, const acc_t* gbins,
                                             int64_t pooled_h, int64_t pooled_w, int64_t width,
                                             int64_t ps, acc_t* out) {
    for (int64_t ph = 0; ph < pooled_h; ++ph) {
      for (int64_t pw = 0; pw < pooled_w; ++pw) {
        const acc_t* gbin = gbins + (ph * pooled_w + pw) * CB;
        const AxisTap<acc_t>* tx = xs + pw * g.grid_w;
        for (int iy = 0; iy < g.grid_h; ++iy) {
          const AxisTap<acc_t> ty = ys[ph * g.grid_h + iy];
          if (ty.outside()) continue;
          acc_t g_lo[CB], g_hi[CB];
          for (int j = 0; j < CB; ++j) {
            g_lo[j] = gbin[j] * ty.w_low;
            g_hi[j] = gbin[j] * ty.w_high;
          }
          acc_t* lo = out + ty.low * width * ps;
          acc_t* hi = out + ty.high * width * ps;
          for (int ix = 0; ix < g.grid_w; ++ix) {
            if (tx[ix].outside()) continue;
            const acc_t wl = tx[ix].w_low, wh = tx[ix].w_high;
            // One corner after another: corners coincide at the border.
            add_scaled<CB>(lo + tx[ix].low * ps, g_lo, wl);
            add_scaled<CB>(lo + tx[ix].high * ps, g_lo, wh);
            add_scaled<CB>(hi + tx[ix].low * ps, g_hi, wl);
            add_scaled<CB>(hi + tx[ix].high * ps, g_hi, wh);
          }
        }
      }
    }
  }

  // Units [begin, end): unit = block * maps + map.
  static MASKRCNN_ALWAYS_INLINE void run(const NchwBackward& f, int64_t begin, int64_t end) {
    std::vector<acc_t> tile, gbins;
    const int64_t maps = f.pyramid.levels * f.batch;
    const int64_t bins = f.pooled_h * f.pooled_w;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t map = unit % maps, c0 = (unit / maps) * kBlock;
      const int64_t nc = std::min<int64_t>(kBlock, f.channels - c0);
      const int64_t level = map / f.batch, b = map % f.batch;
      const int64_t width = f.pyramid.width[level], plane = f.pyramid.plane(level);
      acc_t* gin = f.grad_inputs[level] + (b * f.channels + c0) * plane;
      const bool tiled = f.samples[map] * 2 > plane;
      if (tiled) tile.assign(plane * kBlock, acc_t(0));
      for (int64_t i = f.groups.begin[map]; i < f.groups.begin[map + 1]; ++i) {
        const int64_t k = f.groups.order[i];
        const auto& g = f.table.geometry[k];
        const scalar_t* grad_k = f.grad + (k * f.channels + c0) * bins;
        if (tiled) {
          gbins.resize(bins * kBlock);
          interleave_planes<kBlock>(grad_k, bins, nc, gbins.data());
          for (acc_t& v : gbins) v = v / g.count;
          add_roi<kBlock>(g, f.table.ys(k), f.table.xs(k), gbins.data(), f.pooled_h, f.pooled_w, width,
                          kBlock, tile.data());
          continue;
        }
        gbins.resize(bins);
        for (int64_t j = 0; j < nc; ++j) {
          for (int64_t bin = 0; bin < bins; ++bin)
            gbins[bin] = static_cast<acc_t>(grad_k[j * bins + bin]) / g.count;
          add_roi<1>(g, f.table.ys(k), f.table.xs(k), gbins.data(), f.pooled_h, f.pooled_w, width, 1,
                     gin + j * plane);
        }
      }
      if (tiled) store_planes<kBlock>(tile.data(), plane, nc, gin);
    }
  }
};

template <typename scalar_t, typename acc_t>
void backward_nchw(const TapTable<acc_t>& table, const RoIGroups& groups,
                   const Pyramid<acc_t>& pyramid, const scalar_t* grad,
                   const std::vector<acc_t*>& grad_inputs, int64_t batch,
                   int64_t channels, int64_t pooled_h, int64_t pooled_w) {
  using Body = NchwBackward<scalar_t, acc_t>;
  const int64_t maps = pyramid.levels * batch;
  std::vector<int64_t> samples(maps, 0);
  for (int64_t map = 0; map < maps; ++map) {
    for (int64_t i = groups.begin[map]; i < groups.begin[map + 1]; ++i) {
      const auto& g = table.geometry[groups.order[i]];
      samples[map] += pooled_h * pooled_w * g.grid_h * g.grid_w;
    }
  }
  const Body body{table, groups, pyramid, grad, grad_inputs, batch, channels, pooled_h, pooled_w,
                  std::move(samples)};
  const int64_t blocks = (channels + Body::kBlock - 1) / Body::kBlock;
  at::parallel_for(0, blocks * maps, 1, [&](int64_t begin, int64_t end) {
    run_for_isa<Body>(body, begin, end);
  });
}

// NHWC backward: units of (map, channel block); every tap adds a scaled
// vector of the block's bin gradients to a feature-map position.
template <typename scalar_t, typename acc_t>
struct NhwcBackward {
  const TapTable<acc_t>& table;
  const RoIGroups& groups;
  const Pyramid<acc_t>& pyramid;
  const scalar_t* grad;
  const std::vector<acc_t*>& grad_inputs;
  int64_t batch, channels, pooled_h, pooled_w, block_size;

  // One bin of RoI k: its gradient (nc channels, divided by the sample
  // count in gbin) to the four corners of every sample.
  static MASKRCNN_ALWAYS_INLINE void bin(const RoIAlignGeometry<acc_t>& g, const AxisTap<acc_t>* ys,
                                         const AxisTap<acc_t>* xs, const acc_t* gbin, int64_t nc,
                                         int64_t width, int64_t channels, acc_t* gin_b) {
    for_each_bin_sample(g, ys, xs, width, [&](const acc_t* w, const int64_t* pos)
                                              __attribute__((always_inline)) {
      // One corner after another: corners may coincide at the border.
      for (int corner = 0; corner < 4; ++corner) {
        acc_t* dst = gin_b + pos[corner] * channels;
        const acc_t wc = w[corner];
        for (int64_t c = 0; c < nc; ++c) dst[c] += wc * gbin[c];
      }
    });
  }

  // Units [begin, end): unit = block * maps + map.
  static MASKRCNN_ALWAYS_INLINE void run(const NhwcBackward& f, int64_t begin, int64_t end) {
    std::vector<acc_t> gbin(f.block_size);
    const int64_t maps = f.pyramid.levels * f.batch;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t map = unit % maps;
      const int64_t level = map / f.batch, b = map % f.batch;
      const int64_t width = f.pyramid.width[level];
      const int64_t c0 = (unit / maps) * f.block_size;
      const int64_t nc = std::min(f.block_size, f.channels - c0);
      acc_t* gin_b = f.grad_inputs[level] + b * f.pyramid.plane(level) * f.channels + c0;
      for (int64_t i = f.groups.begin[map]; i < f.groups.begin[map + 1]; ++i) {
        const int64_t k = f.groups.order[i];
        const auto& g = f.table.geometry[k];
        const auto *ys = f.table.ys(k), *xs = f.table.xs(k);
        for (int64_t ph = 0; ph < f.pooled_h; ++ph) {
          for (int64_t pw = 0; pw < f.pooled_w; ++pw) {
            const scalar_t* grad_bin = f.grad + ((k * f.pooled_h + ph) * f.pooled_w + pw) * f.channels + c0;
            for (int64_t c = 0; c < nc; ++c) gbin[c] = static_cast<acc_t>(grad_bin[c]) / g.count;
            bin(g, ys + ph * g.grid_h, xs + pw * g.grid_w, gbin.data(), nc, width, f.channels, gin_b);
          }
        }
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
void backward_nhwc(const TapTable<acc_t>& table, const RoIGroups& groups,
                   const Pyramid<acc_t>& pyramid, const scalar_t* grad,
                   const std::vector<acc_t*>& grad_inputs, int64_t batch,
                   int64_t channels, int64_t pooled_h, int64_t pooled_w) {
  // Channel blocks keep the per-tap vector loop long while giving every
  // thread work even for a single image: at least two blocks per thread
  // where the channels allow (16 or more channels a block), so that every
  // thread has work however the RoIs fall.
  const int64_t threads = at::get_num_threads();
  const int64_t block_size =
      std::clamp<int64_t>((channels + 2 * threads - 1) / (2 * threads), 16, 64);
  const int64_t blocks = (channels + block_size - 1) / block_size;
  using Body = NhwcBackward<scalar_t, acc_t>;
  const Body body{table, groups, pyramid, grad, grad_inputs, batch, channels, pooled_h, pooled_w,
                  block_size};
  at::parallel_for(0, pyramid.levels * batch * blocks, 1, [&](int64_t begin, int64_t end) {
    run_for_isa<Body>(body, begin, end);
  });
}

// Backward over a pyramid (spec describes it): one gradient [N, C, H_l, W_l]
// per level, in grad's dtype and layout.
std::vector<at::Tensor> pool_backward(const char* op, const at::Tensor& grad,
                                      const at::Tensor& rois,
                                      const Pyramid<double>& spec,
                                      int64_t pooled_h, int64_t pooled_w,
                                      int64_t batch, int64_t sampling_ratio,
                                      bool aligned) {
  const auto memory_format = memory_format_of(spec);
  const int64_t channels = spec.channels;
  const auto acc_dtype = accumulate_dtype(grad.scalar_type());
  // Half types accumulate into a float32 buffer and are rounded once at the end.
  // (at::zeros would drop the memory format from the options.)
  std::vector<at::Tensor> grad_inputs;
  for (int64_t l = 0; l < spec.levels; ++l) {
    grad_inputs.push_back(
        at::empty({batch, channels, spec.height[l], spec.width[l]},
                  grad.options().dtype(acc_dtype).memory_format(memory_format))
            .zero_());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto pyramid = spec.as<acc_t>();
        const at::Tensor rois_acc = rois.to(acc_dtype).contiguous();
        const auto table =
            build_tap_table<acc_t>(op, rois_acc, batch, pyramid, pooled_h,
                                   pooled_w, sampling_ratio, aligned);
        if (spec.total_numel(batch) == 0 || grad.numel() == 0) return;
        const auto groups = group_rois(table, batch, pyramid.levels);
        const at::Tensor grad_c = grad.contiguous(memory_format);
        const scalar_t* g = grad_c.const_data_ptr<scalar_t>();
        std::vector<acc_t*> gins;
        for (auto& t : grad_inputs) gins.push_back(t.mutable_data_ptr<acc_t>());
        if (spec.channels_last) {
          backward_nhwc<scalar_t, acc_t>(table, groups, pyramid, g, gins, batch,
                                         channels, pooled_h, pooled_w);
        } else {
          backward_nchw<scalar_t, acc_t>(table, groups, pyramid, g, gins, batch,
                                         channels, pooled_h, pooled_w);
        }
      });
  for (auto& t : grad_inputs) {
    if (t.scalar_type() != grad.scalar_type()) t = t.to(grad.scalar_type());
  }
  return grad_inputs;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h,
                                  int64_t pooled_w, int64_t batch,
                                  int64_t channels, int64_t height,
                                  int64_t width, int64_t sampling_ratio,
                                  bool aligned) {
  const char* op = "maskrcnn_ops::roi_align_backward";
  check_roi_align_backward(op, grad, rois, spatial_scale, pooled_h, pooled_w,
                           batch, channels, height, width, sampling_ratio);
  return pool_backward(op, grad, rois,
                       single_level_pyramid(channels, height, width,
                                            spatial_scale,
                                            use_channels_last(grad)),
                       pooled_h, pooled_w, batch, sampling_ratio, aligned)
      .front();
}

std::vector<at::Tensor> multi_level_roi_align_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois,
    c10::ArrayRef<double> spatial_scales, int64_t pooled_h, int64_t pooled_w,
    int64_t batch, int64_t channels, c10::IntArrayRef heights,
    c10::IntArrayRef widths, int64_t sampling_ratio, bool aligned,
    double canonical_scale, int64_t canonical_level) {
  check_multi_level_roi_align_backward(grad, rois, spatial_scales, pooled_h,
                                       pooled_w, batch, channels, heights, widths,
                                       sampling_ratio, canonical_scale);
  return pool_backward("maskrcnn_ops::multi_level_roi_align_backward", grad,
                       rois,
                       gradient_pyramid(grad, channels, heights, widths,
                                        spatial_scales, canonical_scale,
                                        canonical_level),
                       pooled_h, pooled_w, batch, sampling_ratio, aligned);
}

// -------------------------------------------------------------- max mode --
//
// mmcv's pool_mode="max". Simple loops over the tap table in either layout
// (FeatureLayout gives the strides): this mode serves mmdetection models,
// whose hot path is the average mode above.

template <typename scalar_t, typename acc_t>
void forward_max(const TapTable<acc_t>& table, const scalar_t* input,
                 scalar_t* output, int32_t* argmax, const FeatureLayout& layout,
                 int64_t pooled_h, int64_t pooled_w) {
  const int64_t num_rois = static_cast<int64_t>(table.geometry.size());
  const int64_t channels = layout.channels;
  const int64_t sy = layout.y_stride(), sx = layout.x_stride();
  at::parallel_for(0, num_rois * channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t k = unit / channels, c = unit % channels;
      const auto& g = table.geometry[k];
      const auto *ys = table.ys(k), *xs = table.xs(k);
      const scalar_t* base = input + layout.channel_origin(g.batch_index, c);
      for (int64_t ph = 0; ph < pooled_h; ++ph) {
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
          acc_t best_value = acc_t(0);
          int32_t best = -1;
          for (int iy = 0; iy < g.grid_h; ++iy) {
            const AxisTap<acc_t> ty = ys[ph * g.grid_h + iy];
            for (int ix = 0; ix < g.grid_w; ++ix) {
              const AxisTap<acc_t> tx = xs[pw * g.grid_w + ix];
              // An outside sample is a candidate of value 0, as in mmcv.
              const acc_t value =
                  ty.outside() || tx.outside() ? acc_t(0) :
                  ty.w_low * tx.w_low * static_cast<acc_t>(base[ty.low * sy + tx.low * sx]) +
                  ty.w_low * tx.w_high * static_cast<acc_t>(base[ty.low * sy + tx.high * sx]) +
                  ty.w_high * tx.w_low * static_cast<acc_t>(base[ty.high * sy + tx.low * sx]) +
                  ty.w_high * tx.w_high * static_cast<acc_t>(base[ty.high * sy + tx.high * sx]);
              if (best < 0 || beats_max(value, best_value)) {
                best_value = value;
                best = iy * g.grid_w + ix;
              }
            }
          }
          const int64_t o = layout.output_offset(k, c, ph, pw, pooled_h, pooled_w);
          output[o] = static_cast<scalar_t>(best_value);
          argmax[o] = best;
        }
      }
    }
  });
}

// Parallel over (image, channel), RoIs in index order: race-free and
// deterministic, as the average-mode backward.
template <typename scalar_t, typename acc_t>
void backward_max(const TapTable<acc_t>& table, const RoIGroups& groups,
                  const scalar_t* grad, const int32_t* argmax, acc_t* grad_input,
                  int64_t batch, const FeatureLayout& layout, int64_t pooled_h,
                  int64_t pooled_w) {
  const int64_t channels = layout.channels;
  const int64_t sy = layout.y_stride(), sx = layout.x_stride();
  // Channel-major units, as the average-mode backward.
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t c = unit / batch, b = unit % batch;
      acc_t* gin = grad_input + layout.channel_origin(b, c);
      for (int64_t i = groups.begin[b]; i < groups.begin[b + 1]; ++i) {
        const int64_t k = groups.order[i];
        const auto& g = table.geometry[k];
        const auto *ys = table.ys(k), *xs = table.xs(k);
        for (int64_t ph = 0; ph < pooled_h; ++ph) {
          for (int64_t pw = 0; pw < pooled_w; ++pw) {
            const int64_t o = layout.output_offset(k, c, ph, pw, pooled_h, pooled_w);
            const int32_t sample = argmax[o];
            // -1 (no sample) or a value that names no sample adds nothing.
            if (sample < 0 || sample >= g.grid_h * g.grid_w) continue;
            const AxisTap<acc_t> ty = ys[ph * g.grid_h + sample / g.grid_w];
            const AxisTap<acc_t> tx = xs[pw * g.grid_w + sample % g.grid_w];
            if (ty.outside() || tx.outside()) continue;
            const acc_t value = static_cast<acc_t>(grad[o]);
            gin[ty.low * sy + tx.low * sx] += value * ty.w_low * tx.w_low;
            gin[ty.low * sy + tx.high * sx] += value * ty.w_low * tx.w_high;
            gin[ty.high * sy + tx.low * sx] += value * ty.w_high * tx.w_low;
            gin[ty.high * sy + tx.high * sx] += value * ty.w_high * tx.w_high;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> roi_align_max_forward_cpu(
    const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
    int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  const char* op = "maskrcnn_ops::roi_align_max";
  check_roi_align_forward(op, input, rois, spatial_scale, pooled_h, pooled_w,
                          sampling_ratio);
  const auto spec = single_level_pyramid(input.size(1), input.size(2), input.size(3),
                                         spatial_scale, use_channels_last(input));
  const auto memory_format = memory_format_of(spec);
  const int64_t batch = input.size(0);
  at::Tensor output = at::empty({rois.size(0), spec.channels, pooled_h, pooled_w},
                                input.options().memory_format(memory_format));
  at::Tensor argmax = at::empty(output.sizes(),
                                input.options().dtype(at::kInt).memory_format(memory_format));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_max_forward_cpu",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto pyramid = spec.as<acc_t>();
        const at::Tensor rois_acc =
            rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
        const auto table = build_tap_table<acc_t>(op, rois_acc, batch, pyramid,
                                                  pooled_h, pooled_w,
                                                  sampling_ratio, aligned);
        if (output.numel() == 0) return;
        const at::Tensor input_c = input.contiguous(memory_format);
        forward_max<scalar_t, acc_t>(table, input_c.const_data_ptr<scalar_t>(),
                                     output.mutable_data_ptr<scalar_t>(),
                                     argmax.mutable_data_ptr<int32_t>(),
                                     pyramid.layout(0), pooled_h, pooled_w);
      });
  return {output, argmax};
}

at::Tensor roi_align_max_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                      const at::Tensor& argmax, double spatial_scale,
                                      int64_t pooled_h, int64_t pooled_w,
                                      int64_t batch, int64_t channels,
                                      int64_t height, int64_t width,
                                      int64_t sampling_ratio, bool aligned) {
  const char* op = "maskrcnn_ops::roi_align_max_backward";
  check_roi_align_backward(op, grad, rois, spatial_scale, pooled_h, pooled_w,
                           batch, channels, height, width, sampling_ratio);
  check_argmax(grad, argmax);
  const auto spec = single_level_pyramid(channels, height, width, spatial_scale,
                                         use_channels_last(grad));
  const auto memory_format = memory_format_of(spec);
  const auto acc_dtype = accumulate_dtype(grad.scalar_type());
  at::Tensor grad_input =
      at::empty({batch, channels, height, width},
                grad.options().dtype(acc_dtype).memory_format(memory_format))
          .zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_max_backward_cpu",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto pyramid = spec.as<acc_t>();
        const at::Tensor rois_acc = rois.to(acc_dtype).contiguous();
        const auto table = build_tap_table<acc_t>(op, rois_acc, batch, pyramid,
                                                  pooled_h, pooled_w,
                                                  sampling_ratio, aligned);
        if (grad_input.numel() == 0 || grad.numel() == 0) return;
        const at::Tensor grad_c = grad.contiguous(memory_format);
        const at::Tensor argmax_c = argmax.contiguous(memory_format);
        backward_max<scalar_t, acc_t>(table, group_rois(table, batch, 1),
                                      grad_c.const_data_ptr<scalar_t>(),
                                      argmax_c.const_data_ptr<int32_t>(),
                                      grad_input.mutable_data_ptr<acc_t>(), batch,
                                      pyramid.layout(0), pooled_h, pooled_w);
      });
  if (grad_input.scalar_type() != grad.scalar_type()) {
    grad_input = grad_input.to(grad.scalar_type());
  }
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  m.impl("roi_align", &roi_align_forward_cpu);
  m.impl("roi_align_backward", &roi_align_backward_cpu);
  m.impl("roi_align_max", &roi_align_max_forward_cpu);
  m.impl("roi_align_max_backward", &roi_align_max_backward_cpu);
  m.impl("multi_level_roi_align", &multi_level_roi_align_forward_cpu);
  m.impl("multi_level_roi_align_backward", &multi_level_roi_align_backward_cpu);
}

}  // namespace maskrcnn_ops
