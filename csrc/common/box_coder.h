// Box coding (Faster R-CNN deltas) and the RPN's clip / small-box test, shared
// by the CPU and CUDA kernels. The arithmetic follows torchvision's
// BoxCoder.decode_single / encode_single operation by operation; everything
// runs in acc_t (float32 for half types, float64 for double).
#pragma once

#include <cmath>

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
MRO_HOST_DEVICE void decode_box(const acc_t* delta, const acc_t* box, BoxWeights<acc_t> w,
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
MRO_HOST_DEVICE void decode_box_backward(const acc_t* grad, const acc_t* delta, const acc_t* box,
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
MRO_HOST_DEVICE void encode_box(const acc_t* reference, const acc_t* proposal, BoxWeights<acc_t> w,
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
MRO_HOST_DEVICE void clip_box(acc_t* box, acc_t height, acc_t width) {
  const acc_t limit[4] = {width, height, width, height};
  for (int i = 0; i < 4; ++i) {
    if (box[i] < acc_t(0)) box[i] = acc_t(0);
    if (box[i] > limit[i]) box[i] = limit[i];
  }
}

// torchvision's remove_small_boxes test: both sides >= min_size.
template <typename acc_t>
MRO_HOST_DEVICE bool is_large_enough(const acc_t* box, acc_t min_size) {
  return (box[2] - box[0]) >= min_size && (box[3] - box[1]) >= min_size;
}

}  // namespace maskrcnn_ops
