// Fused clip-scale-sum-noise over materialised per-example gradients (small parameters).
//
//   out[j] = sum_{i<B} c[i] * g[i, j]  +  noise_std * z(key, element j),   0 <= j < n
//
// The kernel body (work layout, vector widths, int64 index math) is in clip_sum_noise_impl.cuh,
// shared with the CPU emulation in clip_sum_noise_host_check.cu. This file holds the kernels and
// their launchers and includes no torch header (see clip_sum_noise.h).
#include "clip_sum_noise.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "clip_sum_noise_impl.cuh"

namespace dpk {
namespace {

using detail::kLanes;
using detail::kMaxRows;

template <typename T, int VEC>
__global__ void __launch_bounds__(kLanes* kMaxRows)
    clip_sum_noise_kernel(const T* __restrict__ g, const float* __restrict__ clip_factors,
                          T* __restrict__ out, int64_t B, int64_t n, float noise_std,
                          PhiloxKey key) {
  extern __shared__ float4 partial_storage[];  // [blockDim.y][kLanes * VEC] floats
  float* partial = reinterpret_cast<float*>(partial_storage);
  const int rows = static_cast<int>(blockDim.y);
  detail::accumulate<T, VEC>(g, clip_factors, B, n, blockIdx.x, static_cast<int>(threadIdx.x),
                             static_cast<int>(threadIdx.y), rows, partial);
  __syncthreads();
  detail::epilogue<T, VEC>(partial, out, n, blockIdx.x,
                           static_cast<int>(threadIdx.y) * kLanes + static_cast<int>(threadIdx.x),
                           kLanes * rows, rows, noise_std, key);
}

template <typename T, int VEC>
cudaError_t launch_vec(const T* g, const float* c, T* out, int64_t B, int64_t n, float noise_std,
                       PhiloxKey key, cudaStream_t stream) {
  constexpr int64_t kTile = detail::kTileCols<VEC>;
  const int64_t tiles = (n + kTile - 1) / kTile;
  if (tiles > 0x7fffffffLL) return cudaErrorInvalidValue;
  const int rows = detail::rows_per_block(B);
  const dim3 block(kLanes, rows);
  const dim3 grid(static_cast<unsigned int>(tiles));
  const size_t smem = static_cast<size_t>(rows) * kTile * sizeof(float);
  clip_sum_noise_kernel<T, VEC><<<grid, block, smem, stream>>>(g, c, out, B, n, noise_std, key);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const void* g_raw, const float* c, void* out_raw, int64_t B, int64_t n,
                         float noise_std, PhiloxKey key, cudaStream_t stream) {
  const T* g = static_cast<const T*>(g_raw);
  T* out = static_cast<T*>(out_raw);
  constexpr int kMaxVec = 16 / static_cast<int>(sizeof(T));
  switch (detail::choose_vec<T>(g_raw, n)) {
    case 8:
      if constexpr (kMaxVec >= 8) return launch_vec<T, 8>(g, c, out, B, n, noise_std, key, stream);
      break;
    case 4:
      return launch_vec<T, 4>(g, c, out, B, n, noise_std, key, stream);
    case 2:
      return launch_vec<T, 2>(g, c, out, B, n, noise_std, key, stream);
    default:
      break;
  }
  return launch_vec<T, 1>(g, c, out, B, n, noise_std, key, stream);
}

__global__ void philox_normal_kernel(float* __restrict__ out, int64_t n, uint64_t offset,
                                     PhiloxKey key) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride)
    out[j] = philox_normal(key, offset + static_cast<uint64_t>(j));
}

__global__ void philox4x32_kernel(uint32_t* __restrict__ out, int64_t n, uint64_t offset,
                                  PhiloxKey key) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += stride) {
    const Philox4 r = philox_draw(key, offset + static_cast<uint64_t>(j));
    reinterpret_cast<uint4*>(out)[j] = make_uint4(r.x0, r.x1, r.x2, r.x3);
  }
}

constexpr int kGenThreads = 256;
constexpr int64_t kGenMaxBlocks = 65535;

unsigned int gen_blocks(int64_t n) {
  const int64_t b = (n + kGenThreads - 1) / kGenThreads;
  return static_cast<unsigned int>(b < kGenMaxBlocks ? b : kGenMaxBlocks);
}

}  // namespace

cudaError_t launch_clip_sum_noise(const void* g, const float* clip_factors, void* out, int64_t B,
                                  int64_t n, DType dtype, float noise_std, PhiloxKey key,
                                  cudaStream_t stream) {
  if (B < 0 || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(g, clip_factors, out, B, n, noise_std, key, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(g, clip_factors, out, B, n, noise_std, key, stream);
    case DType::kFloat16:
      return launch_typed<__half>(g, clip_factors, out, B, n, noise_std, key, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_philox_normal(float* out, int64_t n, uint64_t offset, PhiloxKey key,
                                 cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  philox_normal_kernel<<<gen_blocks(n), kGenThreads, 0, stream>>>(out, n, offset, key);
  return cudaGetLastError();
}

cudaError_t launch_philox4x32(uint32_t* out, int64_t n, uint64_t offset, PhiloxKey key,
                              cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  philox4x32_kernel<<<gen_blocks(n), kGenThreads, 0, stream>>>(out, n, offset, key);
  return cudaGetLastError();
}

}  // namespace dpk
