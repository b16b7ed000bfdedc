// Box coding on CPU: decode (and its gradient), encode, and the RPN's fused
// decode + clip + small-box + score filter. The ops' host code is
// csrc/common/box_coder_ops.h and each row's math csrc/common/box_coder.h,
// shared with CUDA; here, the rows run in a parallel loop.
#include <ATen/Parallel.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/box_coder_ops.h"

namespace maskrcnn_ops {
namespace {

struct CpuBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  template <typename Row>
  static void run(const Row& row, int64_t n) {
    constexpr int64_t kGrain = 4096;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      // A local copy: stores through its output pointers cannot alias it, so
      // its fields stay in registers.
      const Row local = row;
      for (int64_t i = begin; i < end; ++i) local(i);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  m.impl("decode_boxes", &decode_boxes<CpuBackend>);
  m.impl("decode_boxes_backward", &decode_boxes_backward<CpuBackend>);
  m.impl("encode_boxes", &encode_boxes<CpuBackend>);
  m.impl("rpn_decode_filter", &rpn_decode_filter<CpuBackend>);
}

}  // namespace maskrcnn_ops
