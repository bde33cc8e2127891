// Scalar maths of HarMA's focal-weighted hinge (SPEC §1), shared by the CPU and the CUDA kernels so
// both compute every element with the same operations in the same order.
//
//   c      = (margin + s) - diag          (same association as the eager reference)
//   valid  = !masked && c >= 0            (masked: same id / the positive pair; c < 0: clamped away)
//   f(c)   = W(c)·c,  W(c) = (1 - e^-c)^gamma
//   f'(c)  = W(c) + c·gamma·(1 - e^-c)^(gamma-1)·e^-c
//
// Conventions where the eager autograd of the reference is 0·inf (documented in ops/triplet.py):
//   * c == 0 exactly (unmasked): f = 0 and f'(0) = lim_{c→0+} f'(c) = 0 for gamma > 0, and
//     f'(0) = 1 for gamma == 0 (f(c) = c; this is also what eager autograd gives, clamp passes c >= 0);
//   * 1 - e^-c rounding to 0 for a tiny c > 0 with gamma < 1: the second term is taken as its limit 0.
// The reference's autograd gives NaN in those two cases when 0 < gamma < 1; we give the limit.
//
// Non-finite costs (NaN / Inf features) follow the eager reference and its autograd exactly:
//   * c NaN (unmasked): f = NaN (clamp(min=0) and the focal weight propagate it); f' = 0, because
//     clamp's backward is where(c >= 0, grad, 0) and NaN >= 0 is false;
//   * c = -inf: clamped, f = 0, f' = 0;
//   * c = +inf: f = inf; f' = NaN for gamma > 0 (eager: exp's backward at -inf is inf·0) and 1 for
//     gamma == 0 (torch's pow backward is exactly 0 for a zero exponent). The formula below gives both.
//     Eager's NaN there reaches the gradients even where the entry is not a hard-mining arg-max (its
//     zero upstream gradient times inf is NaN): the driver adds that (see triplet.h, "poison").
//   * masked entries are 0 whatever c is (masked_fill comes first).
// Hard-mining max: NaN wins, the first NaN (lowest index) is the arg-max, as torch.max (max_takes).
#pragma once

#include <c10/macros/Macros.h>
#include <math.h>

#include <cmath>

namespace rspeft {
namespace triplet {

C10_HOST_DEVICE inline float fexp(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double fexp(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float fpow(float x, float y) { return ::powf(x, y); }
C10_HOST_DEVICE inline double fpow(double x, double y) { return ::pow(x, y); }
C10_HOST_DEVICE inline float fsqrt(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline double fsqrt(double x) { return ::sqrt(x); }

template <typename acc_t>
C10_HOST_DEVICE inline bool is_nan(acc_t x) {
#ifdef __CUDA_ARCH__
  return ::isnan(x);
#else
  return std::isnan(x);
#endif
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t pos_inf() {
  return acc_t(INFINITY);
}

// Does candidate value `a` replace the current maximum `b` when candidates come in increasing index
// order? Strictly larger, or the first NaN: NaN beats everything, an earlier NaN beats a later one.
template <typename acc_t>
C10_HOST_DEVICE inline bool max_takes(acc_t a, acc_t b) {
  return a > b || (is_nan(a) && !is_nan(b));
}

// Same for two (value, index) candidates in any order (tree reductions): does (va, ia) beat (vb, ib)?
template <typename acc_t>
C10_HOST_DEVICE inline bool max_beats(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  const bool na = is_nan(va), nb = is_nan(vb);
  if (na || nb) return na && (!nb || ia < ib);
  return va > vb || (va == vb && ia < ib);
}

// u^g for the focal weight; the common exponents avoid pow (and match pow(x, 2) == x*x as torch does).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t upow(acc_t u, acc_t g) {
  if (g == acc_t(2)) return u * u;
  if (g == acc_t(1)) return u;
  if (g == acc_t(0)) return acc_t(1);
  if (g == acc_t(3)) return u * u * u;
  if (g == acc_t(0.5)) return fsqrt(u);
  return fpow(u, g);
}

// Focal hinge of one raw cost `c` (before the clamp): returns f and writes f' to *df.
// Invalid entries (masked or c < 0) give f = 0, f' = 0; a NaN cost gives f = NaN, f' = 0 (see above).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t focal(acc_t c, bool masked, acc_t gamma, acc_t* df) {
  if (masked || c < acc_t(0)) {
    *df = acc_t(0);
    return acc_t(0);
  }
  if (is_nan(c)) {
    *df = acc_t(0);
    return c;
  }
  if (gamma == acc_t(0)) {  // W == 1 (torch: 0^0 == 1): f = c, f' = 1 including c == 0
    *df = acc_t(1);
    return c;
  }
  const acc_t e = fexp(-c);
  const acc_t u = acc_t(1) - e;  // as the reference writes it (not expm1), so values match it
  const acc_t w = upow(u, gamma);
  acc_t second = acc_t(0);
  if (u > acc_t(0)) {
    // c·gamma·u^(gamma-1)·e; for gamma == 2 this is 2·c·u·e.
    second = c * gamma * upow(u, gamma - acc_t(1)) * e;
  }
  *df = w + second;
  return w * c;
}

}  // namespace triplet
}  // namespace rspeft
