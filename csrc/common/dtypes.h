// The dtypes the ops take and the precision they compute in, for the host
// code of every op (CPU and CUDA). Host-only.
#pragma once

#include <c10/core/ScalarType.h>

namespace maskrcnn_ops {

// Feature-like tensors (RoIAlign features and gradients, box deltas).
inline bool is_supported_feature_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf ||
         t == c10::kBFloat16;
}

// Accumulation dtype: float64 for double inputs, float32 otherwise (the
// dtype of at::opmath_type for the supported dtypes).
inline c10::ScalarType accumulate_dtype(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

}  // namespace maskrcnn_ops
