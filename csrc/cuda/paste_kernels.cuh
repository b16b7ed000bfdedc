// The mask pasting CUDA kernel and its launch sequence, free of ATen so that
// the same source also compiles as host C++ under tests/cuda_emulation/
// (the test suite runs it there against the CPU kernel). The per-pixel math
// is csrc/common/paste_math.h, the CPU kernel's. The host code that checks,
// allocates and zeroes the output lives in paste.cu.
//
// One launch: kSlicesPerMask blocks per mask (a grid-stride loop over
// (mask, slice) when there are more than the grid holds). Each block computes
// its mask's window from the box, then its slice's share of the window's
// pixels, one thread per pixel, row-major so that neighbouring threads write
// neighbouring addresses. Pixels outside the windows are never touched: the
// caller zeroes the output first.
#pragma once

#include <cstdint>

#include "../common/paste_math.h"
#include "launch.cuh"

namespace maskrcnn_ops {
namespace {

constexpr int64_t kSlicesPerMask = 8;

template <typename mask_t, typename out_t, typename acc_t>
struct PasteArgs {
  const mask_t* masks;  // [num, side, side]
  const acc_t* boxes;   // [num, 4]
  out_t* out;           // [num, height, width], zero outside the windows
  int64_t num, side, padding, height, width;
  acc_t threshold;      // for a bool output
};

template <typename mask_t, typename out_t, typename acc_t>
__global__ void paste_kernel(PasteArgs<mask_t, out_t, acc_t> args) {
  const int64_t source = args.side + 2 * args.padding;
  const acc_t scale = paste_scale<acc_t>(args.side, args.padding);
  for (int64_t block = blockIdx.x; block < args.num * kSlicesPerMask; block += gridDim.x) {
    const int64_t n = block / kSlicesPerMask, slice = block % kSlicesPerMask;
    const acc_t* b = args.boxes + n * 4;
    const PasteWindow window = paste_window(b[0], b[1], b[2], b[3], scale, args.height, args.width);
    const int64_t cols = window.cols(), pixels = window.rows() * cols;
    const PaddedMask<mask_t> mask{args.masks + n * args.side * args.side, args.side, args.padding};
    out_t* plane = args.out + n * args.height * args.width;
    const int64_t step = kSlicesPerMask * static_cast<int64_t>(blockDim.x);
    for (int64_t i = slice * blockDim.x + threadIdx.x; i < pixels; i += step) {
      const int64_t y = window.top + i / cols, x = window.left + i % cols;
      const acc_t value = mask.template value<acc_t>(paste_row_tap<acc_t>(window, y, source),
                                                     paste_col_tap<acc_t>(window, x, source));
      plane[y * args.width + x] = paste_store<out_t>(value, args.threshold);
    }
  }
}

template <typename Launch, typename mask_t, typename out_t, typename acc_t>
void launch_paste(const Launch& launch, const PasteArgs<mask_t, out_t, acc_t>& args) {
  if (args.num == 0 || args.height == 0 || args.width == 0) return;
  launch(grid_size(args.num * kSlicesPerMask * kThreads), kThreads, paste_kernel<mask_t, out_t, acc_t>, args);
}

}  // namespace
}  // namespace maskrcnn_ops
