// The box-coding CUDA kernels (one thread per box; the math is
// csrc/common/box_coder.h), free of ATen so that the same source also
// compiles as host C++ under tests/cuda_emulation/, where a serial grid
// emulator runs them against the CPU kernels. The host code lives in
// box_coder.cu.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/box_coder.h"

namespace maskrcnn_ops {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t rows) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((rows + kThreads - 1) / kThreads, 1 << 20)));
}

#define MRO_GRID_STRIDE(i, n)                                                          \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load4(const scalar_t* p, acc_t* out) {
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = static_cast<acc_t>(p[i]);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store4(const acc_t* v, scalar_t* p) {
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = static_cast<scalar_t>(v[i]);
}

template <typename scalar_t, typename acc_t>
__global__ void decode_kernel(const scalar_t* __restrict__ deltas, const acc_t* __restrict__ boxes,
                              scalar_t* __restrict__ out, int64_t rows, int64_t classes,
                              BoxWeights<acc_t> w, acc_t clip) {
  MRO_GRID_STRIDE(i, rows) {
    acc_t delta[4], box[4];
    load4(deltas + 4 * i, delta);
    decode_box(delta, boxes + 4 * (i / classes), w, clip, box);
    store4(box, out + 4 * i);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void decode_backward_kernel(const scalar_t* __restrict__ grad,
                                       const scalar_t* __restrict__ deltas,
                                       const acc_t* __restrict__ boxes, scalar_t* __restrict__ out,
                                       int64_t rows, int64_t classes, BoxWeights<acc_t> w,
                                       acc_t clip) {
  MRO_GRID_STRIDE(i, rows) {
    acc_t delta[4], g[4], result[4];
    load4(deltas + 4 * i, delta);
    load4(grad + 4 * i, g);
    decode_box_backward(g, delta, boxes + 4 * (i / classes), w, clip, result);
    store4(result, out + 4 * i);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void encode_kernel(const scalar_t* __restrict__ reference,
                              const acc_t* __restrict__ proposals, scalar_t* __restrict__ out,
                              int64_t rows, BoxWeights<acc_t> w) {
  MRO_GRID_STRIDE(i, rows) {
    acc_t ref[4], target[4];
    load4(reference + 4 * i, ref);
    encode_box(ref, proposals + 4 * i, w, target);
    store4(target, out + 4 * i);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void rpn_decode_filter_kernel(const scalar_t* __restrict__ deltas,
                                         const acc_t* __restrict__ anchors,
                                         const acc_t* __restrict__ scores,
                                         const acc_t* __restrict__ image_hw,
                                         scalar_t* __restrict__ boxes, bool* __restrict__ keep,
                                         int64_t rows, int64_t per_image, BoxWeights<acc_t> w,
                                         acc_t clip, acc_t min_size, acc_t score_thresh) {
  MRO_GRID_STRIDE(i, rows) {
    const int64_t image = i / per_image;
    acc_t delta[4], box[4];
    load4(deltas + 4 * i, delta);
    decode_box(delta, anchors + 4 * i, w, clip, box);
#pragma unroll
    for (int k = 0; k < 4; ++k) box[k] = static_cast<acc_t>(static_cast<scalar_t>(box[k]));
    clip_box(box, image_hw[2 * image], image_hw[2 * image + 1]);
#pragma unroll
    for (int k = 0; k < 4; ++k) box[k] = static_cast<acc_t>(static_cast<scalar_t>(box[k]));
    store4(box, boxes + 4 * i);
    keep[i] = is_large_enough(box, min_size) && scores[i] >= score_thresh;
  }
}

}  // namespace
}  // namespace maskrcnn_ops
