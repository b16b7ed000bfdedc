// Keypoint decoding on CUDA: one launch of keypoints_kernels.cuh (a block
// per (RoI, keypoint) pair, a block argmax with the first index among
// equals), with csrc/common/keypoint_math.h's bicubic values (the CPU
// kernel's). No host sync, no resized map.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/keypoint_ops.h"
#include "keypoints_kernels.cuh"

namespace maskrcnn_ops {
namespace {

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;

  template <typename scalar_t>
  static void run(const at::Tensor& heatmaps, const at::Tensor& boxes, at::Tensor& keypoints,
                  at::Tensor& scores) {
    using acc_t = at::opmath_type<scalar_t>;
    launch_keypoints(current_stream_launch(),
                     KeypointArgs<scalar_t, acc_t>{heatmaps.const_data_ptr<scalar_t>(), boxes.const_data_ptr<acc_t>(),
                                                   keypoints.mutable_data_ptr<acc_t>(),
                                                   scores.mutable_data_ptr<acc_t>(), heatmaps.size(0),
                                                   heatmaps.size(1), heatmaps.size(2), heatmaps.size(3)});
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  m.impl("heatmaps_to_keypoints", &heatmaps_to_keypoints<CudaBackend>);
}

}  // namespace maskrcnn_ops
