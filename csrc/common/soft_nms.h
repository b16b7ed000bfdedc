// The score decay of soft-NMS (Bodla et al. 2017), shared by the CPU and CUDA
// kernels: when a box is kept, every box still in play has its score
// multiplied by decay(IoU with the kept box). Computed in acc_t (float32,
// float64 for float64 inputs; dtypes.h), with the IoU of box_iou.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "box_iou.h"
#include "host_device.h"

namespace maskrcnn_ops {

// exp(x) for x <= 0, written out so that the CPU and CUDA kernels compute the
// same bits (the libraries' exp differ by an ulp, which could order two
// decayed scores differently) and so that the CPU's decay loop vectorizes
// (a call to the C library's exp does not). x = k ln2 + r with k the nearest
// integer to x / ln2 (the 1.5 * 2^mantissa trick, exact without FP
// contraction, which setup.py turns off), ln2 split in two so k ln2 is exact;
// exp(r) on |r| <= ln2 / 2 by its Taylor polynomial (degree 7 for float,
// truncation error < 0.2 ulp; 13 for double, < 0.1 ulp), times 2^k built
// from its bits. Within about 2 ulp of exp. Results below the smallest
// normal number are 0.
template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  using bits_t = int32_t;
  static constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f,
                         kLn2Lo = 1.42860682030941723212e-6f, kRound = 12582912.0f, kMin = -87.3f;
  static constexpr int kMantissa = 23, kBias = 127, kDegree = 7;
};
template <>
struct ExpConstants<double> {
  using bits_t = int64_t;
  static constexpr double kLog2e = 1.4426950408889634, kLn2Hi = 6.93147180369123816490e-01,
                          kLn2Lo = 1.90821492927058770002e-10, kRound = 6755399441055744.0,
                          kMin = -708.0;
  static constexpr int kMantissa = 52, kBias = 1023, kDegree = 13;
};

template <typename T>
MRO_HOST_DEVICE T from_bits(typename ExpConstants<T>::bits_t bits) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(T) == 4) {
    return __int_as_float(bits);
  } else {
    return __longlong_as_double(bits);
  }
#else
  T value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

template <typename T>
MRO_HOST_DEVICE T exp_nonpositive(T x) {
  using C = ExpConstants<T>;
  using bits_t = typename C::bits_t;
  const T xc = max_of(x, C::kMin);  // also -inf: clamped, then 0 below
  const T k = (xc * C::kLog2e + C::kRound) - C::kRound;
  const T r = (xc - k * C::kLn2Hi) - k * C::kLn2Lo;
  // Horner: 1 + r (1 + r/2 (1 + r/3 (... (1 + r/degree)))).
  T p = T(1);
  // 1 / d is a constant after unrolling (correctly rounded on both sides).
  for (int d = C::kDegree; d >= 1; --d) p = T(1) + (r * p) * (T(1) / T(d));
  const T scale = from_bits<T>((static_cast<bits_t>(k) + C::kBias) << C::kMantissa);
  // Times 0 or 1 rather than a select (here and in SoftNmsDecay): g++
  // rewrites a product with a select into a select of products, conditional
  // FP operations it then will not vectorize (they may trap). Exact: y is
  // finite.
  return (p * scale) * static_cast<T>(x > C::kMin);
}

// The methods, as the schema's `method` string names them.
enum class SoftNmsMethod : int { kLinear = 0, kGaussian = 1 };

template <typename acc_t>
struct SoftNmsDecay {
  SoftNmsMethod method;
  acc_t iou_threshold;  // linear only: decay where IoU >= iou_threshold
  acc_t sigma;          // gaussian only: > 0

  // The IoU the decay sees: box_iou clamped to [0, 1], NaN (a NaN or
  // infinite coordinate, two zero-area boxes) as 0. So a non-finite box
  // decays nothing and is never decayed, and a weight is never negative
  // (rounding can put an IoU a hair above 1).
  static MRO_HOST_DEVICE acc_t overlap(acc_t iou) {
    // min_of(NaN, 1) is 1, finite, so the product is exact (see exp_nonpositive).
    return min_of(iou, acc_t(1)) * static_cast<acc_t>(iou > acc_t(0));
  }

  // The factor of a score for an overlap in [0, 1] (1 for overlap 0 with
  // either method, so callers may skip non-overlapping boxes):
  //   linear:   1 - overlap where overlap >= iou_threshold, else 1;
  //   gaussian: exp(-overlap^2 / sigma), for every box.
  template <SoftNmsMethod M>
  MRO_HOST_DEVICE acc_t weight_of(acc_t overlap) const {
    if constexpr (M == SoftNmsMethod::kLinear) {
      // 1 - overlap where overlap >= iou_threshold, else 1 - 0 (see exp_nonpositive).
      return acc_t(1) - overlap * static_cast<acc_t>(overlap >= iou_threshold);
    } else {
      return exp_nonpositive(-(overlap * overlap) / sigma);
    }
  }
  MRO_HOST_DEVICE acc_t weight(acc_t overlap) const {
    return method == SoftNmsMethod::kLinear ? weight_of<SoftNmsMethod::kLinear>(overlap)
                                            : weight_of<SoftNmsMethod::kGaussian>(overlap);
  }
};

// The score threshold as the kernels compare it: the smallest acc_t not
// below the double threshold, so `score >= at_least_as<acc_t>(t)` in acc_t
// equals `double(score) >= t` exactly. Host-only.
template <typename acc_t>
inline acc_t at_least_as(double threshold) {
  acc_t t = static_cast<acc_t>(threshold);
  if (static_cast<double>(t) < threshold)
    t = std::nextafter(t, std::numeric_limits<acc_t>::infinity());
  return t;
}

}  // namespace maskrcnn_ops
