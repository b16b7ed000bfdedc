// Mask pasting on CUDA: the output is zeroed (one memset), then one launch
// of paste_kernels.cuh computes the pixels inside the boxes' windows, with
// csrc/common/paste_math.h's geometry and bilinear value (the CPU kernel's).
// No host sync. masks_to_rle has no CUDA kernel: its Python wrapper moves the
// M x M masks and the boxes to the CPU (maskrcnn_ops/paste_ops.py).
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/paste_ops.h"
#include "paste_kernels.cuh"

namespace maskrcnn_ops {
namespace {

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;
  static at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::zeros(sizes, options);  // one memset; the kernel writes the windows only
  }

  template <typename mask_t, typename out_t>
  static void run(const at::Tensor& masks, const at::Tensor& boxes, at::Tensor& out, int64_t padding,
                  double threshold) {
    using acc_t = at::opmath_type<mask_t>;
    launch_paste(current_stream_launch(),
                 PasteArgs<mask_t, out_t, acc_t>{masks.const_data_ptr<mask_t>(), boxes.const_data_ptr<acc_t>(),
                                                 out.mutable_data_ptr<out_t>(), out.size(0), masks.size(1),
                                                 padding, out.size(1), out.size(2),
                                                 static_cast<acc_t>(threshold)});
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  m.impl("paste_masks", &paste_masks<CudaBackend>);
}

}  // namespace maskrcnn_ops
