// RoIAlign forward and backward on CPU.
//
// Both directions first build a tap table: per RoI, the geometry and the
// per-axis bilinear taps of every sample row and column (csrc/common). The
// tables are tiny (a few hundred taps per RoI) and are reused across all
// channels, so the inner loops only load, multiply and add.
//
// Forward: parallel over RoIs. NCHW walks channel planes and contracts each
// sample row along x first; NHWC accumulates whole channel vectors per tap
// (contiguous, auto-vectorized).
// Backward: parallel over (image, channel block) units, each visiting the RoIs
// of its image in index order, so no two threads write the same element and
// the summation order is fixed: the result is bitwise reproducible regardless
// of thread count, which makes it deterministic without a slower variant.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "../common/roi_align_checks.h"
#include "../common/roi_align_math.h"

namespace maskrcnn_ops {
namespace {

template <typename acc_t>
struct TapTable {
  std::vector<RoIAlignGeometry<acc_t>> geometry;  // [K]
  std::vector<int64_t> y_begin;                   // [K + 1] into y_taps
  std::vector<int64_t> x_begin;                   // [K + 1] into x_taps
  std::vector<AxisTap<acc_t>> y_taps;  // per RoI: [pooled_h][grid_h]
  std::vector<AxisTap<acc_t>> x_taps;  // per RoI: [pooled_w][grid_w]
};

template <typename acc_t>
TapTable<acc_t> build_tap_table(const char* op, const at::Tensor& rois_acc,
                                int64_t batch_size, int64_t height,
                                int64_t width, double spatial_scale,
                                int64_t pooled_h, int64_t pooled_w,
                                int64_t sampling_ratio, bool aligned) {
  const int64_t num_rois = rois_acc.size(0);
  const acc_t* rois = rois_acc.const_data_ptr<acc_t>();
  TapTable<acc_t> table;
  table.geometry.resize(num_rois);
  at::parallel_for(0, num_rois, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      table.geometry[k] = roi_geometry<acc_t>(
          rois + k * 5, batch_size, height, width,
          static_cast<acc_t>(spatial_scale), pooled_h, pooled_w,
          sampling_ratio, aligned);
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

// RoIs grouped by image, each group in increasing RoI index.
struct RoIsByImage {
  std::vector<int64_t> order;  // RoI indices sorted by (image, index)
  std::vector<int64_t> begin;  // [batch + 1] into order
};

template <typename acc_t>
RoIsByImage group_rois_by_image(const TapTable<acc_t>& table, int64_t batch) {
  RoIsByImage groups;
  groups.begin.assign(batch + 1, 0);
  for (const auto& g : table.geometry) groups.begin[g.batch_index + 1]++;
  for (int64_t b = 0; b < batch; ++b) groups.begin[b + 1] += groups.begin[b];
  groups.order.resize(table.geometry.size());
  std::vector<int64_t> next(groups.begin.begin(), groups.begin.end() - 1);
  for (int64_t k = 0; k < static_cast<int64_t>(table.geometry.size()); ++k)
    groups.order[next[table.geometry[k].batch_index]++] = k;
  return groups;
}

// ---------------------------------------------------------------- forward --

// Requests the cache lines of the rows an upcoming channel block will read,
// so the DRAM latency of one block overlaps the arithmetic of the previous
// one. NCHW RoIAlign is otherwise latency-bound: each channel plane is a
// separate region of memory and the hardware prefetchers do not follow the
// short, scattered row segments.
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* plane0, int64_t plane, int channels,
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

// One RoI, CB channels at once, in two steps: (1) contract every distinct
// row along x into one value per output column (the x taps are loaded once
// for CB channels); (2) blend the contracted rows with the y weights. Rows
// shared by several samples are contracted once.
template <int CB, typename scalar_t, typename acc_t>
inline void pool_nchw_block(const RoIAlignGeometry<acc_t>& g,
                            const AxisTap<acc_t>* ys, const AxisTap<acc_t>* xs,
                            const RoIRows& r, const scalar_t* in_c,
                            int64_t plane, int64_t width, int64_t pooled_h,
                            int64_t pooled_w, acc_t* row_sums,
                            scalar_t* out_c) {
  const int64_t num_rows = static_cast<int64_t>(r.rows.size());
  // row_sums: [num_rows][pooled_w][CB]
  for (int64_t slot = 0; slot < num_rows; ++slot) {
    const scalar_t* row = in_c + r.rows[slot] * width;
    for (int64_t pw = 0; pw < pooled_w; ++pw) {
      acc_t sum[CB] = {};
      const AxisTap<acc_t>* tx = xs + pw * g.grid_w;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const int64_t xl = tx[ix].low, xh = tx[ix].high;
        const acc_t wl = tx[ix].w_low, wh = tx[ix].w_high;
        for (int j = 0; j < CB; ++j)
          sum[j] += wl * static_cast<acc_t>(row[j * plane + xl]) +
                    wh * static_cast<acc_t>(row[j * plane + xh]);
      }
      acc_t* dst = row_sums + (slot * pooled_w + pw) * CB;
      for (int j = 0; j < CB; ++j) dst[j] = sum[j];
    }
  }
  // Blend: for each output row, an AXPY of whole contracted rows (all
  // columns and channels at once, contiguous, vectorized).
  const int64_t out_plane = pooled_h * pooled_w;
  const int64_t span = pooled_w * CB;
  acc_t* bins = row_sums + num_rows * span;  // scratch of `span` values
  const acc_t inv_count = acc_t(1) / g.count;
  for (int64_t ph = 0; ph < pooled_h; ++ph) {
    std::fill(bins, bins + span, acc_t(0));
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const int64_t t = ph * g.grid_h + iy;
      const acc_t* lo = row_sums + r.slot_low[t] * span;
      const acc_t* hi = row_sums + r.slot_high[t] * span;
      const acc_t wl = ys[t].w_low, wh = ys[t].w_high;
      for (int64_t i = 0; i < span; ++i) bins[i] += wl * lo[i] + wh * hi[i];
    }
    for (int64_t pw = 0; pw < pooled_w; ++pw)
      for (int j = 0; j < CB; ++j)
        out_c[j * out_plane + ph * pooled_w + pw] =
            static_cast<scalar_t>(bins[pw * CB + j] * inv_count);
  }
}

// NCHW forward, channel-block-major: each task takes a block of channels and
// runs every RoI over it. A block of one image's planes (kBlock x H x W, 3.5
// MB for 16 x 200 x 272 float32) stays in the last-level cache while the
// RoIs, which overlap heavily, read it, so the feature map comes from DRAM
// about once instead of once per RoI.
template <typename scalar_t, typename acc_t>
void forward_nchw(const TapTable<acc_t>& table, const RoIsByImage& groups,
                  const scalar_t* input, scalar_t* output, int64_t channels,
                  int64_t height, int64_t width, int64_t pooled_h,
                  int64_t pooled_w) {
  constexpr int kBlock = 16;
  const int64_t num_rois = static_cast<int64_t>(table.geometry.size());
  const int64_t plane = height * width;
  const int64_t out_plane = pooled_h * pooled_w;
  std::vector<RoIRows> rows(num_rois);
  at::parallel_for(0, num_rois, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      collect_rows(table.y_taps.data() + table.y_begin[k],
                   table.y_begin[k + 1] - table.y_begin[k], rows[k]);
  });
  const int64_t blocks = (channels + kBlock - 1) / kBlock;
  // With few channel blocks, also split the RoIs so every thread has work.
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(num_rois, (2 * at::get_num_threads() + blocks - 1) / blocks));
  at::parallel_for(0, blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row_sums;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t block = unit / chunks, chunk = unit % chunks;
      const int64_t first = chunk * num_rois / chunks;
      const int64_t last = (chunk + 1) * num_rois / chunks;
      const int64_t c0 = block * kBlock;
      const int64_t nc = std::min<int64_t>(kBlock, channels - c0);
      auto prefetch = [&](int64_t k) {
        const auto& g = table.geometry[k];
        if (g.grid_h == 0 || g.grid_w == 0) return;
        const AxisTap<acc_t>* xs = table.x_taps.data() + table.x_begin[k];
        const int64_t num_x = table.x_begin[k + 1] - table.x_begin[k];
        prefetch_rows(input + (g.batch_index * channels + c0) * plane, plane,
                      static_cast<int>(nc), rows[k].rows, width, xs[0].low,
                      xs[num_x - 1].high);
      };
      const auto& order = groups.order;
      if (first < last) prefetch(order[first]);
      for (int64_t i = first; i < last; ++i) {
        const int64_t k = order[i];
        if (i + 1 < last) prefetch(order[i + 1]);
        const auto& g = table.geometry[k];
        scalar_t* out = output + (k * channels + c0) * out_plane;
        if (g.grid_h == 0 || g.grid_w == 0) {
          std::fill(out, out + nc * out_plane, scalar_t(0));
          continue;
        }
        const AxisTap<acc_t>* ys = table.y_taps.data() + table.y_begin[k];
        const AxisTap<acc_t>* xs = table.x_taps.data() + table.x_begin[k];
        const scalar_t* in = input + (g.batch_index * channels + c0) * plane;
        row_sums.resize((rows[k].rows.size() + 1) * pooled_w * kBlock);
        if (nc == kBlock) {
          pool_nchw_block<kBlock>(g, ys, xs, rows[k], in, plane, width,
                                  pooled_h, pooled_w, row_sums.data(), out);
        } else {
          for (int64_t j = 0; j < nc; ++j)
            pool_nchw_block<1>(g, ys, xs, rows[k], in + j * plane, plane, width,
                               pooled_h, pooled_w, row_sums.data(),
                               out + j * out_plane);
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_nhwc(const TapTable<acc_t>& table, const scalar_t* input,
                  scalar_t* output, int64_t channels, int64_t height,
                  int64_t width, int64_t pooled_h, int64_t pooled_w) {
  const int64_t num_rois = static_cast<int64_t>(table.geometry.size());
  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(channels);
    for (int64_t k = begin; k < end; ++k) {
      const auto& g = table.geometry[k];
      const AxisTap<acc_t>* ys = table.y_taps.data() + table.y_begin[k];
      const AxisTap<acc_t>* xs = table.x_taps.data() + table.x_begin[k];
      const scalar_t* in_b = input + g.batch_index * height * width * channels;
      for (int64_t ph = 0; ph < pooled_h; ++ph) {
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int iy = 0; iy < g.grid_h; ++iy) {
            const AxisTap<acc_t> ty = ys[ph * g.grid_h + iy];
            for (int ix = 0; ix < g.grid_w; ++ix) {
              const AxisTap<acc_t> tx = xs[pw * g.grid_w + ix];
              const acc_t w1 = ty.w_low * tx.w_low, w2 = ty.w_low * tx.w_high;
              const acc_t w3 = ty.w_high * tx.w_low, w4 = ty.w_high * tx.w_high;
              const scalar_t* p1 = in_b + (ty.low * width + tx.low) * channels;
              const scalar_t* p2 = in_b + (ty.low * width + tx.high) * channels;
              const scalar_t* p3 = in_b + (ty.high * width + tx.low) * channels;
              const scalar_t* p4 = in_b + (ty.high * width + tx.high) * channels;
              acc_t* a = acc.data();
              for (int64_t c = 0; c < channels; ++c) {
                a[c] += w1 * static_cast<acc_t>(p1[c]) +
                        w2 * static_cast<acc_t>(p2[c]) +
                        w3 * static_cast<acc_t>(p3[c]) +
                        w4 * static_cast<acc_t>(p4[c]);
              }
            }
          }
          scalar_t* out = output + ((k * pooled_h + ph) * pooled_w + pw) * channels;
          for (int64_t c = 0; c < channels; ++c)
            out[c] = static_cast<scalar_t>(acc[c] / g.count);
        }
      }
    }
  });
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                 double spatial_scale, int64_t pooled_h,
                                 int64_t pooled_w, int64_t sampling_ratio,
                                 bool aligned) {
  check_roi_align_forward(input, rois, spatial_scale, pooled_h, pooled_w,
                          sampling_ratio);
  const bool channels_last = use_channels_last(input);
  const auto memory_format = channels_last ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous;
  const int64_t num_rois = rois.size(0);
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  at::Tensor output =
      at::empty({num_rois, channels, pooled_h, pooled_w},
                input.options().memory_format(memory_format));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cpu",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor rois_acc =
            rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
        const auto table = build_tap_table<acc_t>(
            "maskrcnn_ops::roi_align", rois_acc, batch, height, width,
            spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
        // Built even for empty outputs, so invalid batch indices are always
        // reported.
        if (output.numel() == 0) return;
        const at::Tensor input_c = input.contiguous(memory_format);
        const scalar_t* in = input_c.const_data_ptr<scalar_t>();
        scalar_t* out = output.mutable_data_ptr<scalar_t>();
        if (channels_last) {
          forward_nhwc<scalar_t, acc_t>(table, in, out, channels, height, width,
                                        pooled_h, pooled_w);
        } else {
          forward_nchw<scalar_t, acc_t>(table, group_rois_by_image(table, batch),
                                        in, out, channels, height, width,
                                        pooled_h, pooled_w);
        }
      });
  return output;
}

// --------------------------------------------------------------- backward --

template <typename scalar_t, typename acc_t>
void backward_nchw(const TapTable<acc_t>& table, const RoIsByImage& groups,
                   const scalar_t* grad, acc_t* grad_input, int64_t batch,
                   int64_t channels, int64_t height, int64_t width,
                   int64_t pooled_h, int64_t pooled_w) {
  const int64_t plane = height * width;
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / channels, c = unit % channels;
      acc_t* gin = grad_input + unit * plane;
      for (int64_t i = groups.begin[b]; i < groups.begin[b + 1]; ++i) {
        const int64_t k = groups.order[i];
        const auto& g = table.geometry[k];
        const AxisTap<acc_t>* ys = table.y_taps.data() + table.y_begin[k];
        const AxisTap<acc_t>* xs = table.x_taps.data() + table.x_begin[k];
        const scalar_t* grad_kc = grad + (k * channels + c) * pooled_h * pooled_w;
        for (int64_t ph = 0; ph < pooled_h; ++ph) {
          for (int64_t pw = 0; pw < pooled_w; ++pw) {
            const acc_t gbin =
                static_cast<acc_t>(grad_kc[ph * pooled_w + pw]) / g.count;
            const AxisTap<acc_t>* tx = xs + pw * g.grid_w;
            for (int iy = 0; iy < g.grid_h; ++iy) {
              const AxisTap<acc_t> ty = ys[ph * g.grid_h + iy];
              acc_t* lo = gin + ty.low * width;
              acc_t* hi = gin + ty.high * width;
              const acc_t g_lo = gbin * ty.w_low, g_hi = gbin * ty.w_high;
              for (int ix = 0; ix < g.grid_w; ++ix) {
                lo[tx[ix].low] += g_lo * tx[ix].w_low;
                lo[tx[ix].high] += g_lo * tx[ix].w_high;
                hi[tx[ix].low] += g_hi * tx[ix].w_low;
                hi[tx[ix].high] += g_hi * tx[ix].w_high;
              }
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_nhwc(const TapTable<acc_t>& table, const RoIsByImage& groups,
                   const scalar_t* grad, acc_t* grad_input, int64_t batch,
                   int64_t channels, int64_t height, int64_t width,
                   int64_t pooled_h, int64_t pooled_w) {
  // Channel blocks keep the per-tap vector loop long while giving every
  // thread work even for a single image.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (channels + kBlock - 1) / kBlock;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gbin(kBlock);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / blocks;
      const int64_t c0 = (unit % blocks) * kBlock;
      const int64_t nc = std::min(kBlock, channels - c0);
      acc_t* gin_b = grad_input + b * height * width * channels + c0;
      for (int64_t i = groups.begin[b]; i < groups.begin[b + 1]; ++i) {
        const int64_t k = groups.order[i];
        const auto& g = table.geometry[k];
        const AxisTap<acc_t>* ys = table.y_taps.data() + table.y_begin[k];
        const AxisTap<acc_t>* xs = table.x_taps.data() + table.x_begin[k];
        for (int64_t ph = 0; ph < pooled_h; ++ph) {
          for (int64_t pw = 0; pw < pooled_w; ++pw) {
            const scalar_t* grad_bin =
                grad + ((k * pooled_h + ph) * pooled_w + pw) * channels + c0;
            for (int64_t c = 0; c < nc; ++c)
              gbin[c] = static_cast<acc_t>(grad_bin[c]) / g.count;
            for (int iy = 0; iy < g.grid_h; ++iy) {
              const AxisTap<acc_t> ty = ys[ph * g.grid_h + iy];
              for (int ix = 0; ix < g.grid_w; ++ix) {
                const AxisTap<acc_t> tx = xs[pw * g.grid_w + ix];
                const acc_t w[4] = {ty.w_low * tx.w_low, ty.w_low * tx.w_high,
                                    ty.w_high * tx.w_low,
                                    ty.w_high * tx.w_high};
                const int64_t pos[4] = {ty.low * width + tx.low,
                                        ty.low * width + tx.high,
                                        ty.high * width + tx.low,
                                        ty.high * width + tx.high};
                // Corners may coincide at the border, so they are applied one
                // after another rather than fused into one loop.
                for (int corner = 0; corner < 4; ++corner) {
                  acc_t* dst = gin_b + pos[corner] * channels;
                  const acc_t wc = w[corner];
                  for (int64_t c = 0; c < nc; ++c) dst[c] += wc * gbin[c];
                }
              }
            }
          }
        }
      }
    }
  });
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h,
                                  int64_t pooled_w, int64_t batch,
                                  int64_t channels, int64_t height,
                                  int64_t width, int64_t sampling_ratio,
                                  bool aligned) {
  check_roi_align_backward(grad, rois, spatial_scale, pooled_h, pooled_w, batch,
                           channels, height, width, sampling_ratio);
  const bool channels_last = use_channels_last(grad);
  const auto memory_format = channels_last ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous;
  const auto acc_dtype = accumulate_dtype(grad.scalar_type());
  // Half types accumulate into a float32 buffer and are rounded once at the end.
  // (at::zeros would drop the memory format from the options.)
  at::Tensor grad_input =
      at::empty({batch, channels, height, width},
                grad.options().dtype(acc_dtype).memory_format(memory_format))
          .zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor rois_acc = rois.to(acc_dtype).contiguous();
        const auto table = build_tap_table<acc_t>(
            "maskrcnn_ops::roi_align_backward", rois_acc, batch, height, width,
            spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
        if (grad_input.numel() == 0 || grad.numel() == 0) return;
        const auto groups = group_rois_by_image(table, batch);
        const at::Tensor grad_c = grad.contiguous(memory_format);
        const scalar_t* g = grad_c.const_data_ptr<scalar_t>();
        acc_t* gin = grad_input.mutable_data_ptr<acc_t>();
        if (channels_last) {
          backward_nhwc<scalar_t, acc_t>(table, groups, g, gin, batch, channels,
                                         height, width, pooled_h, pooled_w);
        } else {
          backward_nchw<scalar_t, acc_t>(table, groups, g, gin, batch, channels,
                                         height, width, pooled_h, pooled_w);
        }
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
}

}  // namespace maskrcnn_ops
