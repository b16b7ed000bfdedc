// Box coding on CUDA: one thread per box. The ops' host code is
// csrc/common/box_coder_ops.h and each row's math csrc/common/box_coder.h,
// shared with the CPU kernels (which the CPU tests check); here, the rows run
// as csrc/cuda/launch.cuh's rows_kernel on the current stream.
// rpn_decode_filter fuses the RPN's decode, clip, small-box and score tests
// and writes keep flags instead of compacting, so nothing waits on the host.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/box_coder_ops.h"
#include "launch.cuh"

namespace maskrcnn_ops {
namespace {

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;

  template <typename Row>
  static void run(const Row& row, int64_t n) {
    launch_rows(current_stream_launch(), row, n);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  m.impl("decode_boxes", &decode_boxes<CudaBackend>);
  m.impl("decode_boxes_backward", &decode_boxes_backward<CudaBackend>);
  m.impl("encode_boxes", &encode_boxes<CudaBackend>);
  m.impl("rpn_decode_filter", &rpn_decode_filter<CudaBackend>);
}

}  // namespace maskrcnn_ops
