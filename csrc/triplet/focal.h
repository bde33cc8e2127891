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
#pragma once

#include <c10/macros/Macros.h>
#include <math.h>

namespace rspeft {
namespace triplet {

C10_HOST_DEVICE inline float fexp(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double fexp(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float fpow(float x, float y) { return ::powf(x, y); }
C10_HOST_DEVICE inline double fpow(double x, double y) { return ::pow(x, y); }
C10_HOST_DEVICE inline float fsqrt(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline double fsqrt(double x) { return ::sqrt(x); }

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
// Invalid entries (masked or c < 0) give f = 0, f' = 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t focal(acc_t c, bool masked, acc_t gamma, acc_t* df) {
  if (masked || !(c >= acc_t(0))) {
    *df = acc_t(0);
    return acc_t(0);
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
