// The box-coding ops' host code, written once for both backends: checks,
// the dtype and layout each tensor is read in, and the row each op runs
// (csrc/common/box_coder.h). A backend (csrc/cpu/box_coder.cpp,
// csrc/cuda/box_coder.cu) supplies
//   Backend::Guard        made from the inputs' device (CUDA: a device guard)
//   Backend::run(row, n)  row(i) for every i in [0, n): a parallel loop on
//                         CPU, a kernel launch on CUDA
// and registers decode_boxes<Backend> and the others as its kernels.
// Host-only.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/ArrayRef.h>

#include <tuple>

#include "box_coder.h"
#include "box_coder_checks.h"

namespace maskrcnn_ops {

// Tensor t in acc_t's dtype, contiguous.
template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// decode_boxes (grad undefined) or its backward: a row per (box, class) of
// deltas [K, 4 * C] against boxes [K, 4], out in deltas's shape and dtype.
template <typename Backend>
at::Tensor decode_rows(const char* op, const at::Tensor& grad, const at::Tensor& deltas,
                       const at::Tensor& boxes, c10::ArrayRef<double> weights, double clip) {
  const typename Backend::Guard guard(deltas.device());
  const at::Tensor d = deltas.contiguous();
  at::Tensor out = at::empty_like(d);
  const int64_t classes = d.size(1) / 4, rows = d.size(0) * classes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "decode_boxes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = check_box_weights<acc_t>(op, weights);
    const at::Tensor b = as_acc<acc_t>(boxes);
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    if (!grad.defined()) {
      Backend::run(DecodeRow<scalar_t, acc_t>{dp, bp, outp, classes, w, static_cast<acc_t>(clip)}, rows);
      return;
    }
    const at::Tensor g = grad.to(d.scalar_type()).contiguous();
    Backend::run(DecodeBackwardRow<scalar_t, acc_t>{g.const_data_ptr<scalar_t>(), dp, bp, outp, classes, w,
                                                    static_cast<acc_t>(clip)},
                 rows);
  });
  return out;
}

template <typename Backend>
at::Tensor decode_boxes(const at::Tensor& deltas, const at::Tensor& boxes,
                        c10::ArrayRef<double> weights, double clip) {
  const char* op = "maskrcnn_ops::decode_boxes";
  check_decode_args(op, deltas, boxes);
  return decode_rows<Backend>(op, at::Tensor(), deltas, boxes, weights, clip);
}

template <typename Backend>
at::Tensor decode_boxes_backward(const at::Tensor& grad, const at::Tensor& deltas,
                                 const at::Tensor& boxes, c10::ArrayRef<double> weights,
                                 double clip) {
  const char* op = "maskrcnn_ops::decode_boxes_backward";
  check_decode_backward_args(op, grad, deltas, boxes);
  return decode_rows<Backend>(op, grad, deltas, boxes, weights, clip);
}

template <typename Backend>
at::Tensor encode_boxes(const at::Tensor& reference, const at::Tensor& proposals,
                        c10::ArrayRef<double> weights) {
  const char* op = "maskrcnn_ops::encode_boxes";
  check_encode_args(op, reference, proposals);
  const typename Backend::Guard guard(reference.device());
  const at::Tensor r = reference.contiguous();
  at::Tensor out = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "encode_boxes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = check_box_weights<acc_t>(op, weights);
    // Proposals keep their precision (read as acc_t), as in torchvision.
    const at::Tensor p = as_acc<acc_t>(proposals);
    Backend::run(EncodeRow<scalar_t, acc_t>{r.const_data_ptr<scalar_t>(), p.const_data_ptr<acc_t>(),
                                            out.mutable_data_ptr<scalar_t>(), w},
                 r.size(0));
  });
  return out;
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> rpn_decode_filter(const at::Tensor& deltas, const at::Tensor& anchors,
                                                     const at::Tensor& scores,
                                                     const at::Tensor& image_sizes,
                                                     c10::ArrayRef<double> weights, double clip,
                                                     double min_size, double score_thresh) {
  const char* op = "maskrcnn_ops::rpn_decode_filter";
  check_rpn_filter_args(op, deltas, anchors, scores, image_sizes);
  const typename Backend::Guard guard(deltas.device());
  const at::Tensor d = deltas.contiguous();
  at::Tensor boxes = at::empty_like(d);
  at::Tensor keep = at::empty({d.size(0), d.size(1)}, d.options().dtype(at::kBool));
  const int64_t per_image = d.size(1), rows = d.size(0) * per_image;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "rpn_decode_filter", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = check_box_weights<acc_t>(op, weights);
    const at::Tensor a = as_acc<acc_t>(anchors);
    const at::Tensor s = as_acc<acc_t>(scores);
    const at::Tensor hw = as_acc<acc_t>(image_sizes);
    Backend::run(RpnDecodeFilterRow<scalar_t, acc_t>{d.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(),
                                                     s.const_data_ptr<acc_t>(), hw.const_data_ptr<acc_t>(),
                                                     boxes.mutable_data_ptr<scalar_t>(),
                                                     keep.mutable_data_ptr<bool>(), per_image, w,
                                                     static_cast<acc_t>(clip), static_cast<acc_t>(min_size),
                                                     static_cast<acc_t>(score_thresh)},
                 rows);
  });
  return {boxes, keep};
}

}  // namespace maskrcnn_ops
