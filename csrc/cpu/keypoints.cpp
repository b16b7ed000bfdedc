// Keypoint decoding on CPU: one parallel loop over the D x K (RoI, keypoint)
// pairs. No resized map is ever formed: bicubic interpolation is separable,
// so each of a heatmap's H rows is interpolated along x once per output
// column (H x map_w values of scratch), and each output row then combines
// four of those rows (csrc/common/keypoint_math.h, which the CUDA kernel
// runs too: the same values, bit for bit) into a row buffer that is scanned
// for the first maximum. A task takes consecutive pairs, mostly of one RoI,
// and computes that RoI's taps once for its K keypoints.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/keypoint_math.h"
#include "../common/keypoint_ops.h"

namespace maskrcnn_ops {
namespace {

// Heatmap pixels below which a task is not worth a thread (the work of a
// pair grows with its box; the heatmap size is the typical scale of it).
constexpr int64_t kPixelsPerTask = 16384;

// One RoI's taps along both axes, for all its keypoints.
template <typename scalar_t, typename acc_t>
struct RoiTaps {
  KeypointBox<acc_t> box{};
  std::vector<CubicTaps<acc_t>> columns, rows;

  void compute(const acc_t* box_row, int64_t map_height, int64_t map_width) {
    box = keypoint_box(box_row);
    columns.resize(static_cast<size_t>(box.map_w));
    rows.resize(static_cast<size_t>(box.map_h));
    for (int64_t x = 0; x < box.map_w; ++x) columns[x] = cubic_taps<scalar_t, acc_t>(x, map_width, box.map_w);
    for (int64_t y = 0; y < box.map_h; ++y) rows[y] = cubic_taps<scalar_t, acc_t>(y, map_height, box.map_h);
  }
};

// Whether a row of resized values holds one above `best` or a NaN (only
// then is it scanned for the maximum): one branch-free pass, which the
// compiler vectorizes, instead of a compare-and-branch per pixel.
template <typename acc_t>
bool may_improve(const acc_t* line, int64_t count, acc_t best) {
  int found = 0;
  for (int64_t x = 0; x < count; ++x) found |= !(line[x] <= best);
  return found != 0;
}

// The first maximum of one heatmap [H, W] resized by `taps`: (value, flat
// index into the map_h x map_w map). scratch and line are reused buffers.
template <typename scalar_t, typename acc_t>
void resized_argmax(const scalar_t* map, int64_t height, int64_t width, const RoiTaps<scalar_t, acc_t>& taps,
                    std::vector<acc_t>& scratch, std::vector<acc_t>& line, acc_t& best, int64_t& best_index) {
  const int64_t out_w = taps.box.map_w, out_h = taps.box.map_h;
  scratch.resize(static_cast<size_t>(height * out_w));
  line.resize(static_cast<size_t>(out_w));
  for (int64_t y = 0; y < height; ++y) {
    const scalar_t* row = map + y * width;
    acc_t* out = scratch.data() + y * out_w;
    for (int64_t x = 0; x < out_w; ++x) out[x] = cubic_row(row, taps.columns[x]);
  }
  best_index = -1;
  for (int64_t y = 0; y < out_h; ++y) {
    const CubicTaps<acc_t>& ty = taps.rows[y];
    const acc_t* r0 = scratch.data() + ty.index[0] * out_w;
    const acc_t* r1 = scratch.data() + ty.index[1] * out_w;
    const acc_t* r2 = scratch.data() + ty.index[2] * out_w;
    const acc_t* r3 = scratch.data() + ty.index[3] * out_w;
    for (int64_t x = 0; x < out_w; ++x) line[x] = cubic_combine<scalar_t>(r0[x], r1[x], r2[x], r3[x], ty);
    if (best_index >= 0 && !may_improve(line.data(), out_w, best)) continue;
    for (int64_t x = 0; x < out_w; ++x) {
      const int64_t index = y * out_w + x;
      if (best_index < 0 || argmax_prefers(line[x], index, best, best_index)) {
        best = line[x];
        best_index = index;
      }
    }
    if (best != best) return;  // a NaN: no later pixel comes before it
  }
}

template <typename scalar_t>
void decode_keypoints(const at::Tensor& heatmaps, const at::Tensor& boxes, at::Tensor& keypoints,
                      at::Tensor& scores) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per_roi = heatmaps.size(1), height = heatmaps.size(2), width = heatmaps.size(3);
  const scalar_t* map_data = heatmaps.const_data_ptr<scalar_t>();
  const acc_t* box_data = boxes.const_data_ptr<acc_t>();
  acc_t* keypoint_data = keypoints.mutable_data_ptr<acc_t>();
  acc_t* score_data = scores.mutable_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, kPixelsPerTask / std::max<int64_t>(height * width, 1));
  at::parallel_for(0, scores.numel(), grain, [&](int64_t begin, int64_t end) {
    int64_t current = -1;
    RoiTaps<scalar_t, acc_t> taps;
    std::vector<acc_t> scratch, line;
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t n = pair / per_roi;
      if (n != current) {
        current = n;
        taps.compute(box_data + n * 4, height, width);
      }
      acc_t best = acc_t(0);
      int64_t best_index = 0;
      resized_argmax(map_data + pair * height * width, height, width, taps, scratch, line, best, best_index);
      const KeypointBox<acc_t>& box = taps.box;
      acc_t* out = keypoint_data + pair * 3;
      out[0] = keypoint_coordinate(best_index % box.map_w, box.width, box.map_w, box.x1);
      out[1] = keypoint_coordinate(best_index / box.map_w, box.height, box.map_h, box.y1);
      out[2] = acc_t(1);
      score_data[pair] = best;
    }
  });
}

struct CpuBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  template <typename scalar_t>
  static void run(const at::Tensor& heatmaps, const at::Tensor& boxes, at::Tensor& keypoints,
                  at::Tensor& scores) {
    decode_keypoints<scalar_t>(heatmaps, boxes, keypoints, scores);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  m.impl("heatmaps_to_keypoints", &heatmaps_to_keypoints<CpuBackend>);
}

}  // namespace maskrcnn_ops
