// Mask pasting on CPU: the output starts zeroed, and one parallel loop over
// the D x height output rows computes the pixels of each mask's window (rows
// outside it are skipped), from the shared geometry and bilinear value of
// csrc/common/paste_math.h (which the CUDA kernel runs too). Each task takes
// consecutive rows, mostly of one mask, and computes that mask's window and
// column taps once.
//
// The output is mostly zeros (a few boxes in each whole image: 100 float
// masks of 800 x 1088 are 348 MB, of which the boxes cover a few percent).
// A large one is therefore taken as fresh anonymous pages, which read as
// zero until written: only the pages a window touches are faulted in and
// become resident; writing the zeros would fault in, clear and write every
// page (most of the op's time, and its whole size in resident memory).
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/paste_ops.h"
#include "../common/paste_math.h"

namespace maskrcnn_ops {
namespace {

// Output pixels below which a task is not worth a thread.
constexpr int64_t kPixelsPerTask = 32768;

// Outputs from this size on are mapped afresh (see the top of the file);
// smaller ones come from the allocator and are zeroed (a mapping costs two
// system calls and a fault per page written).
constexpr int64_t kFreshPagesMinBytes = int64_t(8) << 20;

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
      if (window.empty() || y < window.top || y >= window.bottom) continue;
      const PaddedMask<mask_t> mask{mask_data + n * side * side, side, padding};
      const PasteTap<acc_t> row_tap = paste_row_tap<acc_t>(window, y, source);
      for (int64_t x = window.left; x < window.right; ++x)
        row[x] = paste_store<out_t>(mask.template value<acc_t>(row_tap, col_taps[x - window.left]), cut);
    }
  });
}

struct CpuBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  // A zeroed output, contiguous: fresh pages from kFreshPagesMinBytes on.
  static at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef __linux__
    // Throws on a size that overflows, as the allocator's path does.
    const size_t bytes = at::detail::computeStorageNbytesContiguous(sizes, options.dtype().itemsize());
    if (bytes >= static_cast<size_t>(kFreshPagesMinBytes)) {
      void* pages = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (pages != MAP_FAILED) {
        const auto unmap = [bytes](void* p) { munmap(p, bytes); };
        return at::from_blob(pages, sizes, unmap, options);
      }
      // Out of address space or mappings: the allocator reports it as usual.
    }
#endif
    return at::zeros(sizes, options);
  }

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
