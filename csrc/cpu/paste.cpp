// Mask pasting on CPU: one parallel loop over the D x height output rows.
// A row outside its mask's window is zeroed; a row inside it is zeroed left
// and right of the window and computed in between, from the shared geometry
// and bilinear value of csrc/common/paste_math.h (which the CUDA kernel
// runs too). So every output byte is written once, and the interpolation
// runs only on the boxes' visible pixels. Each task takes consecutive rows,
// mostly of one mask, and computes that mask's window and column taps once.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/paste_ops.h"
#include "../common/paste_math.h"

namespace maskrcnn_ops {
namespace {

// Output pixels below which a task is not worth a thread.
constexpr int64_t kPixelsPerTask = 32768;

template <typename mask_t, typename out_t>
void paste_rows(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out, int64_t padding,
                double threshold) {
  using acc_t = at::opmath_type<mask_t>;
  const int64_t height = out.size(1), width = out.size(2), side = masks.size(1);
  const int64_t source = side + 2 * padding;
  const acc_t scale = paste_scale<acc_t>(side, padding);
  const acc_t cut = static_cast<acc_t>(threshold);
  const mask_t* mask_data = masks.const_data_ptr<mask_t>();
  const acc_t* box_data = boxes.const_data_ptr<acc_t>();
  out_t* out_data = out.mutable_data_ptr<out_t>();
  const int64_t rows = out.size(0) * height;
  const int64_t grain = std::max<int64_t>(1, kPixelsPerTask / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    int64_t current = -1;
    PasteWindow window{};
    std::vector<PasteTap<acc_t>> col_taps;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / height, y = r % height;
      out_t* row = out_data + r * width;
      if (n != current) {
        current = n;
        const acc_t* b = box_data + n * 4;
        window = paste_window(b[0], b[1], b[2], b[3], scale, height, width);
        col_taps.resize(static_cast<size_t>(window.cols()));
        for (int64_t x = window.left; x < window.left + window.cols(); ++x)
          col_taps[x - window.left] = paste_col_tap<acc_t>(window, x, source);
      }
      if (window.empty() || y < window.top || y >= window.bottom) {
        std::fill(row, row + width, out_t(0));
        continue;
      }
      const PaddedMask<mask_t> mask{mask_data + n * side * side, side, padding};
      const PasteTap<acc_t> row_tap = paste_row_tap<acc_t>(window, y, source);
      std::fill(row, row + window.left, out_t(0));
      for (int64_t x = window.left; x < window.right; ++x)
        row[x] = paste_store<out_t>(mask.template value<acc_t>(row_tap, col_taps[x - window.left]), cut);
      std::fill(row + window.right, row + width, out_t(0));
    }
  });
}

struct CpuBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static constexpr bool kZeroFirst = false;  // paste_rows writes every pixel

  template <typename mask_t, typename out_t>
  static void run(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out, int64_t padding,
                  double threshold) {
    paste_rows<mask_t, out_t>(masks, boxes, out, padding, threshold);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  m.impl("paste_masks", &paste_masks<CpuBackend>);
}

}  // namespace maskrcnn_ops
