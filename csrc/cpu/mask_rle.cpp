// COCO run-length encoding of pasted masks, straight from the M x M masks
// and their boxes: no H x W mask is ever formed. The image is scanned in
// column-major order (COCO's), a column at a time: columns outside the
// mask's window add `height` zeros to the current run at once; a column
// inside it adds the rows above the window as zeros, then each window pixel
// (the value csrc/common/paste_math.h gives, binarized at > threshold), then
// the rows below it. The runs (the first counts zeros, so it may be 0) are
// written as pycocotools' compressed string (rleToString). Masks are encoded
// in parallel, each by one thread, then concatenated.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../common/paste_ops.h"
#include "../common/paste_math.h"

namespace maskrcnn_ops {
namespace {

// The runs of a binary sequence fed in order, alternating from zeros.
class RunLengths {
 public:
  explicit RunLengths(std::vector<int64_t>& counts) : counts_(counts) { counts_.clear(); }

  void add(bool bit) {
    if (bit != value_) flip();
    ++run_;
  }
  void add_zeros(int64_t count) {
    if (count == 0) return;
    if (value_) flip();
    run_ += count;
  }
  // The last run (always written: an empty image has the one count 0).
  void finish() { counts_.push_back(run_); }

 private:
  void flip() {
    counts_.push_back(run_);
    run_ = 0;
    value_ = !value_;
  }

  std::vector<int64_t>& counts_;
  int64_t run_ = 0;
  bool value_ = false;
};

// pycocotools' compressed counts: each count from the third on is stored as
// its difference from the count two before (a run of zeros against the
// previous run of zeros, ones against ones), then as a signed variable-length
// integer of 5-bit groups, least significant first, each group a character
// 48 + (group | 0x20 when more follow). The last group of a number carries
// its sign in bit 4, so decoding can sign-extend it.
void append_compressed(const std::vector<int64_t>& counts, std::string& out) {
  for (size_t i = 0; i < counts.size(); ++i) {
    int64_t x = counts[i] - (i > 2 ? counts[i - 2] : 0);
    bool more = true;
    while (more) {
      int group = static_cast<int>(x & 0x1f);
      x >>= 5;  // arithmetic shift: negative numbers end at -1
      more = (group & 0x10) ? x != -1 : x != 0;
      if (more) group |= 0x20;
      out.push_back(static_cast<char>(group + 48));
    }
  }
}

template <typename mask_t>
void encode_mask(const PaddedMask<mask_t>& mask, const at::opmath_type<mask_t>* box, at::opmath_type<mask_t> scale,
                 at::opmath_type<mask_t> threshold, int64_t height, int64_t width, std::vector<int64_t>& counts,
                 std::vector<PasteTap<at::opmath_type<mask_t>>>& row_taps, std::string& out) {
  using acc_t = at::opmath_type<mask_t>;
  const int64_t source = mask.padded_side();
  const PasteWindow window = paste_window(box[0], box[1], box[2], box[3], scale, height, width);
  RunLengths runs(counts);
  if (window.empty()) {
    runs.add_zeros(height * width);
  } else {
    row_taps.resize(static_cast<size_t>(window.rows()));
    for (int64_t y = window.top; y < window.bottom; ++y)
      row_taps[y - window.top] = paste_row_tap<acc_t>(window, y, source);
    runs.add_zeros(window.left * height);
    for (int64_t x = window.left; x < window.right; ++x) {
      const PasteTap<acc_t> col_tap = paste_col_tap<acc_t>(window, x, source);
      runs.add_zeros(window.top);
      for (int64_t y = window.top; y < window.bottom; ++y)
        runs.add(paste_store<bool>(mask.template value<acc_t>(row_taps[y - window.top], col_tap), threshold));
      runs.add_zeros(height - window.bottom);
    }
    runs.add_zeros((width - window.right) * height);
  }
  runs.finish();
  append_compressed(counts, out);
}

std::tuple<at::Tensor, at::Tensor> masks_to_rle_cpu(const at::Tensor& masks, const at::Tensor& boxes,
                                                    int64_t height, int64_t width, int64_t padding,
                                                    double threshold) {
  const char* op = "maskrcnn_ops::masks_to_rle";
  check_paste_args(op, masks, boxes, height, width, padding);
  check_threshold(op, threshold);
  const int64_t num = masks.size(0), side = masks.size(1);
  std::vector<std::string> strings(static_cast<size_t>(num));
  const at::Tensor m = masks.contiguous();
  const at::Tensor b = boxes.to(accumulate_dtype(masks.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "masks_to_rle", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* mask_data = m.const_data_ptr<scalar_t>();
    const acc_t* box_data = b.const_data_ptr<acc_t>();
    const acc_t scale = paste_scale<acc_t>(side, padding);
    at::parallel_for(0, num, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> counts;
      std::vector<PasteTap<acc_t>> row_taps;
      for (int64_t n = begin; n < end; ++n) {
        const PaddedMask<scalar_t> mask{mask_data + n * side * side, side, padding};
        encode_mask(mask, box_data + n * 4, scale, static_cast<acc_t>(threshold), height, width, counts,
                    row_taps, strings[n]);
      }
    });
  });
  at::Tensor offsets = at::empty({num + 1}, masks.options().device(at::kCPU).dtype(at::kLong));
  int64_t* offset = offsets.mutable_data_ptr<int64_t>();
  offset[0] = 0;
  for (int64_t n = 0; n < num; ++n) offset[n + 1] = offset[n] + static_cast<int64_t>(strings[n].size());
  at::Tensor chars = at::empty({offset[num]}, offsets.options().dtype(at::kByte));
  uint8_t* data = chars.mutable_data_ptr<uint8_t>();
  for (int64_t n = 0; n < num; ++n) std::memcpy(data + offset[n], strings[n].data(), strings[n].size());
  return {chars, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  m.impl("masks_to_rle", &masks_to_rle_cpu);
}

}  // namespace maskrcnn_ops
