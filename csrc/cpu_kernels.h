// The compiled CPU kernels of dpkernels (the extension dpkernels._cpu loads; built JIT by
// dpkernels/_cpu.py from philox_cpu.cpp, patches_cpu.cpp and cpu_bindings.cpp).
#pragma once

#include <torch/extension.h>

#include <string>

namespace dpk_cpu {

// Philox-4x32-10 normals (philox_cpu.cpp): the counter scheme of dpkernels/ops/philox.py.
torch::Tensor philox_normal(int64_t numel, int64_t seed_lo, int64_t seed_hi, int64_t step, int64_t stream,
                            int64_t offset);
void add_normal_(torch::Tensor out, double noise_std, int64_t seed_lo, int64_t seed_hi, int64_t step,
                 int64_t stream);
torch::Tensor philox4x32(int64_t numel, int64_t seed_lo, int64_t seed_hi, int64_t step, int64_t stream,
                         int64_t offset);
std::string isa();
std::string set_isa(const std::string& name);

// Convolution patch matrices (patches_cpu.cpp): dpkernels/ops/conv_patches.py's input_patches.
torch::Tensor conv_patches(torch::Tensor x, int64_t groups, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                           int64_t pad_top, int64_t pad_left, int64_t dh, int64_t dw, int64_t out_h, int64_t out_w);

}  // namespace dpk_cpu
