// CPU kernel of dpkernels: the Philox-4x32-10 Gaussian noise of dpkernels/ops/philox.py, compiled.
//
// The counter scheme and every floating-point step are those of csrc/philox.cuh (included here:
// one definition for the CUDA kernels, their host checks and this file):
//
//   pair j = e >> 1 of element e, counter (j_lo, j_hi, step, stream), key (seed_lo, seed_hi)
//   (x0, x1, x2, x3) = Philox4x32-10(counter, key)
//   u = x0 2^-32 + (x1 2^-64 + 2^-65), R = sqrt(-2 ln u), t = 2 pi x2 2^-32
//   z[2j] = R cos t, z[2j + 1] = R sin t          (float32; ln, cos, sin in double, rounded)
//
// so the integers are those of the torch reference bit for bit, and the normals are the CUDA
// kernels' and within a float32 ulp or two of the torch reference (whose float32 log and cos come
// from SLEEF).
//
// Three implementations of one block of 8 pairs (16 elements), picked once at load by the CPU:
//   avx512  8 pairs in the 64-bit lanes of zmm registers: Philox with vpmuludq (32x32 -> 64),
//           ln, sin, cos from glibc's vector math library (libmvec, _ZGVeN8v_*), in double
//   avx2    the same in two halves of 4 lanes (ymm, _ZGVdN4v_*)
//   scalar  philox.cuh's own code, one pair at a time (libm's scalar log, sin, cos)
// Every float32 step of the reference is reproduced in double and rounded to float32 (cvtpd_ps):
// for +, *, sqrt of two float32 operands the double result rounded to float32 is the correctly
// rounded float32 result (53 >= 2*24 + 2), so the vector paths are the scalar path's operations.
// The only difference is libmvec's double ln/sin/cos (<= 4 double ulps) against libm's: after
// rounding to float32 the two agree unless the double lies within a few 2^-53 of a float32
// rounding boundary (~1e-8 of draws, then 1 float32 ulp apart). The tests check the three paths
// against each other and against philox.cuh on millions of draws.
// A pair always goes through the same path whatever the thread count or the requested range
// (blocks are aligned to 8-pair boundaries of the counter and computed whole), so the noise does
// not depend on how the work is split. DPKERNELS_CPU_ISA=scalar|avx2|avx512 forces a lower path.
//
// Loops run on torch's intra-op thread pool (at::parallel_for; -fopenmp, torch's OpenMP
// backend). Built by torch's extension tooling, JIT at first use (dpkernels/_cpu.py), with
// -ffp-contract=off so that out + std * z is rounded as the reference rounds it (a product, then
// a sum). DPK_HAVE_LIBMVEC (set by _cpu.py on x86-64 glibc) enables the vector paths.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "cpu_kernels.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "philox.cuh"

#if defined(DPK_HAVE_LIBMVEC) && defined(__x86_64__) && defined(__GNUC__)
#define DPK_CPU_SIMD 1
#include <immintrin.h>
#else
#define DPK_CPU_SIMD 0
#endif

namespace {

constexpr int kBlockPairs = 8;  // pairs per block: 16 elements
constexpr int kBlockElems = 2 * kBlockPairs;

dpk::PhiloxKey make_key(int64_t seed_lo, int64_t seed_hi, int64_t step, int64_t stream) {
  return dpk::PhiloxKey{static_cast<uint32_t>(seed_lo), static_cast<uint32_t>(seed_hi), static_cast<uint32_t>(step),
                        static_cast<uint32_t>(stream)};
}

// ------------------------------------------------------------------------------ scalar ---------

// z[0] = R cos t, z[1] = R sin t of pair j: box_muller of philox.cuh, its radius computed once.
inline void normal_pair(const dpk::PhiloxKey& key, uint64_t j, float z[2]) {
  const dpk::Philox4 r = dpk::philox_draw(key, j);
  const float u_lo = static_cast<float>(r.x1) * dpk::kInv2Pow64 + dpk::kHalfInv2Pow64;
  const float u = static_cast<float>(r.x0) * dpk::kInv2Pow32 + u_lo;
  const float u2 = static_cast<float>(r.x2) * dpk::kInv2Pow32;
  const float ln_u = static_cast<float>(std::log(static_cast<double>(u)));
  const float radius = std::sqrt(-2.0f * ln_u);
  const double angle = static_cast<double>(dpk::kTwoPiF * u2);
  z[0] = radius * static_cast<float>(std::cos(angle));
  z[1] = radius * static_cast<float>(std::sin(angle));
}

void block_scalar(const dpk::PhiloxKey& key, uint64_t j0, float* z) {
  for (int k = 0; k < kBlockPairs; ++k) normal_pair(key, j0 + k, z + 2 * k);
}

// ------------------------------------------------------------------------------ vector ---------

#if DPK_CPU_SIMD
typedef double dpk_v8d __attribute__((vector_size(64)));
typedef double dpk_v4d __attribute__((vector_size(32)));
extern "C" {
dpk_v8d _ZGVeN8v_log(dpk_v8d);
dpk_v8d _ZGVeN8v_sin(dpk_v8d);
dpk_v8d _ZGVeN8v_cos(dpk_v8d);
dpk_v4d _ZGVdN4v_log(dpk_v4d);
dpk_v4d _ZGVdN4v_sin(dpk_v4d);
dpk_v4d _ZGVdN4v_cos(dpk_v4d);
}

#pragma GCC push_options
#pragma GCC target("avx512f")

// uint32 values in 64-bit lanes -> double, exactly (OR into the mantissa of 2^52, subtract 2^52)
static inline __m512d u32_to_pd_512(__m512i x) {
  const __m512i magic_bits = _mm512_set1_epi64(0x4330000000000000LL);
  return _mm512_sub_pd(_mm512_castsi512_pd(_mm512_or_si512(x, magic_bits)), _mm512_set1_pd(4503599627370496.0));
}
static inline __m512d round_f32_512(__m512d x) { return _mm512_cvtps_pd(_mm512_cvtpd_ps(x)); }

void block_avx512(const dpk::PhiloxKey& key, uint64_t j0, float* z) {
  const __m512i mask = _mm512_set1_epi64(0xFFFFFFFFLL);
  const __m512i j = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(j0)), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  __m512i c0 = _mm512_and_si512(j, mask), c1 = _mm512_srli_epi64(j, 32);
  __m512i c2 = _mm512_set1_epi64(key.step), c3 = _mm512_set1_epi64(key.stream);
  const __m512i m0 = _mm512_set1_epi64(dpk::kPhiloxM0), m1 = _mm512_set1_epi64(dpk::kPhiloxM1);
  uint32_t k0 = key.seed_lo, k1 = key.seed_hi;
  for (int r = 0; r < dpk::kPhiloxRounds; ++r) {
    const __m512i p0 = _mm512_mul_epu32(c0, m0), p1 = _mm512_mul_epu32(c2, m1);  // full 64-bit products
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), c1), _mm512_set1_epi64(k0));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), c3), _mm512_set1_epi64(k1));
    c1 = _mm512_and_si512(p1, mask);
    c3 = _mm512_and_si512(p0, mask);
    c0 = n0;
    c2 = n2;
    k0 += dpk::kPhiloxW0;
    k1 += dpk::kPhiloxW1;
  }
  const __m512d f0 = round_f32_512(u32_to_pd_512(c0)), f1 = round_f32_512(u32_to_pd_512(c1));
  const __m512d f2 = round_f32_512(u32_to_pd_512(c2));
  const __m512d u_lo = round_f32_512(
      _mm512_add_pd(_mm512_mul_pd(f1, _mm512_set1_pd(dpk::kInv2Pow64)), _mm512_set1_pd(dpk::kHalfInv2Pow64)));
  const __m512d u = round_f32_512(_mm512_add_pd(_mm512_mul_pd(f0, _mm512_set1_pd(dpk::kInv2Pow32)), u_lo));
  const __m512d ln_u = round_f32_512(reinterpret_cast<__m512d>(_ZGVeN8v_log(reinterpret_cast<dpk_v8d>(u))));
  const __m512d radius = round_f32_512(_mm512_sqrt_pd(_mm512_mul_pd(_mm512_set1_pd(-2.0), ln_u)));
  const __m512d angle =
      round_f32_512(_mm512_mul_pd(_mm512_set1_pd(dpk::kTwoPiF), _mm512_mul_pd(f2, _mm512_set1_pd(dpk::kInv2Pow32))));
  const __m512d cos_t = round_f32_512(reinterpret_cast<__m512d>(_ZGVeN8v_cos(reinterpret_cast<dpk_v8d>(angle))));
  const __m512d sin_t = round_f32_512(reinterpret_cast<__m512d>(_ZGVeN8v_sin(reinterpret_cast<dpk_v8d>(angle))));
  const __m256 z0 = _mm512_cvtpd_ps(_mm512_mul_pd(radius, cos_t)), z1 = _mm512_cvtpd_ps(_mm512_mul_pd(radius, sin_t));
  const __m256 lo = _mm256_unpacklo_ps(z0, z1), hi = _mm256_unpackhi_ps(z0, z1);  // interleave by 128-bit half
  _mm256_storeu_ps(z, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_storeu_ps(z + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2")

static inline __m256d u32_to_pd_256(__m256i x) {
  const __m256i magic_bits = _mm256_set1_epi64x(0x4330000000000000LL);
  return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(x, magic_bits)), _mm256_set1_pd(4503599627370496.0));
}
static inline __m256d round_f32_256(__m256d x) { return _mm256_cvtps_pd(_mm256_cvtpd_ps(x)); }

// 4 pairs j0 .. j0+3 -> z[0 .. 7]
static inline void quad_avx2(const dpk::PhiloxKey& key, uint64_t j0, float* z) {
  const __m256i mask = _mm256_set1_epi64x(0xFFFFFFFFLL);
  const __m256i j = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(j0)), _mm256_set_epi64x(3, 2, 1, 0));
  __m256i c0 = _mm256_and_si256(j, mask), c1 = _mm256_srli_epi64(j, 32);
  __m256i c2 = _mm256_set1_epi64x(key.step), c3 = _mm256_set1_epi64x(key.stream);
  const __m256i m0 = _mm256_set1_epi64x(dpk::kPhiloxM0), m1 = _mm256_set1_epi64x(dpk::kPhiloxM1);
  uint32_t k0 = key.seed_lo, k1 = key.seed_hi;
  for (int r = 0; r < dpk::kPhiloxRounds; ++r) {
    const __m256i p0 = _mm256_mul_epu32(c0, m0), p1 = _mm256_mul_epu32(c2, m1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1), _mm256_set1_epi64x(k0));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3), _mm256_set1_epi64x(k1));
    c1 = _mm256_and_si256(p1, mask);
    c3 = _mm256_and_si256(p0, mask);
    c0 = n0;
    c2 = n2;
    k0 += dpk::kPhiloxW0;
    k1 += dpk::kPhiloxW1;
  }
  const __m256d f0 = round_f32_256(u32_to_pd_256(c0)), f1 = round_f32_256(u32_to_pd_256(c1));
  const __m256d f2 = round_f32_256(u32_to_pd_256(c2));
  const __m256d u_lo = round_f32_256(
      _mm256_add_pd(_mm256_mul_pd(f1, _mm256_set1_pd(dpk::kInv2Pow64)), _mm256_set1_pd(dpk::kHalfInv2Pow64)));
  const __m256d u = round_f32_256(_mm256_add_pd(_mm256_mul_pd(f0, _mm256_set1_pd(dpk::kInv2Pow32)), u_lo));
  const __m256d ln_u = round_f32_256(reinterpret_cast<__m256d>(_ZGVdN4v_log(reinterpret_cast<dpk_v4d>(u))));
  const __m256d radius = round_f32_256(_mm256_sqrt_pd(_mm256_mul_pd(_mm256_set1_pd(-2.0), ln_u)));
  const __m256d angle =
      round_f32_256(_mm256_mul_pd(_mm256_set1_pd(dpk::kTwoPiF), _mm256_mul_pd(f2, _mm256_set1_pd(dpk::kInv2Pow32))));
  const __m256d cos_t = round_f32_256(reinterpret_cast<__m256d>(_ZGVdN4v_cos(reinterpret_cast<dpk_v4d>(angle))));
  const __m256d sin_t = round_f32_256(reinterpret_cast<__m256d>(_ZGVdN4v_sin(reinterpret_cast<dpk_v4d>(angle))));
  const __m128 z0 = _mm256_cvtpd_ps(_mm256_mul_pd(radius, cos_t)), z1 = _mm256_cvtpd_ps(_mm256_mul_pd(radius, sin_t));
  _mm_storeu_ps(z, _mm_unpacklo_ps(z0, z1));
  _mm_storeu_ps(z + 4, _mm_unpackhi_ps(z0, z1));
}

void block_avx2(const dpk::PhiloxKey& key, uint64_t j0, float* z) {
  quad_avx2(key, j0, z);
  quad_avx2(key, j0 + 4, z + 8);
}
#pragma GCC pop_options
#endif  // DPK_CPU_SIMD

// ------------------------------------------------------------------------------ dispatch -------

using BlockFn = void (*)(const dpk::PhiloxKey&, uint64_t, float*);

struct Path {
  const char* name;
  BlockFn fn;
};

Path path_named(const std::string& name) {
#if DPK_CPU_SIMD
  if (name == "avx512") return {"avx512", block_avx512};
  if (name == "avx2") return {"avx2", block_avx2};
#endif
  return {"scalar", block_scalar};
}

const char* const kPathOrder[] = {"scalar", "avx2", "avx512"};

int path_rank(const std::string& name) {
  for (int i = 0; i < 3; ++i) {
    if (name == kPathOrder[i]) return i;
  }
  return -1;
}

// The fastest path this CPU runs.
std::string cpu_best() {
#if DPK_CPU_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "scalar";
}

// `want` where the CPU runs it, else the CPU's best; an unknown name is an error.
Path capped_path(const std::string& want) {
  const std::string best = cpu_best();
  if (want.empty()) return path_named(best);
  TORCH_CHECK(path_rank(want) >= 0, "the CPU noise path must be scalar, avx2 or avx512, got '", want, "'");
  return path_named(path_rank(want) <= path_rank(best) ? want : best);
}

// The best path this CPU runs, or a lower one that DPKERNELS_CPU_ISA asks for.
Path best_path() {
  const char* want = std::getenv("DPKERNELS_CPU_ISA");
  return capped_path(want == nullptr ? std::string() : std::string(want));
}

Path g_path = best_path();

// For each element e in [offset, offset + n): fn(e - offset, z_e). Parallel over whole 8-pair
// blocks of the counter, so every pair is computed by the same code whatever the split.
template <typename Fn>
void for_each_normal(const dpk::PhiloxKey& key, int64_t offset, int64_t n, Fn fn) {
  if (n <= 0) return;
  const BlockFn block = g_path.fn;
  const int64_t first_block = offset / kBlockElems;
  const int64_t last_block = (offset + n - 1) / kBlockElems;
  at::parallel_for(first_block, last_block + 1, 256, [&](int64_t begin, int64_t end) {
    alignas(64) float z[kBlockElems];
    for (int64_t b = begin; b < end; ++b) {
      block(key, static_cast<uint64_t>(b) * kBlockPairs, z);
      const int64_t base = b * kBlockElems - offset;
      if (base >= 0 && base + kBlockElems <= n) {
        for (int k = 0; k < kBlockElems; ++k) fn(base + k, z[k]);
      } else {
        for (int k = 0; k < kBlockElems; ++k) {
          const int64_t i = base + k;
          if (i >= 0 && i < n) fn(i, z[k]);
        }
      }
    }
  });
}

}  // namespace

namespace dpk_cpu {

torch::Tensor philox_normal(int64_t numel, int64_t seed_lo, int64_t seed_hi, int64_t step, int64_t stream,
                            int64_t offset) {
  TORCH_CHECK(numel >= 0 && offset >= 0, "philox_normal: numel and offset must be >= 0");
  auto out = torch::empty({numel}, torch::dtype(torch::kFloat32));
  float* o = out.data_ptr<float>();
  for_each_normal(make_key(seed_lo, seed_hi, step, stream), offset, numel, [o](int64_t i, float z) { o[i] = z; });
  return out;
}

// out += std * z over out's flat elements (out: contiguous float32 on the CPU), in place.
void add_normal_(torch::Tensor out, double noise_std, int64_t seed_lo, int64_t seed_hi, int64_t step,
                 int64_t stream) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kFloat32 && out.is_contiguous(),
              "add_normal_: out must be a contiguous float32 CPU tensor");
  float* o = out.data_ptr<float>();
  const float s = static_cast<float>(noise_std);
  for_each_normal(make_key(seed_lo, seed_hi, step, stream), 0, out.numel(),
                  [o, s](int64_t i, float z) { o[i] = o[i] + s * z; });
}

// int64 (numel, 4): the four Philox output words of the raw counters offset + j (the cipher alone).
torch::Tensor philox4x32(int64_t numel, int64_t seed_lo, int64_t seed_hi, int64_t step, int64_t stream,
                         int64_t offset) {
  TORCH_CHECK(numel >= 0 && offset >= 0, "philox4x32: numel and offset must be >= 0");
  auto out = torch::empty({numel, 4}, torch::dtype(torch::kInt64));
  int64_t* o = out.data_ptr<int64_t>();
  const dpk::PhiloxKey key = make_key(seed_lo, seed_hi, step, stream);
  at::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const dpk::Philox4 r = dpk::philox_draw(key, static_cast<uint64_t>(offset + j));
      o[4 * j] = r.x0;
      o[4 * j + 1] = r.x1;
      o[4 * j + 2] = r.x2;
      o[4 * j + 3] = r.x3;
    }
  });
  return out;
}

std::string isa() { return g_path.name; }

// Switch the path (tests compare them); returns the one now in use (never one the CPU lacks).
std::string set_isa(const std::string& name) {
  g_path = capped_path(name);
  return g_path.name;
}

}  // namespace dpk_cpu
