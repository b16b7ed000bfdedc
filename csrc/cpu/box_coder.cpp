// Box coding on CPU: decode (and its gradient), encode, and the RPN's fused
// decode + clip + small-box + score filter. Elementwise over boxes, the math
// in csrc/common/box_coder.h, parallel over rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "../common/box_coder.h"
#include "../common/box_coder_checks.h"

namespace maskrcnn_ops {
namespace {

constexpr int64_t kGrain = 4096;

template <typename scalar_t, typename acc_t>
inline void load4(const scalar_t* p, acc_t* out) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<acc_t>(p[i]);
}

template <typename scalar_t, typename acc_t>
inline void store4(const acc_t* v, scalar_t* p) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<scalar_t>(v[i]);
}

at::Tensor decode_boxes_cpu(const at::Tensor& deltas, const at::Tensor& boxes,
                            c10::ArrayRef<double> weights, double clip) {
  const char* op = "maskrcnn_ops::decode_boxes";
  check_decode_args(op, deltas, boxes);
  const at::Tensor d = deltas.contiguous();
  at::Tensor out = at::empty_like(d);
  const int64_t classes = d.size(1) / 4, rows = d.size(0) * classes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "decode_boxes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = check_box_weights<acc_t>(op, weights);
    const at::Tensor b = boxes.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t delta[4], box[4];
        load4(dp + 4 * i, delta);
        decode_box(delta, bp + 4 * (i / classes), w, static_cast<acc_t>(clip), box);
        store4(box, op_ + 4 * i);
      }
    });
  });
  return out;
}

at::Tensor decode_boxes_backward_cpu(const at::Tensor& grad, const at::Tensor& deltas,
                                     const at::Tensor& boxes, c10::ArrayRef<double> weights,
                                     double clip) {
  const char* op = "maskrcnn_ops::decode_boxes_backward";
  check_decode_backward_args(op, grad, deltas, boxes);
  const at::Tensor d = deltas.contiguous();
  const at::Tensor g = grad.to(d.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(d);
  const int64_t classes = d.size(1) / 4, rows = d.size(0) * classes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "decode_boxes_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = check_box_weights<acc_t>(op, weights);
    const at::Tensor b = boxes.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t delta[4], gr[4], result[4];
        load4(dp + 4 * i, delta);
        load4(gp + 4 * i, gr);
        decode_box_backward(gr, delta, bp + 4 * (i / classes), w, static_cast<acc_t>(clip), result);
        store4(result, op_ + 4 * i);
      }
    });
  });
  return out;
}

at::Tensor encode_boxes_cpu(const at::Tensor& reference, const at::Tensor& proposals,
                            c10::ArrayRef<double> weights) {
  const char* op = "maskrcnn_ops::encode_boxes";
  check_encode_args(op, reference, proposals);
  const at::Tensor r = reference.contiguous();
  at::Tensor out = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "encode_boxes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = check_box_weights<acc_t>(op, weights);
    // Proposals keep their precision (read as acc_t), as in torchvision.
    const at::Tensor p = proposals.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const acc_t* pp = p.const_data_ptr<acc_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, r.size(0), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t ref[4], target[4];
        load4(rp + 4 * i, ref);
        encode_box(ref, pp + 4 * i, w, target);
        store4(target, op_ + 4 * i);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rpn_decode_filter_cpu(
    const at::Tensor& deltas, const at::Tensor& anchors, const at::Tensor& scores,
    const at::Tensor& image_sizes, c10::ArrayRef<double> weights, double clip, double min_size,
    double score_thresh) {
  const char* op = "maskrcnn_ops::rpn_decode_filter";
  check_rpn_filter_args(op, deltas, anchors, scores, image_sizes);
  const at::Tensor d = deltas.contiguous();
  at::Tensor boxes = at::empty_like(d);
  at::Tensor keep = at::empty({d.size(0), d.size(1)}, d.options().dtype(at::kBool));
  const int64_t per_image = d.size(1), rows = d.size(0) * per_image;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "rpn_decode_filter", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto w = check_box_weights<acc_t>(op, weights);
    const at::Tensor a = anchors.to(acc_dtype).contiguous();
    const at::Tensor s = scores.to(acc_dtype).contiguous();
    const at::Tensor hw = image_sizes.to(acc_dtype).contiguous();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    const acc_t* sp = s.const_data_ptr<acc_t>();
    const acc_t* hwp = hw.const_data_ptr<acc_t>();
    scalar_t* bp = boxes.mutable_data_ptr<scalar_t>();
    bool* kp = keep.mutable_data_ptr<bool>();
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t image = i / per_image;
        acc_t delta[4], box[4];
        load4(dp + 4 * i, delta);
        decode_box(delta, ap + 4 * i, w, static_cast<acc_t>(clip), box);
        // Rounded to the output dtype first, as the unfused path filters the
        // stored boxes.
        for (int k = 0; k < 4; ++k) box[k] = static_cast<acc_t>(static_cast<scalar_t>(box[k]));
        clip_box(box, hwp[2 * image], hwp[2 * image + 1]);
        for (int k = 0; k < 4; ++k) box[k] = static_cast<acc_t>(static_cast<scalar_t>(box[k]));
        store4(box, bp + 4 * i);
        kp[i] = is_large_enough(box, static_cast<acc_t>(min_size)) &&
                sp[i] >= static_cast<acc_t>(score_thresh);
      }
    });
  });
  return {boxes, keep};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  m.impl("decode_boxes", &decode_boxes_cpu);
  m.impl("decode_boxes_backward", &decode_boxes_backward_cpu);
  m.impl("encode_boxes", &encode_boxes_cpu);
  m.impl("rpn_decode_filter", &rpn_decode_filter_cpu);
}

}  // namespace maskrcnn_ops
