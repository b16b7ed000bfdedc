// The dtypes the ops take and the precision they compute in, for the host
// code of every op (CPU and CUDA). Host-only.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

namespace maskrcnn_ops {

// Feature-like tensors (RoIAlign features and gradients, box deltas).
inline bool is_supported_feature_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf ||
         t == c10::kBFloat16;
}

// Accumulation dtype: float64 for double inputs, float32 otherwise. Host
// code that converts tensors asks this; kernels templated on scalar_t use
// at::opmath_type<scalar_t>, which the asserts below hold to the same answer.
constexpr c10::ScalarType accumulate_dtype(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

namespace detail {
template <typename scalar_t>
constexpr bool accumulates_as_opmath() {
  return accumulate_dtype(c10::CppTypeToScalarType<scalar_t>::value) ==
         c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
}
static_assert(accumulates_as_opmath<float>() && accumulates_as_opmath<double>() &&
                  accumulates_as_opmath<c10::Half>() && accumulates_as_opmath<c10::BFloat16>(),
              "accumulate_dtype must agree with at::opmath_type");
}  // namespace detail

}  // namespace maskrcnn_ops
