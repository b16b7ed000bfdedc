// Box coding (Faster R-CNN deltas) and the RPN's clip / small-box test, shared
// by the CPU and CUDA kernels. The arithmetic follows torchvision's
// BoxCoder.decode_single / encode_single operation by operation; everything
// runs in acc_t (float32 for half types, float64 for double).
//
// At the end, one row (box) of each op as a function object: the CPU kernels
// call it in a parallel loop and the CUDA kernel (csrc/cuda/launch.cuh's
// rows_kernel) once per thread, so both run the same row code.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace maskrcnn_ops {

template <typename acc_t>
struct BoxWeights {
  acc_t wx, wy, ww, wh;
};

// Decodes deltas (dx, dy, dw, dh) relative to box (x1, y1, x2, y2); dw and dh
// (after division by their weights) are clamped from above at `clip` so that
// exp() cannot overflow. Writes (x1, y1, x2, y2).
template <typename acc_t>
MRO_HOST_DEVICE_ALWAYS_INLINE void decode_box(const acc_t* delta, const acc_t* box, BoxWeights<acc_t> w,
                                acc_t clip, acc_t* out) {
  const acc_t width = box[2] - box[0];
  const acc_t height = box[3] - box[1];
  const acc_t ctr_x = box[0] + acc_t(0.5) * width;
  const acc_t ctr_y = box[1] + acc_t(0.5) * height;
  const acc_t dx = delta[0] / w.wx;
  const acc_t dy = delta[1] / w.wy;
  // torch.clamp(max=clip) keeps NaN; `min_of` would not, hence the test.
  acc_t dw = delta[2] / w.ww;
  acc_t dh = delta[3] / w.wh;
  if (dw > clip) dw = clip;
  if (dh > clip) dh = clip;
  const acc_t pred_ctr_x = dx * width + ctr_x;
  const acc_t pred_ctr_y = dy * height + ctr_y;
  const acc_t half_w = acc_t(0.5) * (exp_of(dw) * width);
  const acc_t half_h = acc_t(0.5) * (exp_of(dh) * height);
  out[0] = pred_ctr_x - half_w;
  out[1] = pred_ctr_y - half_h;
  out[2] = pred_ctr_x + half_w;
  out[3] = pred_ctr_y + half_h;
}

// Gradient of decode_box's outputs (g[0..3]) with respect to the deltas.
// The clamp passes the gradient where the scaled delta is below clip; at and
// above it the gradient is zero, as torch.clamp(max=clip) gives.
template <typename acc_t>
MRO_HOST_DEVICE_ALWAYS_INLINE void decode_box_backward(const acc_t* grad, const acc_t* delta, const acc_t* box,
                                         BoxWeights<acc_t> w, acc_t clip, acc_t* grad_delta) {
  const acc_t width = box[2] - box[0];
  const acc_t height = box[3] - box[1];
  const acc_t dw = delta[2] / w.ww;
  const acc_t dh = delta[3] / w.wh;
  // x1 = cx - hw, x2 = cx + hw with cx = dx/wx*width + ..., hw = exp(dw)*width/2
  grad_delta[0] = (grad[0] + grad[2]) * width / w.wx;
  grad_delta[1] = (grad[1] + grad[3]) * height / w.wy;
  const acc_t half_w = acc_t(0.5) * (exp_of(dw > clip ? clip : dw) * width);
  const acc_t half_h = acc_t(0.5) * (exp_of(dh > clip ? clip : dh) * height);
  grad_delta[2] = dw < clip ? (grad[2] - grad[0]) * half_w / w.ww : acc_t(0);
  grad_delta[3] = dh < clip ? (grad[3] - grad[1]) * half_h / w.wh : acc_t(0);
}

// Regression targets of `reference` (ground truth) relative to `proposal`,
// as torchvision's encode_boxes.
template <typename acc_t>
MRO_HOST_DEVICE_ALWAYS_INLINE void encode_box(const acc_t* reference, const acc_t* proposal, BoxWeights<acc_t> w,
                                acc_t* out) {
  const acc_t ex_w = proposal[2] - proposal[0];
  const acc_t ex_h = proposal[3] - proposal[1];
  const acc_t ex_ctr_x = proposal[0] + acc_t(0.5) * ex_w;
  const acc_t ex_ctr_y = proposal[1] + acc_t(0.5) * ex_h;
  const acc_t gt_w = reference[2] - reference[0];
  const acc_t gt_h = reference[3] - reference[1];
  const acc_t gt_ctr_x = reference[0] + acc_t(0.5) * gt_w;
  const acc_t gt_ctr_y = reference[1] + acc_t(0.5) * gt_h;
  out[0] = w.wx * (gt_ctr_x - ex_ctr_x) / ex_w;
  out[1] = w.wy * (gt_ctr_y - ex_ctr_y) / ex_h;
  out[2] = w.ww * log_of(gt_w / ex_w);
  out[3] = w.wh * log_of(gt_h / ex_h);
}

// torchvision's clip_boxes_to_image: x into [0, width], y into [0, height]
// (clamp keeps NaN).
template <typename acc_t>
MRO_HOST_DEVICE_ALWAYS_INLINE void clip_box(acc_t* box, acc_t height, acc_t width) {
  const acc_t limit[4] = {width, height, width, height};
  for (int i = 0; i < 4; ++i) {
    if (box[i] < acc_t(0)) box[i] = acc_t(0);
    if (box[i] > limit[i]) box[i] = limit[i];
  }
}

// torchvision's remove_small_boxes test: both sides >= min_size.
template <typename acc_t>
MRO_HOST_DEVICE_ALWAYS_INLINE bool is_large_enough(const acc_t* box, acc_t min_size) {
  return (box[2] - box[0]) >= min_size && (box[3] - box[1]) >= min_size;
}

// ------------------------------------------------------------------- rows --
//
// Row i of each op: values stored as scalar_t (the op's dtype) are loaded
// into acc_t, and results rounded to scalar_t on the store. Tensors that the
// host has already converted to acc_t (boxes, anchors, scores, image sizes:
// they keep their own precision, as in torchvision) are read as they are.

template <typename scalar_t, typename acc_t>
MRO_HOST_DEVICE_ALWAYS_INLINE void load4(const scalar_t* p, acc_t* out) {
  for (int k = 0; k < 4; ++k) out[k] = static_cast<acc_t>(p[k]);
}

template <typename scalar_t, typename acc_t>
MRO_HOST_DEVICE_ALWAYS_INLINE void store4(const acc_t* v, scalar_t* p) {
  for (int k = 0; k < 4; ++k) p[k] = static_cast<scalar_t>(v[k]);
}

// decode_boxes: deltas [K, 4 * C] (row i: box i / C, class i % C) relative
// to boxes [K, 4].
template <typename scalar_t, typename acc_t>
struct DecodeRow {
  const scalar_t* deltas;
  const acc_t* boxes;
  scalar_t* out;  // [K, 4 * C]
  int64_t classes;
  BoxWeights<acc_t> w;
  acc_t clip;

  MRO_HOST_DEVICE_ALWAYS_INLINE void operator()(int64_t i) const {
    acc_t delta[4], box[4];
    load4(deltas + 4 * i, delta);
    decode_box(delta, boxes + 4 * (i / classes), w, clip, box);
    store4(box, out + 4 * i);
  }
};

// decode_boxes_backward: the gradient of decode_boxes with respect to deltas.
template <typename scalar_t, typename acc_t>
struct DecodeBackwardRow {
  const scalar_t* grad;  // [K, 4 * C], in deltas's dtype
  const scalar_t* deltas;
  const acc_t* boxes;
  scalar_t* out;
  int64_t classes;
  BoxWeights<acc_t> w;
  acc_t clip;

  MRO_HOST_DEVICE_ALWAYS_INLINE void operator()(int64_t i) const {
    acc_t delta[4], g[4], result[4];
    load4(deltas + 4 * i, delta);
    load4(grad + 4 * i, g);
    decode_box_backward(g, delta, boxes + 4 * (i / classes), w, clip, result);
    store4(result, out + 4 * i);
  }
};

// encode_boxes: targets of reference [K, 4] relative to proposals [K, 4].
template <typename scalar_t, typename acc_t>
struct EncodeRow {
  const scalar_t* reference;
  const acc_t* proposals;
  scalar_t* out;
  BoxWeights<acc_t> w;

  MRO_HOST_DEVICE_ALWAYS_INLINE void operator()(int64_t i) const {
    acc_t ref[4], target[4];
    load4(reference + 4 * i, ref);
    encode_box(ref, proposals + 4 * i, w, target);
    store4(target, out + 4 * i);
  }
};

// rpn_decode_filter: decode against the anchor, clip to the image, and the
// keep flag (large enough and scored at least score_thresh). Rows [N * M]:
// image i / per_image.
template <typename scalar_t, typename acc_t>
struct RpnDecodeFilterRow {
  const scalar_t* deltas;  // [N, M, 4]
  const acc_t* anchors;    // [N, M, 4]
  const acc_t* scores;     // [N, M]
  const acc_t* image_hw;   // [N, 2] (height, width)
  scalar_t* boxes;         // [N, M, 4]
  bool* keep;              // [N, M]
  int64_t per_image;
  BoxWeights<acc_t> w;
  acc_t clip, min_size, score_thresh;

  MRO_HOST_DEVICE_ALWAYS_INLINE void operator()(int64_t i) const {
    const int64_t image = i / per_image;
    acc_t delta[4], box[4];
    load4(deltas + 4 * i, delta);
    decode_box(delta, anchors + 4 * i, w, clip, box);
    // Round to the output dtype, clip, round again: the unfused path (decode,
    // then clip_boxes_to_image, then remove_small_boxes) clips the stored
    // boxes and tests the clipped ones as stored, so the fused one gives the
    // same boxes and flags in every dtype.
    for (int k = 0; k < 4; ++k) box[k] = static_cast<acc_t>(static_cast<scalar_t>(box[k]));
    clip_box(box, image_hw[2 * image], image_hw[2 * image + 1]);
    for (int k = 0; k < 4; ++k) box[k] = static_cast<acc_t>(static_cast<scalar_t>(box[k]));
    store4(box, boxes + 4 * i);
    keep[i] = is_large_enough(box, min_size) && scores[i] >= score_thresh;
  }
};

}  // namespace maskrcnn_ops
