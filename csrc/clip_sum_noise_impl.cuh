// The body of the clip-sum-noise kernel as __host__ __device__ functions (torch-free).
//
// The kernel in clip_sum_noise.cu is   accumulate(); __syncthreads(); epilogue();   and this
// split lets csrc/clip_sum_noise_host_check.cu run the very same code on the CPU, emulating a
// launch block by block (phase 1 for every thread, then phase 2 for every thread), so the
// tiling, vector-width choice and index math are tested without a GPU.
//
// Layout of the work. A block owns a tile of kLanes * VEC consecutive columns: `lane`
// (threadIdx.x) picks a VEC-wide column vector (one 128-bit load for fp32 x4 / bf16 x8 / fp16 x8
// when the row stride and base pointer allow it, so a warp reads 512 contiguous bytes of a row),
// `row` (threadIdx.y) picks every `rows`-th row (rows = blockDim.y <= kMaxRows). Each thread
// accumulates its VEC columns over its rows in float32 (kUnroll rows in flight per iteration);
// the per-row-group partial sums go to shared memory and are reduced in a fixed order
// (deterministic); the epilogue spreads the tile's columns over all threads of the block to add
// the Philox noise and store in g's dtype.
//
// VEC is the largest power of two <= 16 bytes / sizeof(T) that divides n and the base pointer's
// alignment (in elements): every row then starts VEC-aligned and no vector straddles the end of a
// row, so there is no partial vector; shapes that do not allow 128-bit loads fall back to 64-,
// 32-bit or scalar loads (n odd => scalar).
//
// All element / row / column indices and offsets are int64_t: B * n may exceed 2^31.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "philox.cuh"

namespace dpk {
namespace detail {

constexpr int kLanes = 32;    // blockDim.x: column vectors per tile (one warp wide)
constexpr int kMaxRows = 16;  // max blockDim.y: rows reduced in parallel inside a block
constexpr int kUnroll = 4;    // rows loaded per thread before accumulating

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static DPK_HD float to_float(float x) { return x; }
  static DPK_HD float from_float(float x) { return x; }
};

template <>
struct Convert<__nv_bfloat16> {
  static DPK_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static DPK_HD __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Convert<__half> {
  static DPK_HD float to_float(__half x) { return __half2float(x); }
  static DPK_HD __half from_float(float x) { return __float2half_rn(x); }
};

// VEC elements loaded as one aligned access (16 bytes at most).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

DPK_HD float load_readonly(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// Columns per block (tile) for vector width VEC.
template <int VEC>
constexpr int64_t kTileCols = static_cast<int64_t>(kLanes) * VEC;

// Rows reduced in parallel by a block: the smallest power of two >= B, at most kMaxRows.
inline int rows_per_block(int64_t B) {
  int rows = 1;
  while (rows < kMaxRows && rows < B) rows *= 2;
  return rows;
}

// The widest vector (in elements) usable for every row of a (B, n) array of T starting at g.
template <typename T>
int choose_vec(const void* g, int64_t n) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(g);
  int vec = 16 / static_cast<int>(sizeof(T));
  while (vec > 1 && (n % vec != 0 || addr % (static_cast<uintptr_t>(vec) * sizeof(T)) != 0)) vec /= 2;
  return vec;
}

// Phase 1, thread (lane, row) of block `tile`: partial sums of columns
// [tile0 + lane*VEC, tile0 + lane*VEC + VEC) over rows row, row + rows, ... < B, written to
// partial[row * kTileCols + lane * VEC + k] (partial: rows * kTileCols floats, 16-byte aligned).
template <typename T, int VEC>
DPK_HD void accumulate(const T* __restrict__ g, const float* __restrict__ clip_factors, int64_t B,
                       int64_t n, int64_t tile, int lane, int row, int rows, float* partial) {
  using P = Pack<T, VEC>;
  constexpr int64_t kTile = kTileCols<VEC>;
  const int64_t col = tile * kTile + static_cast<int64_t>(lane) * VEC;
  const int64_t step = rows;

  float acc[VEC];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;

  // n % VEC == 0, so col < n implies the whole vector [col, col + VEC) is inside the row.
  if (col < n && row < B) {
    int64_t i = row;
    const int64_t row_stride = step * n;  // elements between two rows of this thread
    const T* ptr = g + i * n + col;
    for (; i + (kUnroll - 1) * step < B; i += kUnroll * step) {
      P p[kUnroll];
      float cf[kUnroll];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int u = 0; u < kUnroll; ++u) {
        p[u] = *reinterpret_cast<const P*>(ptr + u * row_stride);
        cf[u] = load_readonly(clip_factors + i + u * step);
      }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int u = 0; u < kUnroll; ++u) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int k = 0; k < VEC; ++k) acc[k] = fmaf(cf[u], Convert<T>::to_float(p[u].v[k]), acc[k]);
      }
      ptr += kUnroll * row_stride;
    }
    for (; i < B; i += step) {
      const P p = *reinterpret_cast<const P*>(ptr);
      const float cf = load_readonly(clip_factors + i);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < VEC; ++k) acc[k] = fmaf(cf, Convert<T>::to_float(p.v[k]), acc[k]);
      ptr += row_stride;
    }
  }

  float* mine = partial + static_cast<int64_t>(row) * kTile + static_cast<int64_t>(lane) * VEC;
  if constexpr (VEC % 4 == 0) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < VEC; k += 4)
      *reinterpret_cast<float4*>(mine + k) = make_float4(acc[k], acc[k + 1], acc[k + 2], acc[k + 3]);
  } else if constexpr (VEC == 2) {
    *reinterpret_cast<float2*>(mine) = make_float2(acc[0], acc[1]);
  } else {
    for (int k = 0; k < VEC; ++k) mine[k] = acc[k];
  }
}

// Phase 2, thread `tid` of `nthreads` in block `tile`: reduce the `rows` partial sums of its
// columns (fixed order), add noise_std * z(key, j) unless noise_std == 0, store out[j].
template <typename T, int VEC>
DPK_HD void epilogue(const float* partial, T* __restrict__ out, int64_t n, int64_t tile, int tid,
                     int nthreads, int rows, float noise_std, const PhiloxKey& key) {
  constexpr int64_t kTile = kTileCols<VEC>;
  const int64_t tile0 = tile * kTile;
  for (int64_t t = tid; t < kTile; t += nthreads) {
    const int64_t j = tile0 + t;
    if (j >= n) break;  // j grows with t
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += partial[r * kTile + t];
    if (noise_std != 0.0f) s = fmaf(noise_std, philox_normal(key, static_cast<uint64_t>(j)), s);
    out[j] = Convert<T>::from_float(s);
  }
}

}  // namespace detail
}  // namespace dpk
