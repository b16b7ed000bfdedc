// Box coding on CUDA: one thread per box, the math in csrc/common/box_coder.h
// (the code the CPU tests check). rpn_decode_filter fuses the RPN's decode,
// clip, small-box and score tests and writes keep flags instead of
// compacting, so nothing waits on the host.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common/box_coder.h"
#include "../common/box_coder_checks.h"
#include "box_coder_kernels.cuh"

namespace maskrcnn_ops {
namespace {

at::Tensor decode_boxes_cuda(const at::Tensor& deltas, const at::Tensor& boxes,
                             c10::ArrayRef<double> weights, double clip) {
  const char* op = "maskrcnn_ops::decode_boxes";
  check_decode_args(op, deltas, boxes);
  const c10::cuda::CUDAGuard guard(deltas.device());
  const at::Tensor d = deltas.contiguous();
  at::Tensor out = at::empty_like(d);
  const int64_t classes = d.size(1) / 4, rows = d.size(0) * classes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "decode_boxes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = check_box_weights<acc_t>(op, weights);
    if (rows == 0) return;  // weights checked; a zero-size grid cannot launch
    const at::Tensor b = boxes.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    decode_kernel<scalar_t, acc_t><<<blocks_for(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        d.const_data_ptr<scalar_t>(), b.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
        rows, classes, w, static_cast<acc_t>(clip));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor decode_boxes_backward_cuda(const at::Tensor& grad, const at::Tensor& deltas,
                                      const at::Tensor& boxes, c10::ArrayRef<double> weights,
                                      double clip) {
  const char* op = "maskrcnn_ops::decode_boxes_backward";
  check_decode_backward_args(op, grad, deltas, boxes);
  const c10::cuda::CUDAGuard guard(deltas.device());
  const at::Tensor d = deltas.contiguous();
  const at::Tensor g = grad.to(d.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(d);
  const int64_t classes = d.size(1) / 4, rows = d.size(0) * classes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "decode_boxes_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = check_box_weights<acc_t>(op, weights);
    if (rows == 0) return;  // weights checked; a zero-size grid cannot launch
    const at::Tensor b = boxes.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    decode_backward_kernel<scalar_t, acc_t>
        <<<blocks_for(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            g.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), b.const_data_ptr<acc_t>(),
            out.mutable_data_ptr<scalar_t>(), rows, classes, w, static_cast<acc_t>(clip));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor encode_boxes_cuda(const at::Tensor& reference, const at::Tensor& proposals,
                             c10::ArrayRef<double> weights) {
  const char* op = "maskrcnn_ops::encode_boxes";
  check_encode_args(op, reference, proposals);
  const c10::cuda::CUDAGuard guard(reference.device());
  const at::Tensor r = reference.contiguous();
  at::Tensor out = at::empty_like(r);
  const int64_t rows = r.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "encode_boxes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = check_box_weights<acc_t>(op, weights);
    if (rows == 0) return;  // weights checked; a zero-size grid cannot launch
    const at::Tensor p = proposals.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    encode_kernel<scalar_t, acc_t><<<blocks_for(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        r.const_data_ptr<scalar_t>(), p.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
        rows, w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rpn_decode_filter_cuda(
    const at::Tensor& deltas, const at::Tensor& anchors, const at::Tensor& scores,
    const at::Tensor& image_sizes, c10::ArrayRef<double> weights, double clip, double min_size,
    double score_thresh) {
  const char* op = "maskrcnn_ops::rpn_decode_filter";
  check_rpn_filter_args(op, deltas, anchors, scores, image_sizes);
  const c10::cuda::CUDAGuard guard(deltas.device());
  const at::Tensor d = deltas.contiguous();
  at::Tensor boxes = at::empty_like(d);
  at::Tensor keep = at::empty({d.size(0), d.size(1)}, d.options().dtype(at::kBool));
  const int64_t per_image = d.size(1), rows = d.size(0) * per_image;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "rpn_decode_filter", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto w = check_box_weights<acc_t>(op, weights);
    if (rows == 0) return;  // weights checked; a zero-size grid cannot launch
    const at::Tensor a = anchors.to(acc_dtype).contiguous();
    const at::Tensor s = scores.to(acc_dtype).contiguous();
    const at::Tensor hw = image_sizes.to(acc_dtype).contiguous();
    rpn_decode_filter_kernel<scalar_t, acc_t>
        <<<blocks_for(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            d.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(),
            hw.const_data_ptr<acc_t>(), boxes.mutable_data_ptr<scalar_t>(),
            keep.mutable_data_ptr<bool>(), rows, per_image, w, static_cast<acc_t>(clip),
            static_cast<acc_t>(min_size), static_cast<acc_t>(score_thresh));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {boxes, keep};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  m.impl("decode_boxes", &decode_boxes_cuda);
  m.impl("decode_boxes_backward", &decode_boxes_backward_cuda);
  m.impl("encode_boxes", &encode_boxes_cuda);
  m.impl("rpn_decode_filter", &rpn_decode_filter_cuda);
}

}  // namespace maskrcnn_ops
