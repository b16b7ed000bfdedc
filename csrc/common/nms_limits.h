// The bound on the boxes of one CUDA NMS launch sequence, where a call can be
// split: the suppression mask is quadratic in the boxes of a launch
// (N * ceil(N / 64) 8-byte words: 50 MiB here, 3.2 GB for 160k boxes) and the
// reduction walks them serially. nms_keep_rows launches over groups of whole
// rows of at most this many boxes; Python callers of the other NMS ops group
// whole images by it (maskrcnn_ops.NMS_BOXES_PER_CALL, read from _C).
#pragma once

#include <cstdint>

namespace maskrcnn_ops {

constexpr int64_t kNmsBoxesPerCall = 20480;

}  // namespace maskrcnn_ops
