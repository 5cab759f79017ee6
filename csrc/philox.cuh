// Philox-4x32-10 counter-based generator and the Box-Muller normal draw of dpkernels.
//
// This is the CUDA/C++ twin of the reference in dpkernels/ops/philox.py; the counter scheme is
// defined there and must not change here without changing it there:
//
//   key     = (seed_lo, seed_hi)              the 64-bit seed split into 32-bit words
//   elem    = flat row-major element index (64 bits); pair j = elem >> 1, slot = elem & 1
//   counter = (j_lo, j_hi, step, stream)
//   (x0, x1, x2, x3) = Philox4x32-10(counter, key)                               (x3 unused)
//   u = x0 2^-32 + (x1 2^-64 + 2^-65)   (a 64-bit uniform: the tail reaches 9.49 sigma, not 6.8)
//   R = sqrt(-2 ln u), t = 2 pi x2 2^-32
//   z[slot 0, 1] = R cos t, R sin t                                                  (float32)
//
// Everything here is __host__ __device__ so that the same code runs in the kernels and in host
// checks (csrc/philox_host_check.cpp compiles this header with a plain C++ compiler).
//
// Floating point. The integer part is exact. For the normal, each float32 operation of the
// reference (int->float conversion, the two scalings, -2*log, sqrt, the 2*pi product, cos, the
// final product) is reproduced with an explicitly round-to-nearest float32 operation, so the
// result does not depend on --use_fast_math / --fmad / --prec-sqrt. log and cos are evaluated
// (and sin) in double precision and rounded to float32: double-precision math functions are not replaced
// by the fast approximate intrinsics under --use_fast_math (unlike logf/cosf, which would become
// __logf/__cosf, whose absolute error near u1 = 1 shifts small |z| by up to ~3e-4). The result
// is therefore the correctly rounded float32 log/cos in all but astronomically rare
// double-rounding cases, i.e. within 1 ulp of torch's float32 log/cos; z agrees with the torch
// reference to a few float32 ulps (< 4e-6 absolute, since |z| < 9.5).
// Cost: one Philox call, one double log and one double cos or sin per drawn element (this
// memory-bound kernel draws one normal per output element after reading B input elements for
// it, so it does not regroup draws by two as the Triton GEMM epilogue does).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DPK_HD __host__ __device__ __forceinline__
#else
#define DPK_HD inline
#endif

namespace dpk {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// 2^-32, 2^-64, 2^-65 and float32(2*pi): exactly the float32 constants the reference ends up
// using (torch rounds a Python float scalar to the tensor's float32 dtype before multiplying).
constexpr float kInv2Pow32 = 2.3283064365386963e-10f;
constexpr float kInv2Pow64 = 5.421010862427522e-20f;
constexpr float kHalfInv2Pow64 = 2.710505431213761e-20f;
constexpr float kTwoPiF = 6.283185307179586f;

// Names one block of counters: the draws of one parameter tensor at one step.
struct PhiloxKey {
  uint32_t seed_lo;
  uint32_t seed_hi;
  uint32_t step;
  uint32_t stream;
};

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

DPK_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Philox-4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
DPK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;  // uint32 arithmetic wraps mod 2^32, as the reference's mask does
    k1 += kPhiloxW1;
  }
  return Philox4{c0, c1, c2, c3};
}

// The four Philox outputs at the 64-bit counter value `ctr` (words ctr_lo, ctr_hi, step, stream).
DPK_HD Philox4 philox_draw(const PhiloxKey& key, uint64_t ctr) {
  return philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), key.step,
                       key.stream, key.seed_lo, key.seed_hi);
}

// Box-Muller: R cos t (use_sin false) or R sin t, R from the 64-bit uniform (x_hi, x_lo), t from
// x_angle; float32 with round-to-nearest at every step (see the header comment).
DPK_HD float box_muller(uint32_t x_hi, uint32_t x_lo, uint32_t x_angle, bool use_sin) {
#if defined(__CUDA_ARCH__)
  const float u_lo = __fadd_rn(__fmul_rn(__uint2float_rn(x_lo), kInv2Pow64), kHalfInv2Pow64);
  const float u = __fadd_rn(__fmul_rn(__uint2float_rn(x_hi), kInv2Pow32), u_lo);
  const float u2 = __fmul_rn(__uint2float_rn(x_angle), kInv2Pow32);
  const float ln_u = __double2float_rn(::log(static_cast<double>(u)));
  const float radius = __fsqrt_rn(__fmul_rn(-2.0f, ln_u));
  const float angle = __fmul_rn(kTwoPiF, u2);
  const double a = static_cast<double>(angle);
  const float trig = __double2float_rn(use_sin ? ::sin(a) : ::cos(a));
  return __fmul_rn(radius, trig);
#else
  // Host: plain float32 operations are IEEE round-to-nearest; the products by powers of two
  // are exact, so even a contracted multiply-add gives the same u.
  const float u_lo = static_cast<float>(x_lo) * kInv2Pow64 + kHalfInv2Pow64;
  const float u = static_cast<float>(x_hi) * kInv2Pow32 + u_lo;
  const float u2 = static_cast<float>(x_angle) * kInv2Pow32;
  const float ln_u = static_cast<float>(std::log(static_cast<double>(u)));
  const float radius = std::sqrt(-2.0f * ln_u);
  const float angle = kTwoPiF * u2;
  const double a = static_cast<double>(angle);
  const float trig = static_cast<float>(use_sin ? std::sin(a) : std::cos(a));
  return radius * trig;
#endif
}

// The standard normal for element `elem` of the counter block `key`.
DPK_HD float philox_normal(const PhiloxKey& key, uint64_t elem) {
  const Philox4 r = philox_draw(key, elem >> 1);
  return box_muller(r.x0, r.x1, r.x2, (elem & 1u) != 0u);
}

}  // namespace dpk
