// CPU emulation of the clip-sum-noise kernel: runs the kernel body of clip_sum_noise_impl.cuh
// (the same __host__ __device__ code the GPU runs) block by block on the host, for a set of shapes
// covering every vector width, misaligned bases, B = 0 / 1 / not a multiple of the row groups,
// tail tiles, and compares with a float64 reference. No GPU and no CUDA runtime call is needed.
//
//   nvcc -std=c++17 -O2 -I csrc csrc/clip_sum_noise_host_check.cu -o clip_sum_noise_host_check
//   ./clip_sum_noise_host_check        # exit status 0 when every case is within tolerance
//
// What this cannot check: anything about the real GPU execution (memory model, the actual
// __syncthreads barrier, __ldg, occupancy) and the device code generation of the math.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define DPK_HAVE_MMAP 1
#endif

#include "clip_sum_noise_impl.cuh"

namespace {

using dpk::PhiloxKey;
namespace detail = dpk::detail;

// A deterministic pseudo-random value in [-1, 1) for (stream, index).
double pseudo(uint64_t stream, uint64_t index) {
  const dpk::Philox4 r = dpk::philox4x32_10(static_cast<uint32_t>(index),
                                            static_cast<uint32_t>(index >> 32), 0x5eed, 0,
                                            static_cast<uint32_t>(stream), 0xabcdu);
  return static_cast<double>(r.x2) * (2.0 / 4294967296.0) - 1.0;
}

// Emulates the blocks tile_begin .. tile_end - 1 of a launch (tile_end < 0: all of them).
template <typename T, int VEC>
void emulate_launch(const T* g, const float* c, T* out, int64_t B, int64_t n, float noise_std,
                    const PhiloxKey& key, int64_t tile_begin = 0, int64_t tile_end = -1) {
  constexpr int64_t kTile = detail::kTileCols<VEC>;
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int rows = detail::rows_per_block(B);
  std::vector<float4> smem(static_cast<size_t>(rows * kTile / 4 + 1));
  float* partial = reinterpret_cast<float*>(smem.data());
  if (tile_end < 0 || tile_end > tiles) tile_end = tiles;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    // poison shared memory: every slot read by the epilogue must have been written
    for (int64_t k = 0; k < rows * kTile; ++k) partial[k] = std::nanf("");
    for (int row = 0; row < rows; ++row)
      for (int lane = 0; lane < detail::kLanes; ++lane)
        detail::accumulate<T, VEC>(g, c, B, n, tile, lane, row, rows, partial);
    const int nthreads = detail::kLanes * rows;
    for (int tid = 0; tid < nthreads; ++tid)
      detail::epilogue<T, VEC>(partial, out, n, tile, tid, nthreads, rows, noise_std, key);
  }
}

template <typename T>
void emulate(const T* g, const float* c, T* out, int64_t B, int64_t n, float noise_std,
             const PhiloxKey& key, int vec) {
  switch (vec) {
    case 8:
      if constexpr (16 / sizeof(T) >= 8) return emulate_launch<T, 8>(g, c, out, B, n, noise_std, key);
      break;
    case 4:
      return emulate_launch<T, 4>(g, c, out, B, n, noise_std, key);
    case 2:
      return emulate_launch<T, 2>(g, c, out, B, n, noise_std, key);
    default:
      break;
  }
  emulate_launch<T, 1>(g, c, out, B, n, noise_std, key);
}

template <typename T>
double out_rel();
template <>
double out_rel<float>() { return std::ldexp(1.0, -23); }
template <>
double out_rel<__nv_bfloat16>() { return std::ldexp(1.0, -8); }
template <>
double out_rel<__half>() { return std::ldexp(1.0, -10); }

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() { return "float32"; }
template <>
const char* type_name<__nv_bfloat16>() { return "bfloat16"; }
template <>
const char* type_name<__half>() { return "float16"; }

// One case; returns the number of failures.
template <typename T>
int run_case(int64_t B, int64_t n, int shift, float noise_std, int expect_vec) {
  using Conv = detail::Convert<T>;
  const PhiloxKey key{0x12345678u, 0x9abcdef0u, 3u, 7u};
  // storage 64-byte aligned, g starts `shift` elements in
  const size_t count = static_cast<size_t>(B * n + shift + 64);
  std::vector<float4> storage((count * sizeof(T) + sizeof(float4) - 1) / sizeof(float4) + 4);
  T* base = reinterpret_cast<T*>(storage.data());
  T* g = base + shift;
  std::vector<float> c(static_cast<size_t>(B) + 1);
  for (int64_t i = 0; i < B; ++i) c[i] = static_cast<float>(0.5 * (pseudo(1, i) + 1.0));
  for (int64_t k = 0; k < B * n; ++k) g[k] = Conv::from_float(static_cast<float>(3.0 * pseudo(2, k)));
  // sentinels around the output: the kernel must write exactly out[0..n)
  std::vector<T> out_buf(static_cast<size_t>(n) + 16, Conv::from_float(-1024.0f));
  T* out = out_buf.data() + 8;

  const int vec = detail::choose_vec<T>(g, n);
  int failures = 0;
  if (expect_vec > 0 && vec != expect_vec) {
    std::fprintf(stderr, "%s B=%lld n=%lld shift=%d: vector width %d, expected %d\n", type_name<T>(),
                 (long long)B, (long long)n, shift, vec, expect_vec);
    ++failures;
  }
  emulate<T>(g, c.data(), out, B, n, noise_std, key, vec);

  double max_excess = -1.0;
  for (int64_t j = 0; j < n; ++j) {
    double exp = 0.0, sum_abs = 0.0;
    for (int64_t i = 0; i < B; ++i) {
      const double t = static_cast<double>(c[i]) * Conv::to_float(g[i * n + j]);
      exp += t;
      sum_abs += std::fabs(t);
    }
    if (noise_std != 0.0f) exp += static_cast<double>(noise_std) * dpk::philox_normal(key, j);
    const double tol = 5e-6 * sum_abs + out_rel<T>() * std::fabs(exp) + 1e-5 * noise_std + 1e-30;
    const double err = std::fabs(static_cast<double>(Conv::to_float(out[j])) - exp);
    if (!(err <= tol)) {
      if (failures < 5)
        std::fprintf(stderr, "%s B=%lld n=%lld shift=%d vec=%d: out[%lld] = %.9g, expected %.9g\n",
                     type_name<T>(), (long long)B, (long long)n, shift, vec, (long long)j,
                     static_cast<double>(Conv::to_float(out[j])), exp);
      ++failures;
    }
    if (err - tol > max_excess) max_excess = err - tol;
  }
  for (int k = 0; k < 8; ++k) {
    if (Conv::to_float(out_buf[k]) != -1024.0f || Conv::to_float(out[n + k]) != -1024.0f) {
      std::fprintf(stderr, "%s B=%lld n=%lld: write outside out[0..n)\n", type_name<T>(),
                   (long long)B, (long long)n);
      ++failures;
      break;
    }
  }
  std::printf("%-8s B=%-5lld n=%-6lld shift=%d vec=%d noise=%.2f  %s\n", type_name<T>(), (long long)B,
              (long long)n, shift, vec, static_cast<double>(noise_std), failures ? "FAIL" : "ok");
  return failures;
}

// noise_std == 0 with exactly representable sums: the result must be exact.
template <typename T>
int run_exact_case(int64_t B, int64_t n) {
  using Conv = detail::Convert<T>;
  std::vector<float4> storage(static_cast<size_t>(B * n * sizeof(T) / sizeof(float4) + 2));
  T* g = reinterpret_cast<T*>(storage.data());
  std::vector<float> c(static_cast<size_t>(B) + 1);
  for (int64_t i = 0; i < B; ++i) c[i] = std::ldexp(1.0f, -static_cast<int>(i % 3));
  for (int64_t k = 0; k < B * n; ++k) g[k] = Conv::from_float(static_cast<float>((k * 7 + 3) % 3) - 1.0f);
  std::vector<T> out(static_cast<size_t>(n));
  emulate<T>(g, c.data(), out.data(), B, n, 0.0f, PhiloxKey{1, 2, 3, 4}, detail::choose_vec<T>(g, n));
  int failures = 0;
  for (int64_t j = 0; j < n; ++j) {
    double exp = 0.0;
    for (int64_t i = 0; i < B; ++i) exp += static_cast<double>(c[i]) * Conv::to_float(g[i * n + j]);
    if (static_cast<double>(Conv::to_float(out[j])) != exp) ++failures;
  }
  std::printf("%-8s B=%-5lld n=%-6lld exact, no noise  %s\n", type_name<T>(), (long long)B, (long long)n,
              failures ? "FAIL" : "ok");
  return failures;
}

template <typename T>
int run_all() {
  constexpr int kMax = 16 / sizeof(T);
  int f = 0;
  struct Shape {
    int64_t B, n;
  };
  const Shape shapes[] = {{1, 1},   {1, 7},    {3, 7},    {2, 1},   {0, 9},     {5, 1000},
                          {4, 221}, {33, 768}, {17, 770}, {7, 1031}, {19, 256}, {19, 260},
                          {19, 258}, {19, 257}, {200, 24}, {1000, 3}, {64, 4096}, {6, 9000}};
  for (const Shape& s : shapes)
    for (float noise : {0.0f, 1.7f}) f += run_case<T>(s.B, s.n, 0, noise, -1);
  // expected vector widths
  f += run_case<T>(9, 256, 0, 0.5f, kMax);
  f += run_case<T>(9, 256, 1, 0.5f, 1);
  f += run_case<T>(9, 256, 2, 0.5f, 2);
  f += run_case<T>(9, 258, 0, 0.5f, 2);
  f += run_case<T>(9, 257, 0, 0.5f, 1);
  if (kMax == 8) f += run_case<T>(9, 260, 0, 0.5f, 4);
  if (kMax == 8) f += run_case<T>(9, 256, 4, 0.5f, 4);
  f += run_exact_case<T>(1, 1);
  f += run_exact_case<T>(40, 1032);
  f += run_exact_case<T>(23, 77);
  return f;
}

// B * n > 2^31: 32-bit index math would read the wrong elements. The input (GiBs) and output
// are untouched anonymous mappings (zero pages: no memory is used); a few entries are set and
// only the first and the last tiles are emulated. B > 4 * kMaxRows exercises the unrolled loop,
// whose row stride (rows * n) then exceeds 2^31 as well.
struct Entry {
  int64_t row, col;  // col < 0: counted from the end of the row
  float value;
};

int run_64bit_case(int64_t B, int64_t n, const std::vector<Entry>& entries, float noise_std = 0.0f) {
#if DPK_HAVE_MMAP
  using T = __nv_bfloat16;
  using Conv = detail::Convert<T>;
  constexpr int kVec = 8;
  const size_t g_bytes = static_cast<size_t>(B * n) * sizeof(T), out_bytes = static_cast<size_t>(n) * sizeof(T);
  void* gm = mmap(nullptr, g_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  void* om = mmap(nullptr, out_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (gm == MAP_FAILED || om == MAP_FAILED) {
    if (gm != MAP_FAILED) munmap(gm, g_bytes);
    if (om != MAP_FAILED) munmap(om, out_bytes);
    std::printf("64-bit indexing case B=%lld skipped: cannot map %zu bytes\n", (long long)B, g_bytes);
    return 0;
  }
  T* g = static_cast<T*>(gm);
  T* out = static_cast<T*>(om);
  std::vector<float> c(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) c[i] = std::ldexp(1.0f, -static_cast<int>(i % 3));  // 1, 1/2, 1/4
  std::vector<double> expect_at;  // expected value per entry column
  std::vector<int64_t> cols;
  for (const Entry& e : entries) {
    const int64_t col = e.col < 0 ? n + e.col : e.col;
    g[e.row * n + col] = Conv::from_float(e.value);
    cols.push_back(col);
  }
  const int64_t tile_cols = detail::kTileCols<kVec>;
  const int64_t tiles = (n + tile_cols - 1) / tile_cols;
  const PhiloxKey key{0xfeedu, 0xbeefu, 1u, 2u};
  emulate_launch<T, kVec>(g, c.data(), out, B, n, noise_std, key, 0, 1);
  emulate_launch<T, kVec>(g, c.data(), out, B, n, noise_std, key, tiles - 1, tiles);
  int failures = detail::choose_vec<T>(g, n) != kVec;
  // without noise every value is exact in bfloat16; with noise, z(j) for the 64-bit index j
  auto wrong = [&](int64_t col) {
    double v = 0.0;
    for (size_t k = 0; k < entries.size(); ++k)
      if (cols[k] == col) v += static_cast<double>(c[entries[k].row]) * entries[k].value;
    if (noise_std != 0.0f) v += static_cast<double>(noise_std) * dpk::philox_normal(key, static_cast<uint64_t>(col));
    const double tol = noise_std != 0.0f ? std::ldexp(std::fabs(v), -8) + 1e-5 * noise_std : 0.0;
    return !(std::fabs(static_cast<double>(Conv::to_float(out[col])) - v) <= tol);
  };
  for (int64_t j = 0; j < tile_cols; ++j) failures += wrong(j);
  for (int64_t j = (tiles - 1) * tile_cols; j < n; ++j) failures += wrong(j);
  munmap(gm, g_bytes);
  munmap(om, out_bytes);
  std::printf("bfloat16 B=%-5lld n=%-10lld (B*n = %.3g > 2^31) noise=%.1f first and last tiles  %s\n",
              (long long)B, (long long)n, static_cast<double>(B) * static_cast<double>(n),
              static_cast<double>(noise_std), failures ? "FAIL" : "ok");
  return failures;
#else
  (void)B, (void)n, (void)entries, (void)noise_std;
  std::printf("64-bit indexing case skipped: no mmap\n");
  return 0;
#endif
}

int run_64bit_cases() {
  // values small enough for every sum to be exact in bfloat16
  int f = run_64bit_case(3, (int64_t{1} << 30) + 8,
                         {{0, -3, 1}, {0, -2, 2}, {0, -1, 3}, {1, -3, 10}, {1, -2, 20}, {1, -1, 30},
                          {2, -3, 100}, {2, -2, 200}, {2, -1, 300}, {2, 5, 7}});
  f += run_64bit_case(80, (int64_t{1} << 27) + 8,
                      {{0, -1, 4}, {17, -1, 8}, {63, -1, 16}, {79, -1, 32}, {70, 5, 64}, {64, 0, 2},
                       {33, -8, 1}, {78, -8, 1}});
  // columns past 2^31 and element indices past 2^32 (the Philox counter's high word)
  f += run_64bit_case(2, (int64_t{1} << 32) + 16, {{0, -1, 3}, {1, -1, 5}, {1, -16, 1}, {0, 3, 2}}, 0.0f);
  f += run_64bit_case(2, (int64_t{1} << 32) + 16, {{0, -1, 3}, {1, -1, 5}, {1, -16, 1}, {0, 3, 2}}, 1.5f);
  return f;
}

}  // namespace

int main() {
  int failures = run_all<float>() + run_all<__nv_bfloat16>() + run_all<__half>() + run_64bit_cases();
  if (failures) {
    std::printf("clip_sum_noise host emulation: %d FAILURES\n", failures);
    return 1;
  }
  std::printf("clip_sum_noise host emulation: all cases OK\n");
  return 0;
}
