// Host-side check of csrc/philox.cuh: the very header the kernels use, compiled for the CPU.
//
// Build (either works; nvcc -x cu takes the __host__ __device__ path as nvcc sees it):
//   nvcc -std=c++17 -O2 -x cu -I csrc csrc/philox_host_check.cpp -o philox_host_check
//   c++  -std=c++17 -O2       -I csrc csrc/philox_host_check.cpp -o philox_host_check
//
// Run without arguments: checks the published Philox4x32-10 known-answer vectors (Random123,
// Salmon et al., SC'11) and exits 0 / 1.
// Run with --stdin: also reads lines "seed step stream element" (decimal, seed < 2^64,
// step/stream < 2^32, element < 2^64) and prints, per line,
//   "x0 x1 x2 x3 z"   (x* decimal uint32, z the float32 normal in C99 hex-float notation)
// which tests/test_cuda_clip_sum_noise.py compares against dpkernels/ops/philox.py.
// No GPU and no CUDA runtime call is needed.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "philox.cuh"

namespace {

struct Kat {
  uint32_t ctr[4];
  uint32_t key[2];
  uint32_t expect[4];
};

const Kat kKats[] = {
    {{0u, 0u, 0u, 0u}, {0u, 0u}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};

int check_kats() {
  int failures = 0;
  for (const Kat& k : kKats) {
    const dpk::Philox4 r =
        dpk::philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    const uint32_t got[4] = {r.x0, r.x1, r.x2, r.x3};
    for (int w = 0; w < 4; ++w) {
      if (got[w] != k.expect[w]) {
        std::fprintf(stderr, "KAT mismatch: word %d got %08" PRIx32 " expected %08" PRIx32 "\n", w,
                     got[w], k.expect[w]);
        ++failures;
      }
    }
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  const int failures = check_kats();
  if (failures != 0) return 1;
  if (argc > 1 && std::strcmp(argv[1], "--stdin") == 0) {
    unsigned long long seed, step, stream, elem;
    while (std::scanf("%llu %llu %llu %llu", &seed, &step, &stream, &elem) == 4) {
      const dpk::PhiloxKey key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                               static_cast<uint32_t>(step), static_cast<uint32_t>(stream)};
      const dpk::Philox4 r = dpk::philox_draw(key, static_cast<uint64_t>(elem));
      const float z = dpk::philox_normal(key, static_cast<uint64_t>(elem));
      std::printf("%" PRIu32 " %" PRIu32 " %" PRIu32 " %" PRIu32 " %a\n", r.x0, r.x1, r.x2, r.x3,
                  static_cast<double>(z));
    }
  } else {
    std::printf("philox.cuh: Philox4x32-10 known-answer vectors OK\n");
  }
  return 0;
}
